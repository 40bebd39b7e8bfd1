// The status page's live refresh (no framework): fetches stats.json every 2 s and rebuilds
// what page.rs renders, with the same elements, classes and data attributes. Only DOM calls
// and text nodes, never innerHTML, so nothing from the stats is parsed as markup. When a
// fetch fails, the page stays as it was and says it is stale. Keep in step with page.rs and
// format.rs.
"use strict";
(() => {
  const PERIOD_MS = 2000;
  const TIMEOUT_MS = 4000;
  const COLUMNS = [
    ["address", "backend"], ["weight", "weight"], ["drain", "drain"], ["state", "state"],
    ["health", "health"], ["since", "since"], ["last", "last check"], ["flows", "live flows"],
    ["pps", "packets/s"], ["bps", "bytes/s"], ["packets", "packets"], ["bytes", "bytes"],
    ["new-flows", "new flows"],
  ];
  const ALL_DOWN = "Every backend fails its health checks: the VIP keeps forwarding with its last table.";
  const live = document.getElementById("live");
  const stale = document.getElementById("stale");
  let refreshes = 0;
  let lastOk = null;

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value !== null && value !== undefined) e.setAttribute(name, String(value));
    }
    e.append(...children);
    return e;
  }

  // lb_userspace::units, in JavaScript: SI prefixes, three significant digits.
  const threeDigits = (v) => (v < 9.995 ? v.toFixed(2) : v < 99.95 ? v.toFixed(1) : v.toFixed(0));
  const PREFIXES = ["k", "M", "G", "T", "P", "E"];
  function si(value) {
    const v = Number.isFinite(value) && value > 0 ? value : 0;
    if (v < 999.95) return [Number.isInteger(v) ? v.toFixed(0) : v.toFixed(1), ""];
    let m = v / 1000;
    let i = 0;
    while (m >= 999.5 && i + 1 < PREFIXES.length) {
      m /= 1000;
      i += 1;
    }
    return [threeDigits(m), PREFIXES[i]];
  }
  function count(n) {
    const [number, prefix] = si(n);
    return number + prefix;
  }
  function bytes(n) {
    const [number, prefix] = si(n);
    return `${number} ${prefix}B`;
  }
  function duration(secs) {
    const d = Math.floor(secs / 86400);
    const h = Math.floor(secs / 3600) % 24;
    const m = Math.floor(secs / 60) % 60;
    const s = secs % 60;
    if (secs < 60) return `${s} s`;
    if (secs < 3600) return `${m} m ${s} s`;
    if (secs < 86400) return `${h} h ${m} m`;
    return `${d} d ${h} h`;
  }
  const latency = (us) => (us < 1000 ? `${us} µs` : `${threeDigits(us / 1000)} ms`);

  const cell = (cls, value, title, text) =>
    el("td", { class: cls, "data-value": value, title }, text);
  const total = (cls, n, text) => cell(cls, n, n, text);
  const healthWord = (b) => (b.health ? (b.health.up ? "up" : "down") : "unchecked");

  function trafficCells(t) {
    return [
      cell("pps", t.packets_per_sec, null, count(t.packets_per_sec)),
      cell("bps", t.bytes_per_sec, null, `${bytes(t.bytes_per_sec)}/s`),
      total("packets", t.packets, count(t.packets)),
      total("bytes", t.bytes, bytes(t.bytes)),
      total("new-flows", t.new_flows, count(t.new_flows)),
    ];
  }

  function backendRow(vip, b) {
    const health = healthWord(b);
    const tr = el("tr", {
      class: `backend state-${b.state} health-${health}`,
      "data-vip": vip,
      "data-backend": b.address,
    });
    tr.append(
      cell("address", null, null, b.address),
      cell("weight", b.weight, null, String(b.weight)),
      cell("drain", String(b.drain), null, b.drain ? "drained" : ""),
      cell("state", b.state, null, b.state),
    );
    const r = b.health;
    if (r) {
      const last = r.last ?? "no check yet";
      const text = r.last_latency_us == null ? last : `${last} · ${latency(r.last_latency_us)}`;
      tr.append(
        cell("health", health, r.check, health),
        cell("since", r.since_secs, null, duration(r.since_secs)),
        cell("last", null, `${r.check}: ${last}`, text),
      );
    } else {
      tr.append(
        cell("health", health, null, "not checked"),
        cell("since", null, null, ""),
        cell("last", null, null, ""),
      );
    }
    tr.append(total("flows", b.flows, count(b.flows)), ...trafficCells(b.traffic));
    return tr;
  }

  function totalRow(vip, idleTimeout) {
    const backends = vip.backends;
    const weight = backends.reduce((sum, b) => sum + b.weight, 0);
    const active = backends.filter((b) => b.state === "active").length;
    const checked = backends.filter((b) => b.health).length;
    const up = backends.filter((b) => healthWord(b) === "up").length;
    const flows = backends.reduce((sum, b) => sum + b.flows, 0);
    return el("tr", { class: "total", "data-vip": vip.vip },
      cell("address", null, null, "VIP total"),
      cell("weight", weight, null, ""),
      cell("drain", null, null, ""),
      cell("state", active, null, `${active}/${backends.length} active`),
      cell("health", up, null, checked > 0 ? `${up}/${checked} up` : ""),
      cell("since", null, null, ""),
      cell("last", null, null, ""),
      cell("flows", flows, `${flows} flows seen in the last ${idleTimeout} s`, count(flows)),
      ...trafficCells(vip.traffic));
  }

  function vipSection(vip, idleTimeout) {
    const section = el("section", {
      class: "vip",
      "data-vip": vip.vip,
      "data-all-down": String(Boolean(vip.all_down)),
    }, el("h2", {}, vip.vip));
    if (vip.all_down) section.append(el("p", { class: "alert all-down" }, ALL_DOWN));
    const checks = [...new Set(vip.backends.filter((b) => b.health).map((b) => b.health.check))];
    if (checks.length > 0) {
      section.append(el("p", { class: "checks" }, `checks: ${checks.sort().join(", ")}`));
    }
    const head = el("tr", {}, ...COLUMNS.map(([cls, heading]) => el("th", { class: cls }, heading)));
    section.append(el("table", { class: "backends" },
      el("thead", {}, head),
      el("tbody", {}, ...vip.backends.map((b) => backendRow(vip.vip, b))),
      el("tfoot", {}, totalRow(vip, idleTimeout))));
    return section;
  }

  function counterTable(id, caption, key, rows) {
    return el("table", { id, class: "counters" },
      el("caption", {}, caption),
      el("tbody", {}, ...rows.map(([name, label, n, text]) =>
        el("tr", { [key]: name, class: n === 0 ? "zero" : "nonzero" },
          cell("name", null, null, label),
          total("value", n, text)))));
  }

  function render(stats) {
    const backends = stats.vips.flatMap((v) => v.backends);
    const active = backends.filter((b) => b.state === "active").length;
    const flows = backends.reduce((sum, b) => sum + b.flows, 0);
    const pps = stats.vips.reduce((sum, v) => sum + v.traffic.packets_per_sec, 0);
    document.getElementById("summary").textContent =
      `${stats.vips.length} VIPs · ${active}/${backends.length} backends active · ` +
      `${count(flows)} live flows · ${count(pps)} packets/s`;
    const interval = document.getElementById("rate-interval");
    const secs = stats.rate_interval_secs;
    interval.dataset.value = String(secs);
    interval.textContent = secs > 0
      ? `rates over ${secs.toFixed(1)} s` : "rates need a second read (next refresh)";

    const vips = stats.vips.map((v) => vipSection(v, stats.idle_timeout_secs));
    if (vips.length === 0) vips.push(el("p", { class: "empty" }, "No VIPs configured."));
    document.getElementById("vips").replaceChildren(...vips);

    const g = stats.global;
    const ft = stats.flow_table;
    const used = ft.capacity > 0
      ? `${count(ft.entries)} (${((ft.entries * 100) / ft.capacity).toFixed(1)}%)`
      : count(ft.entries);
    const packets = ([name, n]) => [name, name, n, count(n)];
    document.querySelector("#global .cards").replaceChildren(
      counterTable("actions", "XDP actions (packets)", "data-action",
        Object.entries(g.actions).map(packets)),
      counterTable("flow-table", "Flow table", "data-counter", [
        ["entries", "entries", ft.entries, used],
        ["capacity", "capacity", ft.capacity, count(ft.capacity)],
        ["hits", "hits", g.flow_hits, count(g.flow_hits)],
        ["misses", "misses", g.flow_misses, count(g.flow_misses)],
        ["new-flows", "new flows", g.new_flows, count(g.new_flows)],
      ]),
      counterTable("drops", "Drops by reason (packets)", "data-reason",
        Object.entries(g.drops).map(packets)));
  }

  async function refresh() {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
    try {
      const reply = await fetch("stats.json", { cache: "no-store", signal: abort.signal });
      if (!reply.ok) throw new Error(`HTTP ${reply.status}: ${(await reply.text()).slice(0, 200)}`);
      render(await reply.json());
      refreshes += 1;
      lastOk = new Date();
      live.dataset.refreshes = String(refreshes);
      live.textContent = `live, updated ${lastOk.toLocaleTimeString()}`;
      stale.hidden = true;
      stale.textContent = "";
      document.body.classList.remove("stale");
    } catch (e) {
      const why = e.name === "AbortError" ? `no answer within ${TIMEOUT_MS / 1000} s` : e.message;
      const since = lastOk ? lastOk.toLocaleTimeString() : "page load";
      stale.textContent = `stale since ${since}: ${why}`;
      stale.hidden = false;
      document.body.classList.add("stale");
    } finally {
      clearTimeout(timer);
      setTimeout(refresh, PERIOD_MS);
    }
  }

  live.textContent = `live every ${PERIOD_MS / 1000} s`;
  setTimeout(refresh, PERIOD_MS);
})();
