//! Bad input: refused requests through lbctl, raw HTTP and a peer without permission each get
//! a clear error, and change neither the running state, nor the state file, nor the maps.

use std::{
    fs,
    io::{Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    lb::{Lbd, Unchanged, VipConfig},
    lbctl::{Lbctl, Run, run_bounded},
};
use lb_userspace::api::proto::{BODY_LIMIT, ErrorReply};

use super::{Bed, CHURN_RING, PORT};

#[test]
fn bad_input() {
    let bed = Bed::new("lv-bad", 2).expect("test bed");
    let second = VipConfig {
        address: bed.vip(8080, "udp").to_string(),
        ring_size: Some(251),
        backends: vec![(bed.addr(0), 100)],
    };
    let lbd = bed
        .start_lbd(&[bed.main_vip(2, Some(CHURN_RING)), second])
        .expect("lbd");
    lbd.finish(bad_input_body(&bed, &lbd), |_| false);
}

fn bad_input_body(bed: &Bed, lbd: &Lbd) -> Result<()> {
    let lbctl = lbd.lbctl()?;
    let before = Unchanged::take(lbd)?;
    let v0 = bed.vip(PORT, "tcp").to_string();
    let b1 = bed.addr(0).to_string();
    let files = TempFiles::new(&lbd.run_dir)?;

    let mut failures = Vec::new();
    let mut checked = 0;
    for (args, expect) in lbctl_cases(&v0, &b1, &files) {
        checked += 1;
        let run = lbctl.run(&args)?;
        if let Err(e) = expect_refusal(&run, &expect) {
            failures.push(format!("{e:#}"));
        }
    }
    for case in api_cases(&v0, &b1) {
        checked += 1;
        if let Err(e) = case.check(&lbd.socket_path) {
            failures.push(format!("{e:#}"));
        }
    }
    checked += 1;
    if let Err(e) = permission_denied(lbd, &lbctl) {
        failures.push(format!("{e:#}"));
    }
    // A dry run is accepted and changes nothing either.
    let dry = lbctl.run(["apply", "-f", &files.valid, "--dry-run"])?;
    ensure!(dry.success(), "dry run: {}", dry.describe());
    ensure!(
        dry.stdout.contains("dry run:") && dry.stdout.contains("+ vip 10.200.0.120:80/tcp"),
        "dry run output: {}",
        dry.stdout
    );

    let after = Unchanged::take(lbd)?;
    ensure!(
        after.export == before.export,
        "export changed:\nbefore:\n{}\nafter:\n{}",
        before.export,
        after.export
    );
    ensure!(
        after.state_file == before.state_file,
        "the state file changed"
    );
    ensure!(after.maps == before.maps, "the data plane changed");
    eprintln!(
        "bad input: {checked} refusals checked, {} wrong",
        failures.len()
    );
    ensure!(failures.is_empty(), "{}", failures.join("\n\n"));
    Ok(())
}

/// Config files for `lbctl apply -f`.
struct TempFiles {
    syntax: String,
    unknown_field: String,
    duplicate: String,
    not_prime: String,
    valid: String,
}

impl TempFiles {
    fn new(dir: &Path) -> Result<Self> {
        let write = |name: &str, text: &str| -> Result<String> {
            let path = dir.join(name);
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok(path.display().to_string())
        };
        Ok(Self {
            syntax: write("syntax.toml", "[[vip]\naddress = \"10.200.0.120:80/tcp\"\n")?,
            unknown_field: write(
                "unknown.toml",
                "[[vip]]\naddress = \"10.200.0.120:80/tcp\"\ncolour = \"blue\"\n",
            )?,
            duplicate: write(
                "duplicate.toml",
                "[[vip]]\naddress = \"10.200.0.120:80/tcp\"\n[[vip]]\naddress = \"10.200.0.120:80/tcp\"\n",
            )?,
            not_prime: write(
                "not-prime.toml",
                "[[vip]]\naddress = \"10.200.0.120:80/tcp\"\nring_size = 1000\n",
            )?,
            valid: write(
                "valid.toml",
                "[[vip]]\naddress = \"10.200.0.120:80/tcp\"\nring_size = 251\nbackends = [{ address = \"10.10.0.11\" }]\n",
            )?,
        })
    }
}

/// An lbctl command line and what its error must say (every substring, case-insensitive).
type LbctlCase = (Vec<String>, Vec<String>);

#[allow(clippy::too_many_lines)] // a table of cases
fn lbctl_cases(v0: &str, b1: &str, files: &TempFiles) -> Vec<LbctlCase> {
    let case = |args: &[&str], expect: &[&str]| -> LbctlCase {
        (
            args.iter().map(ToString::to_string).collect(),
            expect.iter().map(ToString::to_string).collect(),
        )
    };
    let new = "10.200.0.110:80/tcp";
    let unknown_vip = "10.200.0.111:80/tcp";
    let mut cases = vec![
        // Malformed addresses, ports, protocols.
        case(
            &["vip", "add", "10.200.0.300:80/tcp"],
            &["10.200.0.300:80/tcp"],
        ),
        case(
            &["vip", "add", "10.200.0.110:99999/tcp"],
            &["10.200.0.110:99999/tcp"],
        ),
        case(
            &["vip", "add", "10.200.0.110:http/tcp"],
            &["10.200.0.110:http/tcp"],
        ),
        case(&["vip", "add", "10.200.0.110/tcp"], &["10.200.0.110/tcp"]),
        case(
            &["vip", "add", "10.200.0.110:80/sctp"],
            &["10.200.0.110:80/sctp", "protocol"],
        ),
        case(&["vip", "add", "10.200.0.110:0/tcp"], &["port 0"]),
        case(
            &["vip", "add", "0.0.0.0:80/tcp"],
            &["0.0.0.0", "cannot be a VIP"],
        ),
        case(
            &["vip", "add", "[ff02::1]:80/tcp"],
            &["ff02::1", "cannot be a VIP"],
        ),
        case(
            &["vip", "add", "[2001:db8::1]:80/tcp", "--encap", "vxlan"],
            &["vxlan"],
        ),
        case(&["backend", "add", v0, "10.10.0.999"], &["10.10.0.999"]),
        case(
            &["backend", "add", v0, "224.0.0.1"],
            &["224.0.0.1", "cannot be a backend"],
        ),
        case(
            &["backend", "add", v0, "::"],
            &["::", "cannot be a backend"],
        ),
        // Duplicates and unknowns.
        case(&["vip", "add", v0], &[v0, "already exists"]),
        case(&["backend", "add", v0, b1], &[b1, "already exists"]),
        case(&["vip", "del", unknown_vip], &[unknown_vip, "no such VIP"]),
        case(
            &["backend", "add", unknown_vip, "10.10.0.50"],
            &[unknown_vip, "no such VIP"],
        ),
        case(
            &["backend", "del", v0, "10.10.0.77"],
            &["10.10.0.77", "no such backend"],
        ),
        case(
            &["backend", "weight", v0, "10.10.0.77", "5"],
            &["10.10.0.77", "no such backend"],
        ),
        case(
            &["backend", "drain", v0, "10.10.0.77"],
            &["10.10.0.77", "no such backend"],
        ),
        case(
            &["backend", "undrain", unknown_vip, b1],
            &[unknown_vip, "no such VIP"],
        ),
        // Out of range.
        case(
            &["backend", "weight", v0, b1, "65536"],
            &["weight", "65536", "out of range"],
        ),
        case(
            &["backend", "add", v0, "10.10.0.50", "--weight", "70000"],
            &["weight", "70000", "out of range"],
        ),
        case(&["backend", "weight", v0, b1, "-1"], &["-1"]),
        case(&["backend", "weight", v0, b1, "ten"], &["ten"]),
        case(
            &["vip", "add", new, "--ring-size", "4096"],
            &["ring_size", "4096", "not prime"],
        ),
        case(
            &["vip", "add", new, "--ring-size", "5"],
            &["ring_size", "5", "out of range"],
        ),
        case(
            &["vip", "add", new, "--ring-size", "2000003"],
            &["ring_size", "2000003", "out of range"],
        ),
        case(&["vip", "add", new, "--ring-size", "abc"], &["abc"]),
        case(&["vip", "add", new, "--hash", "md5"], &["md5"]),
        case(
            &["backend", "drain", v0, b1, "--wait", "--timeout", "soon"],
            &["soon"],
        ),
        // Whole-state files.
        case(&["apply", "-f", &files.syntax], &[&files.syntax]),
        case(
            &["apply", "-f", &files.unknown_field],
            &["unknown field", "colour"],
        ),
        case(
            &["apply", "-f", &files.duplicate],
            &["10.200.0.120:80/tcp", "duplicate"],
        ),
        case(
            &["apply", "-f", &files.not_prime],
            &["ring_size", "1000", "not prime"],
        ),
        case(
            &["apply", "-f", "/nonexistent/lb.toml"],
            &["/nonexistent/lb.toml"],
        ),
    ];
    // The same refusals through --json must fail the same way.
    cases.push(case(&["--json", "vip", "add", v0], &["already exists"]));
    cases
}

/// lbctl must have failed (exit 1, or 2 for usage errors) with every expected substring.
fn expect_refusal(run: &Run, expect: &[String]) -> Result<()> {
    ensure!(
        matches!(run.code(), Some(1 | 2)),
        "expected exit 1 or 2: {}",
        run.describe()
    );
    let err = run.stderr.to_lowercase();
    let missing: Vec<&String> = expect
        .iter()
        .filter(|e| !err.contains(&e.to_lowercase()))
        .collect();
    ensure!(
        missing.is_empty(),
        "stderr does not say {missing:?}: {}",
        run.describe()
    );
    if run.code() == Some(1) {
        ensure!(
            run.stderr.starts_with("lbctl: "),
            "error without the `lbctl: ` prefix: {}",
            run.describe()
        );
    }
    Ok(())
}

/// lbctl run as `nobody` must be refused by the socket's permissions, and say so.
fn permission_denied(lbd: &Lbd, lbctl: &Lbctl) -> Result<()> {
    // A copy nobody may execute, in a folder nobody may enter: a failure can then only come
    // from the socket.
    let bin = lbd.run_dir.join("lbctl-copy");
    fs::copy(lbctl.bin(), &bin).context("copying lbctl")?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(&bin)
        .arg("--socket")
        .arg(&lbd.socket_path)
        .arg("status");
    let run = run_bounded(
        cmd,
        vec!["(as nobody) status".to_owned()],
        Duration::from_secs(30),
    )?;
    let _ = fs::remove_file(&bin);
    let meta = fs::metadata(&lbd.socket_path).context("socket metadata")?;
    let socket = {
        use std::os::unix::fs::MetadataExt as _;
        format!(
            "socket mode {:o}, uid {}, gid {}",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid()
        )
    };
    ensure!(
        run.code() == Some(1),
        "as nobody ({socket}): {}",
        run.describe()
    );
    ensure!(
        run.stderr.starts_with("lbctl: ")
            && run.stderr.to_lowercase().contains("permission denied"),
        "as nobody, no clear permission error: {}",
        run.describe()
    );
    Ok(())
}

/// One raw HTTP request to the API and the refusal it must get.
struct ApiCase {
    method: &'static str,
    path: String,
    body: Vec<u8>,
    status: u16,
    /// Substrings of the error message (case-insensitive).
    expect: Vec<String>,
}

impl ApiCase {
    fn check(&self, socket: &Path) -> Result<()> {
        let what = format!(
            "{} {} {}",
            self.method,
            self.path,
            String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
        );
        let (status, body) =
            http(socket, self.method, &self.path, &self.body).with_context(|| what.clone())?;
        ensure!(
            status == self.status,
            "{what}: status {status}, expected {}: {body}",
            self.status
        );
        let reply: ErrorReply = serde_json::from_str(&body)
            .with_context(|| format!("{what}: error body {body:?} is not an ErrorReply"))?;
        let msg = reply.error.to_lowercase();
        let missing: Vec<&String> = self
            .expect
            .iter()
            .filter(|e| !msg.contains(&e.to_lowercase()))
            .collect();
        ensure!(
            missing.is_empty(),
            "{what}: error {:?} does not say {missing:?}",
            reply.error
        );
        Ok(())
    }
}

#[allow(clippy::too_many_lines)] // a table of cases
fn api_cases(v0: &str, b1: &str) -> Vec<ApiCase> {
    let case = |method, path: &str, body: String, status, expect: &[&str]| ApiCase {
        method,
        path: path.to_owned(),
        body: body.into_bytes(),
        status,
        expect: expect.iter().map(ToString::to_string).collect(),
    };
    let changes = |list: &str| format!(r#"{{"changes":[{list}]}}"#);
    let huge = format!(
        r#"{{"changes":[],"pad":"{}"}}"#,
        "x".repeat(BODY_LIMIT + 1024)
    );
    vec![
        case(
            "POST",
            "/v1/changes",
            "{not json".to_owned(),
            400,
            &["request body"],
        ),
        case(
            "POST",
            "/v1/changes",
            String::new(),
            400,
            &["request body", "empty"],
        ),
        case(
            "POST",
            "/v1/changes",
            changes(r#"{"op":"vip_add","vip":"10.200.0.110:80/tcp","port":1}"#),
            400,
            &["unknown field `port`"],
        ),
        case(
            "POST",
            "/v1/changes",
            r#"{"changes":[],"extra":true}"#.to_owned(),
            400,
            &["unknown field `extra`"],
        ),
        case(
            "POST",
            "/v1/changes",
            changes(r#"{"op":"vip_frob","vip":"10.200.0.110:80/tcp"}"#),
            400,
            &["vip_frob"],
        ),
        case(
            "POST",
            "/v1/changes",
            changes(r#"{"op":"vip_add","vip":"10.200.0.110:80/udpx"}"#),
            400,
            &["10.200.0.110:80/udpx", "protocol"],
        ),
        case(
            "POST",
            "/v1/changes",
            changes(&format!(
                r#"{{"op":"backend_add","vip":"{v0}","address":"10.10.0.60","weight":-5}}"#
            )),
            400,
            &["-5"],
        ),
        case(
            "POST",
            "/v1/changes",
            changes(r#"{"op":"vip_add","vip":"10.200.0.110:80/tcp","ring_size":4096}"#),
            400,
            &["ring_size", "not prime"],
        ),
        // All or nothing: a valid change followed by a refused one applies neither.
        case(
            "POST",
            "/v1/changes",
            changes(&format!(
                r#"{{"op":"vip_add","vip":"10.200.0.110:80/tcp"}},{{"op":"backend_weight","vip":"{v0}","address":"{b1}","weight":70000}}"#
            )),
            400,
            &["weight", "70000", "out of range"],
        ),
        case(
            "POST",
            "/v1/changes",
            changes(
                r#"{"op":"vip_add","vip":"10.200.0.110:80/tcp"},{"op":"vip_add","vip":"10.200.0.110:80/tcp"}"#,
            ),
            409,
            &["10.200.0.110:80/tcp", "already exists"],
        ),
        case(
            "POST",
            "/v1/changes",
            changes(&format!(
                r#"{{"op":"backend_del","vip":"{v0}","address":"10.10.0.77"}}"#
            )),
            404,
            &["no such backend"],
        ),
        case(
            "POST",
            "/v1/apply",
            r#"{"vip":[{"address":"10.200.0.110:80/tcp"},{"address":"10.200.0.110:80/tcp"}]}"#
                .to_owned(),
            409,
            &["duplicate"],
        ),
        case(
            "POST",
            "/v1/apply",
            r#"{"vip":[{"address":"10.200.0.110:80/tcp","ring_size":100}]}"#.to_owned(),
            400,
            &["ring_size", "not prime"],
        ),
        case(
            "GET",
            &format!("/v1/flows?vip={v0}&backend=10.10.0.77"),
            String::new(),
            404,
            &["no such backend"],
        ),
        case(
            "GET",
            &format!("/v1/flows?vip=nonsense&backend={b1}"),
            String::new(),
            400,
            &["nonsense"],
        ),
        case(
            "GET",
            "/v1/status?idle_timeout=abc",
            String::new(),
            400,
            &["idle_timeout"],
        ),
        case("POST", "/v1/changes", huge, 413, &[]),
    ]
}

/// One HTTP/1.1 request on the Unix socket; returns the status and the (de-chunked) body.
fn http(socket: &Path, method: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket).context("connecting")?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let length = if method == "POST" {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
    } else {
        String::new()
    };
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: lbd\r\nConnection: close\r\n{length}\r\n");
    stream.write_all(request.as_bytes())?;
    // lbd may answer (413) and close before reading a body that is too large.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).context("reading the reply")?;
    lb_tests::lb::parse_http_reply(&String::from_utf8_lossy(&raw))
}
