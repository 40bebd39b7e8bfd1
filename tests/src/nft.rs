//! nftables packet counters in a test namespace: what a host really sent or received, counted
//! by the kernel, to compare the balancer's own counters against. An [`NftCounters`] table is
//! deleted on drop (it would go with its namespace anyway).

use std::{collections::BTreeMap, fmt::Write as _, io::Write as _, process::Stdio};

use anyhow::{Context as _, Result, bail};

use crate::netns::Netns;

/// A netfilter hook an [`NftCounters`] table counts at (family `ip`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Packets the host itself sends, as the socket layer hands them to IP (one per GSO
    /// super-packet: keep writes under the MSS to count wire packets).
    Output,
    /// Packets arriving, after any XDP program on the interface (a decapsulated packet is
    /// counted as its inner packet).
    Prerouting,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Output => "output",
            Hook::Prerouting => "prerouting",
        }
    }
}

/// What a counter saw: packets, and their bytes from the IP header on (no link header).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// An `ip` table of named counters at one hook of a namespace, one rule per counter.
pub struct NftCounters<'a> {
    ns: &'a Netns,
    table: String,
}

impl<'a> NftCounters<'a> {
    /// Creates table `table` with a counter for each `(name, match)`, where `match` is nft
    /// syntax such as `ip daddr 10.200.0.100 tcp dport 80`.
    pub fn install(ns: &'a Netns, table: &str, hook: Hook, rules: &[(&str, &str)]) -> Result<Self> {
        let mut script = format!("table ip {table} {{\n");
        for (name, _) in rules {
            writeln!(script, "  counter {name} {{ }}").expect("writing to a String");
        }
        writeln!(
            script,
            "  chain count {{\n    type filter hook {} priority 0; policy accept;",
            hook.name()
        )
        .expect("writing to a String");
        for (name, matches) in rules {
            writeln!(script, "    {matches} counter name \"{name}\"").expect("writing to a String");
        }
        script.push_str("  }\n}\n");
        nft_script(ns, &script).with_context(|| format!("creating nft table {table}"))?;
        Ok(Self {
            ns,
            table: table.to_owned(),
        })
    }

    /// Every counter of the table, by name (`nft -j list counters`).
    pub fn read(&self) -> Result<BTreeMap<String, Count>> {
        let json = self
            .ns
            .exec(["nft", "-j", "list", "counters", "table", "ip", &self.table])?;
        parse_counters(&json).with_context(|| format!("nft counters of {}: {json}", self.table))
    }

    /// One counter; an error when the table has none of that name.
    pub fn get(&self, name: &str) -> Result<Count> {
        self.read()?
            .remove(name)
            .with_context(|| format!("no nft counter {name} in {}", self.table))
    }
}

impl Drop for NftCounters<'_> {
    fn drop(&mut self) {
        if let Err(e) = self
            .ns
            .exec(["nft", "delete", "table", "ip", self.table.as_str()])
        {
            eprintln!("deleting nft table {}: {e:#}", self.table);
        }
    }
}

/// Runs an nft script (`nft -f -`) in `ns`.
fn nft_script(ns: &Netns, script: &str) -> Result<()> {
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning nft")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())
        .context("writing the nft script")?;
    let out = child.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft -f: {}: {}\nscript:\n{script}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The counters of `nft -j list counters` output.
fn parse_counters(json: &str) -> Result<BTreeMap<String, Count>> {
    let value: serde_json::Value = serde_json::from_str(json).context("not JSON")?;
    let items = value["nftables"].as_array().context("no nftables array")?;
    let mut out = BTreeMap::new();
    for counter in items.iter().filter_map(|i| i.get("counter")) {
        let field = |f: &str| {
            counter[f]
                .as_u64()
                .with_context(|| format!("counter without {f}: {counter}"))
        };
        let name = counter["name"]
            .as_str()
            .with_context(|| format!("counter without a name: {counter}"))?;
        out.insert(
            name.to_owned(),
            Count {
                packets: field("packets")?,
                bytes: field("bytes")?,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nft_json_counters() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"counter": {"family": "ip", "name": "tcp", "table": "t", "handle": 2, "packets": 3, "bytes": 114}},
            {"counter": {"family": "ip", "name": "udp", "table": "t", "handle": 3, "packets": 0, "bytes": 0}}]}"#;
        let counters = parse_counters(json).unwrap();
        assert_eq!(
            counters["tcp"],
            Count {
                packets: 3,
                bytes: 114
            }
        );
        assert_eq!(counters["udp"], Count::default());
        assert_eq!(counters.len(), 2);
        assert!(parse_counters(r#"{"nftables": [{"counter": {"name": "x"}}]}"#).is_err());
    }
}
