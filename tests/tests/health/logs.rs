//! `lbd --log-format json`: every state change is logged once, as one JSON object with its
//! cause. A backend is added, drained, undrained, taken down by its checks, brought back and
//! removed; after each step the test waits for the expected lines and then checks that each
//! appeared exactly once (a state logged twice, or a change with no line, fails).

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::lb::{Lbd, LbdOptions};
use serde_json::Value;

use super::{Bed, PORT, vip_toml};

/// Fast checks: the down and up transitions come within a second.
const CHECK: &str = "kind = \"tcp\", interval = \"200ms\", timeout = \"150ms\", rise = 1, fall = 1";
/// How long a step may take to show in the log.
const STEP_LIMIT: Duration = Duration::from_secs(10);
/// After the expected lines showed up, this long for a duplicate to show up too.
const SETTLE: Duration = Duration::from_millis(700);

#[test]
fn state_changes_logged_once() {
    let bed = Bed::new("hc-logs", 2).expect("test bed");
    let config = vip_toml(&bed, PORT, &[0], Some(CHECK));
    let options = LbdOptions {
        json_logs: true,
        ..LbdOptions::default()
    };
    let lbd = bed.start_lbd_with(&config, options).expect("lbd");
    lbd.finish(body(&bed, &lbd), |_| false);
}

/// One expected line: its message and the fields it must carry.
struct Expect<'a> {
    message: &'a str,
    fields: Vec<(&'a str, String)>,
}

impl<'a> Expect<'a> {
    fn new(message: &'a str, fields: &[(&'a str, &str)]) -> Self {
        Self {
            message,
            fields: fields.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
        }
    }

    fn matches(&self, line: &Value) -> bool {
        let fields = &line["fields"];
        fields["message"] == self.message
            && self
                .fields
                .iter()
                .all(|(k, v)| fields[*k].as_str().is_some_and(|f| f.contains(v.as_str())))
    }
}

/// The log lines of this run after `from` bytes, each parsed (every line must be JSON).
fn lines_after(lbd: &Lbd, from: usize) -> Result<Vec<Value>> {
    let log = lbd.log();
    log.get(from..)
        .unwrap_or("")
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON log line: {l}")))
        .collect()
}

/// Runs `action`, then waits until each of `expected` has been logged, lets duplicates show
/// up, and checks that each was logged exactly once.
fn step(
    lbd: &Lbd,
    what: &str,
    action: impl FnOnce() -> Result<()>,
    expected: &[Expect],
) -> Result<()> {
    let from = lbd.log().len();
    action().with_context(|| what.to_owned())?;
    let started = Instant::now();
    loop {
        let lines = lines_after(lbd, from)?;
        if expected.iter().all(|e| lines.iter().any(|l| e.matches(l))) {
            break;
        }
        if started.elapsed() > STEP_LIMIT {
            bail!(
                "{what}: not every expected line within {STEP_LIMIT:?}; logged:\n{}",
                lines
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(SETTLE);
    let lines = lines_after(lbd, from)?;
    for e in expected {
        let n = lines.iter().filter(|l| e.matches(l)).count();
        ensure!(
            n == 1,
            "{what}: {:?} {:?} logged {n} times",
            e.message,
            e.fields
        );
    }
    // Nothing else changed a backend's state.
    let changes: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "backend state changed")
        .collect();
    let wanted = expected
        .iter()
        .filter(|e| e.message == "backend state changed")
        .count();
    ensure!(
        changes.len() == wanted,
        "{what}: {} state changes logged, {wanted} expected: {changes:?}",
        changes.len()
    );
    eprintln!(
        "state_changes_logged_once: {what}: {} lines, as expected",
        lines.len()
    );
    Ok(())
}

fn body(bed: &Bed, lbd: &Lbd) -> Result<()> {
    let lbctl = lbd.lbctl()?;
    let vip = bed.vip(PORT).to_string();
    let b = bed.addr(1).to_string();
    let state = |from: &str, to: &str, cause: &str| {
        Expect::new(
            "backend state changed",
            &[
                ("vip", &vip),
                ("backend", &b),
                ("from", from),
                ("to", to),
                ("cause", cause),
            ],
        )
    };
    let applied =
        |change: &str| Expect::new("change applied", &[("change", change), ("cause", "api")]);

    step(
        lbd,
        "backend add",
        || lbctl.ok(["backend", "add", &vip, &b]).map(drop),
        &[
            applied(&format!("+ backend {vip} {b}")),
            state("none", "active", "added"),
        ],
    )?;
    step(
        lbd,
        "drain",
        || lbctl.ok(["backend", "drain", &vip, &b]).map(drop),
        &[applied("drain"), state("active", "draining", "drained")],
    )?;
    step(
        lbd,
        "undrain",
        || lbctl.ok(["backend", "undrain", &vip, &b]).map(drop),
        &[applied("undrain"), state("draining", "active", "undrained")],
    )?;
    step(
        lbd,
        "server stopped",
        || bed.stop(1, PORT),
        &[
            Expect::new(
                "health: backend down",
                &[("backend", &b), ("cause", "refused")],
            ),
            state("active", "down", "fails its health checks"),
        ],
    )?;
    step(
        lbd,
        "server started",
        || bed.start(1, PORT),
        &[
            Expect::new("health: backend up", &[("backend", &b)]),
            state("down", "active", "passes its health checks again"),
        ],
    )?;
    step(
        lbd,
        "backend del",
        || lbctl.ok(["backend", "del", &vip, &b]).map(drop),
        &[
            applied(&format!("- backend {vip} {b}")),
            state("active", "none", "removed"),
        ],
    )?;
    lbd.expect_no_errors(|_| false)
}
