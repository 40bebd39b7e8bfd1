//! The control API server against a fake agent, spoken to by a hand-written HTTP/1.1 client
//! over a socket in a temporary folder.

use std::{
    collections::{HashMap, HashSet},
    fmt, fs,
    os::unix::fs::{FileTypeExt, MetadataExt, symlink},
    path::Path,
    sync::{Arc, Mutex},
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    task::JoinHandle,
};

use super::{
    socket::{euid, group_id},
    *,
};
use crate::{
    api::proto::{
        BackendState, BackendStatus, FlowTableStats, GlobalStats, Traffic, VipStats, VipStatus,
    },
    change::{self, Change},
    config::Settings,
    model::{DesiredState, ModelError},
};

const VIP: &str = "10.0.0.1:80/tcp";
/// Its flows drop by one per query, from 3.
const DRAINING: &str = "10.1.0.1";
/// Its 7 flows never go.
const STUCK: &str = "10.1.0.2";

const TIMEOUTS: Timeouts = Timeouts {
    header: Duration::from_secs(10),
    body: Duration::from_secs(10),
    grace: Duration::from_secs(1),
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn vip_id() -> VipId {
    VIP.parse().unwrap()
}

/// A folder under the system's temp folder, removed with its contents on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("lb-api-{}-{name}", std::process::id()));
        if fs::symlink_metadata(&path).is_ok() {
            fs::remove_dir_all(&path).unwrap();
        }
        fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("cannot remove {}: {e}", self.0.display());
        }
    }
}

/// The agent's side: a desired state changed with `change::apply_all`, and flow counts.
#[derive(Default)]
struct Fake {
    state: DesiredState,
    /// Live flows per backend; each query reports the count, then it drops by one unless the
    /// backend is in `stuck`.
    flows: HashMap<IpAddr, u64>,
    stuck: HashSet<IpAddr>,
    debug: bool,
}

/// One VIP (ring 13) with the two backends above.
fn seeded() -> Fake {
    let vip = vip_id();
    let setup = [
        Change::VipAdd {
            vip,
            ring_size: Some(13),
            hash: None,
            encap: None,
            check: None,
        },
        Change::BackendAdd {
            vip,
            address: ip(DRAINING),
            weight: None,
            check: None,
        },
        Change::BackendAdd {
            vip,
            address: ip(STUCK),
            weight: None,
            check: None,
        },
    ];
    Fake {
        state: change::apply_all(&DesiredState::default(), &setup).unwrap(),
        flows: HashMap::from([(ip(DRAINING), 3), (ip(STUCK), 7)]),
        stuck: HashSet::from([ip(STUCK)]),
        debug: false,
    }
}

fn answer<T>(reply: oneshot::Sender<T>, value: T) {
    if reply.send(value).is_err() {
        eprintln!("fake agent: the request was dropped before its answer");
    }
}

impl Fake {
    fn handle(&mut self, command: Command) {
        match command {
            Command::State(reply) => answer(
                reply,
                StateReply {
                    settings: Settings::default(),
                    vip: self.state.clone().into_vips(),
                },
            ),
            Command::Status {
                idle_timeout,
                reply,
            } => answer(reply, Ok(self.status(idle_timeout))),
            Command::Change { request, reply } => {
                answer(reply, self.change(&request.changes, request.dry_run));
            }
            Command::Apply { request, reply } => {
                let result = DesiredState::from_vips(request.vip)
                    .map_err(ApiError::from)
                    .and_then(|wanted| {
                        let changes = change::diff(&self.state, &wanted);
                        self.change(&changes, request.dry_run)
                    });
                answer(reply, result);
            }
            Command::Flows {
                vip,
                backend,
                reply,
                ..
            } => answer(reply, self.count(vip, backend)),
            Command::Stats {
                idle_timeout,
                reply,
            } => answer(reply, Ok(self.stats(idle_timeout))),
            Command::Debug { set, reply } => {
                if let Some(set) = set {
                    self.debug = set.data_plane;
                }
                answer(
                    reply,
                    Ok(Debug {
                        data_plane: self.debug,
                    }),
                );
            }
        }
    }

    fn change(&mut self, changes: &[Change], dry_run: bool) -> Result<ChangeReply, ApiError> {
        let next = change::apply_all(&self.state, changes)?;
        if !dry_run {
            self.state = next;
        }
        Ok(ChangeReply {
            applied: !dry_run && !changes.is_empty(),
            changes: changes.to_vec(),
        })
    }

    fn count(&mut self, vip: VipId, addr: IpAddr) -> Result<u64, ApiError> {
        let spec = self
            .state
            .vip(&vip)
            .ok_or(ModelError::NoSuchVip { id: vip })?;
        if spec.backend(addr).is_none() {
            return Err(ModelError::NoSuchBackend { vip, addr }.into());
        }
        let left = self.flows.entry(addr).or_default();
        let now = *left;
        if !self.stuck.contains(&addr) {
            *left = now.saturating_sub(1);
        }
        Ok(now)
    }

    fn stats(&self, idle: Duration) -> Stats {
        let status = self.status(idle);
        Stats {
            rate_interval_secs: 0.0,
            idle_timeout_secs: status.idle_timeout_secs,
            vips: status
                .vips
                .into_iter()
                .map(|v| {
                    // Every backend shows 5 packets, so a test can tell the traffic came through.
                    VipStats::from_status(v, |backend| Traffic {
                        packets: if backend.is_some() { 5 } else { 0 },
                        ..Traffic::default()
                    })
                })
                .collect(),
            global: GlobalStats::default(),
            flow_table: FlowTableStats::default(),
        }
    }

    fn status(&self, idle: Duration) -> Status {
        let backends = |v: &crate::model::VipSpec| {
            v.backends
                .iter()
                .map(|b| BackendStatus {
                    address: b.addr,
                    weight: b.weight,
                    drain: b.drain,
                    state: BackendState::Active,
                    flows: self.flows.get(&b.addr).copied().unwrap_or(0),
                    health: None,
                })
                .collect()
        };
        Status {
            idle_timeout_secs: idle.as_secs(),
            vips: (self.state.vips.values())
                .map(|v| VipStatus {
                    vip: v.id,
                    ring_size: v.ring_size,
                    hash: v.hash,
                    encap: v.encap,
                    all_down: false,
                    backends: backends(v),
                })
                .collect(),
        }
    }
}

struct TestServer {
    socket: PathBuf,
    fake: Arc<Mutex<Fake>>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
    _dir: TempDir,
}

/// A server on a fresh socket with `fake` answering its commands.
fn start(name: &str, fake: Fake, timeouts: Timeouts) -> TestServer {
    let fake = Arc::new(Mutex::new(fake));
    let (commands, mut requests) = mpsc::channel(8);
    let agent = Arc::clone(&fake);
    tokio::spawn(async move {
        while let Some(command) = requests.recv().await {
            agent.lock().unwrap().handle(command);
        }
    });
    start_with(name, commands, fake, timeouts)
}

fn start_with(
    name: &str,
    commands: mpsc::Sender<Command>,
    fake: Arc<Mutex<Fake>>,
    timeouts: Timeouts,
) -> TestServer {
    let dir = TempDir::new(name);
    let socket = dir.0.join("lbd.sock");
    let listener = bind(&socket, None).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    // A send and a drop both mean stop.
    let shutdown = async { stopped.await.unwrap_or(()) };
    let task = tokio::spawn(serve_with(listener, commands, shutdown, timeouts));
    TestServer {
        socket,
        fake,
        stop: Some(stop),
        task,
        _dir: dir,
    }
}

impl TestServer {
    fn state(&self) -> DesiredState {
        self.fake.lock().unwrap().state.clone()
    }

    async fn send(&self, raw: &[u8]) -> Reply {
        exchange(&self.socket, raw).await
    }

    async fn get(&self, target: &str) -> Reply {
        self.send(&raw("GET", target, None, b"")).await
    }

    async fn post(&self, target: &str, body: &Value) -> Reply {
        let body = body.to_string();
        self.send(&raw(
            "POST",
            target,
            Some("application/json"),
            body.as_bytes(),
        ))
        .await
    }
}

/// One request on its own connection (`Connection: close`, so the reply ends at EOF).
fn raw(method: &str, target: &str, content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let content_type = content_type
        .map(|c| format!("Content-Type: {c}\r\n"))
        .unwrap_or_default();
    let length = if method == "GET" {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: lbd\r\nConnection: close\r\n{content_type}{length}\r\n"
    );
    [head.as_bytes(), body].concat()
}

/// Like [`raw`] with the body sent in 64 KiB chunks and no length up front.
fn raw_chunked(target: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "POST {target} HTTP/1.1\r\nHost: lbd\r\nConnection: close\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.chunks(64 << 10) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

async fn exchange(socket: &Path, raw: &[u8]) -> Reply {
    let work = async {
        let mut stream = UnixStream::connect(socket).await.unwrap();
        stream.write_all(raw).await.unwrap();
        read_reply(&mut stream).await
    };
    tokio::time::timeout(Duration::from_secs(20), work)
        .await
        .expect("no reply within 20 s")
}

async fn read_reply(stream: &mut UnixStream) -> Reply {
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.unwrap();
    Reply::parse(&bytes)
}

struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    fn parse(bytes: &[u8]) -> Self {
        let end = find(bytes, b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no reply head in {:?}", String::from_utf8_lossy(bytes)));
        let head = String::from_utf8(bytes[..end].to_vec()).unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let mut body = bytes[end + 4..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        Self { status, head, body }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then_some(value.trim())
        })
    }

    fn json<T: DeserializeOwned>(&self) -> T {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self}"
        );
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {self}"))
    }

    /// The message of an [`ErrorReply`], checked to be one.
    fn error(&self) -> String {
        assert!(!(200..300).contains(&self.status), "{self}");
        self.json::<ErrorReply>().error
    }

    /// The NDJSON lines of a flow wait.
    fn progress_lines(&self) -> Vec<FlowProgress> {
        assert_eq!(self.status, 200, "{self}");
        assert_eq!(self.header("content-type"), Some("application/x-ndjson"));
        let text = std::str::from_utf8(&self.body).unwrap();
        assert!(text.ends_with('\n'), "{self}");
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n\n{}",
            self.head,
            String::from_utf8_lossy(&self.body)
        )
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = find(data, b"\r\n").expect("chunk size line");
        let size = std::str::from_utf8(&data[..line]).unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        data = &data[line + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[tokio::test]
async fn a_good_change_is_applied() {
    let server = start("good", Fake::default(), TIMEOUTS);
    let changes = json!([
        {"op": "vip_add", "vip": VIP, "ring_size": 13},
        {"op": "backend_add", "vip": VIP, "address": DRAINING, "weight": 5},
    ]);

    let reply = server
        .post("/v1/changes", &json!({"changes": changes, "dry_run": true}))
        .await;
    assert_eq!(reply.status, 200, "{reply}");
    let dry: ChangeReply = reply.json();
    assert!(!dry.applied);
    assert_eq!(dry.changes.len(), 2);
    assert_eq!(
        server.state(),
        DesiredState::default(),
        "a dry run changed the state"
    );

    // No Content-Type: taken as JSON.
    let body = json!({ "changes": changes }).to_string();
    let reply = server
        .send(&raw("POST", "/v1/changes", None, body.as_bytes()))
        .await;
    assert_eq!(reply.status, 200, "{reply}");
    let done: ChangeReply = reply.json();
    assert!(done.applied);
    assert_eq!(done.changes, dry.changes);
    let state = server.state();
    let spec = state.vip(&vip_id()).expect("the VIP was added");
    assert_eq!(spec.ring_size, 13);
    assert_eq!(spec.backend(ip(DRAINING)).unwrap().weight, 5);

    let reply = server.get("/v1/state").await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.json::<StateReply>().vip, state.into_vips());
}

/// IPv6 VIPs (with backends of either family) and GUE through the API: added, shown in the
/// status, switched back to IPIP by an apply.
#[tokio::test]
async fn ipv6_vips_and_encap() {
    let server = start("ipv6-encap", Fake::default(), TIMEOUTS);
    let v6 = "[2001:db8::1]:443/tcp";
    let changes = json!([
        {"op": "vip_add", "vip": v6, "ring_size": 13, "encap": "gue"},
        {"op": "backend_add", "vip": v6, "address": "2001:db8:1::1"},
        {"op": "backend_add", "vip": v6, "address": DRAINING},
    ]);
    let reply = server
        .post("/v1/changes", &json!({ "changes": changes }))
        .await;
    assert_eq!(reply.status, 200, "{reply}");
    let id: VipId = v6.parse().unwrap();
    let state = server.state();
    let spec = state.vip(&id).expect("the IPv6 VIP was added");
    assert_eq!(spec.encap, crate::model::Encap::Gue);
    assert_eq!(spec.backends.len(), 2);
    let status: Status = server.get("/v1/status").await.json();
    assert_eq!(status.vips[0].vip, id);
    assert_eq!(status.vips[0].encap, crate::model::Encap::Gue);

    let wanted = json!([{"address": v6, "ring_size": 13, "encap": "ipip",
        "backends": [{"address": "2001:db8:1::1"}, {"address": DRAINING}]}]);
    let reply = server.post("/v1/apply", &json!({ "vip": wanted })).await;
    let done: ChangeReply = reply.json();
    let lines: Vec<String> = done.changes.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        ["~ vip [2001:db8::1]:443/tcp ring_size 13 hash 5tuple encap ipip"]
    );
    assert_eq!(
        server.state().vip(&id).unwrap().encap,
        crate::model::Encap::Ipip
    );
    let reply = server
        .post(
            "/v1/changes",
            &json!({"changes": [{"op": "vip_add", "vip": "[2001:db8::2]:80/tcp", "encap": "vxlan"}]}),
        )
        .await;
    assert_eq!(reply.status, 400, "{reply}");
    assert!(reply.error().contains("vxlan"), "{reply}");
}

#[tokio::test]
async fn refusals_name_the_problem_and_change_nothing() {
    let server = start("refusals", seeded(), TIMEOUTS);
    let before = server.state();
    let post = |body: &str| {
        raw(
            "POST",
            "/v1/changes",
            Some("application/json"),
            body.as_bytes(),
        )
    };
    let get = |target: &str| raw("GET", target, None, b"");
    let big = format!(r#"{{"changes": [], "pad": "{}"}}"#, "x".repeat(BODY_LIMIT));
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (post(r#"{"changes": ["#), 400, "EOF while parsing"),
        (post(r#"{"changes": []} x"#), 400, "trailing characters"),
        (post(" "), 400, "empty body"),
        (post(r#"{"changes": [], "force": true}"#), 400, "unknown field `force`"),
        (
            post(r#"{"changes": [{"op": "vip_add", "vip": "10.0.0.9:80/tcp", "port": 1}]}"#),
            400,
            "unknown field `port`",
        ),
        (
            post(r#"{"changes": [{"op": "vip_frob", "vip": "10.0.0.9:80/tcp"}]}"#),
            400,
            "changes[0].op: unknown variant `vip_frob`",
        ),
        (
            post(r#"{"changes": [{"op": "vip_del", "vip": "10.0.0.1:80/sctp"}]}"#),
            400,
            r#""10.0.0.1:80/sctp" is not a valid VIP"#,
        ),
        (
            post(r#"{"changes": [{"op": "backend_del", "vip": "10.0.0.1:80/tcp", "address": "10.1.0"}]}"#),
            400,
            "invalid IP address syntax",
        ),
        (
            post(r#"{"changes": [{"op": "backend_weight", "vip": "10.0.0.1:80/tcp", "address": "10.1.0.1", "weight": "x"}]}"#),
            400,
            "invalid type: string \"x\", expected u32",
        ),
        (post(r#"{"changes": "none"}"#), 400, "changes: invalid type: string"),
        (
            raw("POST", "/v1/changes", None, b"{\"changes\": [{\"op\": \"vip_del\", \"vip\": \"\xff\"}]}"),
            400,
            "invalid unicode",
        ),
        (
            raw("POST", "/v1/changes", Some("text/plain"), b"{\"changes\": []}"),
            415,
            "Content-Type must be application/json, not \"text/plain\"",
        ),
        (post(&big), 413, "larger than the limit of 1048576 bytes"),
        (raw_chunked("/v1/changes", big.as_bytes()), 413, "limit of 1048576 bytes"),
        (
            // Announced too large to read at all: refused on the headers.
            b"POST /v1/changes HTTP/1.1\r\nHost: lbd\r\nConnection: close\r\nContent-Length: 1000000000\r\n\r\n".to_vec(),
            413,
            "limit of 1048576 bytes",
        ),
        (
            raw("POST", "/v1/apply", Some("application/json"), br#"{"vips": []}"#),
            400,
            "unknown field `vips`",
        ),
        (get("/v1/nope"), 404, "no such endpoint: /v1/nope"),
        (get("/v1/changes"), 405, "GET /v1/changes is not allowed: use POST"),
        (raw("DELETE", "/v1/state", None, b""), 405, "use GET"),
        (get("/v1/status?idle=3"), 400, "query: idle: unknown field `idle`, expected `idle_timeout`"),
        (get("/v1/status?idle_timeout=soon"), 400, "query: idle_timeout: invalid digit"),
        (
            get("/v1/flows?vip=10.0.0.1:80/sctp&backend=10.1.0.1"),
            400,
            r#"query: vip: "10.0.0.1:80/sctp" is not a valid VIP"#,
        ),
        (get("/v1/flows?backend=10.1.0.1"), 400, "missing field `vip`"),
        (
            get("/v1/flows?vip=10.0.0.1:80/tcp&backend=10.1.0.1&wait=yes"),
            400,
            "query: wait: ",
        ),
    ];
    for (request, status, needle) in cases {
        let reply = server.send(&request).await;
        let what = String::from_utf8_lossy(&request[..request.len().min(200)]).into_owned();
        assert_eq!(reply.status, status, "{what}\n---\n{reply}");
        let error = reply.error();
        assert!(
            error.contains(needle),
            "{what}\n---\n{error:?} lacks {needle:?}"
        );
    }
    assert_eq!(
        server.state(),
        before,
        "a refused request changed the state"
    );
}

#[tokio::test]
async fn agent_refusals_keep_their_status() {
    let server = start("agent-refusals", seeded(), TIMEOUTS);
    let before = server.state();
    let cases = [
        (
            json!([{"op": "backend_add", "vip": "10.0.0.9:80/tcp", "address": "10.1.0.9"}]),
            404,
            r#"vip["10.0.0.9:80/tcp"]: no such VIP"#,
        ),
        (
            json!([{"op": "vip_add", "vip": VIP}]),
            409,
            r#"vip["10.0.0.1:80/tcp"]: already exists"#,
        ),
        // All or nothing: the first change is fine, the second is not.
        (
            json!([
                {"op": "backend_weight", "vip": VIP, "address": DRAINING, "weight": 1},
                {"op": "backend_weight", "vip": VIP, "address": STUCK, "weight": 65_536},
            ]),
            400,
            "weight: 65536 is out of range",
        ),
    ];
    for (changes, status, needle) in cases {
        let reply = server
            .post("/v1/changes", &json!({ "changes": changes }))
            .await;
        assert_eq!(reply.status, status, "{changes}\n---\n{reply}");
        let error = reply.error();
        assert!(error.contains(needle), "{error:?} lacks {needle:?}");
    }
    assert_eq!(server.state(), before);
}

#[tokio::test]
async fn status_and_apply() {
    let server = start("status-apply", seeded(), TIMEOUTS);
    let reply = server.get("/v1/status?idle_timeout=7").await;
    let status: Status = reply.json();
    assert_eq!(status.idle_timeout_secs, 7);
    assert_eq!(status.vips.len(), 1);
    assert_eq!(status.vips[0].backends.len(), 2);
    let status: Status = server.get("/v1/status").await.json();
    assert_eq!(status.idle_timeout_secs, DEFAULT_IDLE_TIMEOUT_SECS);

    let wanted = json!([{"address": VIP, "ring_size": 13, "backends": [{"address": DRAINING, "weight": 50}]}]);
    let before = server.state();
    let reply = server
        .post("/v1/apply", &json!({"vip": wanted, "dry_run": true}))
        .await;
    let dry: ChangeReply = reply.json();
    let lines: Vec<String> = dry.changes.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "- backend 10.0.0.1:80/tcp 10.1.0.2",
            "~ backend 10.0.0.1:80/tcp 10.1.0.1 weight 50"
        ]
    );
    assert!(!dry.applied);
    assert_eq!(server.state(), before);

    let reply = server.post("/v1/apply", &json!({ "vip": wanted })).await;
    let done: ChangeReply = reply.json();
    assert!(done.applied);
    let state = server.state();
    let spec = state.vip(&vip_id()).unwrap();
    assert_eq!(spec.backends.len(), 1);
    assert_eq!(spec.backend(ip(DRAINING)).unwrap().weight, 50);
}

fn flows_target(backend: &str, extra: &str) -> String {
    format!("/v1/flows?vip={VIP}&backend={backend}{extra}")
}

#[tokio::test]
async fn flows_once_and_for_an_unknown_backend() {
    let server = start("flows-once", seeded(), TIMEOUTS);
    let reply = server.get(&flows_target(DRAINING, "&idle_timeout=5")).await;
    let progress: FlowProgress = reply.json();
    assert_eq!(
        progress,
        FlowProgress {
            vip: vip_id(),
            backend: ip(DRAINING),
            flows: 3,
            done: false,
            error: None,
        }
    );
    // An unknown backend is refused before any stream starts.
    let reply = server.get(&flows_target("10.1.0.9", "&wait=true")).await;
    assert_eq!(reply.status, 404, "{reply}");
    assert!(reply.error().contains("no such backend"), "{reply}");
}

#[tokio::test]
async fn flows_wait_streams_until_done() {
    let server = start("flows-done", seeded(), TIMEOUTS);
    let started = Instant::now();
    let lines = server
        .get(&flows_target(DRAINING, "&wait=true"))
        .await
        .progress_lines();
    let counts: Vec<u64> = lines.iter().map(|p| p.flows).collect();
    assert_eq!(counts, [3, 2, 1, 0]);
    let done: Vec<bool> = lines.iter().map(|p| p.done).collect();
    assert_eq!(done, [false, false, false, true]);
    assert!(lines.iter().all(|p| p.error.is_none()));
    // One poll per FLOW_POLL_MS after the first line.
    assert!(started.elapsed() >= Duration::from_millis(3 * FLOW_POLL_MS));
}

#[tokio::test]
async fn flows_wait_times_out() {
    let server = start("flows-timeout", seeded(), TIMEOUTS);
    let started = Instant::now();
    let lines = server
        .get(&flows_target(STUCK, "&wait=true&timeout=1"))
        .await
        .progress_lines();
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    let (last, before) = lines.split_last().unwrap();
    assert!(before.len() >= 3, "{lines:?}");
    assert!(
        before
            .iter()
            .all(|p| p.flows == 7 && !p.done && p.error.is_none())
    );
    assert_eq!(
        last.error.as_deref(),
        Some("timed out after 1 s with 7 flows still live")
    );
    assert!(!last.done);
}

#[tokio::test]
async fn flows_wait_ends_when_the_backend_goes_away() {
    let server = start("flows-gone", seeded(), TIMEOUTS);
    let socket = server.socket.clone();
    let request = raw("GET", &flows_target(STUCK, "&wait=true"), None, b"");
    let wait = tokio::spawn(async move { exchange(&socket, &request).await });
    tokio::time::sleep(Duration::from_millis(2 * FLOW_POLL_MS + 100)).await;
    let del = json!({"changes": [{"op": "backend_del", "vip": VIP, "address": STUCK}]});
    assert_eq!(server.post("/v1/changes", &del).await.status, 200);

    let lines = wait.await.unwrap().progress_lines();
    let last = lines.last().unwrap();
    assert!(lines.len() >= 3, "{lines:?}");
    assert_eq!(last.flows, 7, "the last line keeps the last count");
    let error = last.error.as_deref().unwrap_or_default();
    assert!(error.contains("no such backend"), "{lines:?}");
}

#[tokio::test]
async fn a_stalled_client_does_not_block_others() {
    let timeouts = Timeouts {
        header: Duration::from_secs(2),
        body: Duration::from_secs(2),
        grace: Duration::from_secs(1),
    };
    let server = start("stalled", seeded(), timeouts);
    let started = Instant::now();
    let mut headless = UnixStream::connect(&server.socket).await.unwrap();
    headless.write_all(b"GET /v1/sta").await.unwrap();
    let mut bodyless = UnixStream::connect(&server.socket).await.unwrap();
    bodyless
        .write_all(b"POST /v1/changes HTTP/1.1\r\nHost: lbd\r\nContent-Length: 100\r\n\r\n{\"chan")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let reply = tokio::time::timeout(Duration::from_millis(1500), server.get("/v1/state"))
        .await
        .expect("a stalled client held up another one");
    assert_eq!(reply.status, 200, "{reply}");
    assert!(started.elapsed() < timeouts.header);

    // The stalled ones are cut off: no headers, no reply; half a body, 408.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), headless.read_to_end(&mut rest));
    read.await.expect("the header timeout closes").unwrap();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(started.elapsed() >= timeouts.header);
    let reply = tokio::time::timeout(Duration::from_secs(5), read_reply(&mut bodyless))
        .await
        .expect("the body timeout answers");
    assert_eq!(reply.status, 408, "{reply}");
    assert_eq!(reply.error(), "request body not received within 2 s");
}

#[tokio::test]
async fn an_absent_agent_is_503() {
    let (commands, requests) = mpsc::channel(1);
    drop(requests);
    let server = start_with("no-agent", commands, Arc::default(), TIMEOUTS);
    let reply = server.get("/v1/state").await;
    assert_eq!(reply.status, 503, "{reply}");
    assert!(reply.error().contains("shutting down"), "{reply}");
}

#[tokio::test]
async fn shutdown_ends_serve_within_the_grace_period() {
    let mut server = start("shutdown", seeded(), TIMEOUTS);
    // An idle connection and an endless wait must not hold the server up past the grace.
    let idle = UnixStream::connect(&server.socket).await.unwrap();
    let socket = server.socket.clone();
    let request = raw("GET", &flows_target(STUCK, "&wait=true"), None, b"");
    let mut waiting = UnixStream::connect(&socket).await.unwrap();
    waiting.write_all(&request).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    server.stop.take().unwrap().send(()).unwrap();
    let task = &mut server.task;
    let result = tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("serve did not return");
    result.unwrap().unwrap();
    assert!(
        started.elapsed() >= TIMEOUTS.grace,
        "the wait was not given its grace"
    );
    let mut rest = Vec::new();
    waiting.read_to_end(&mut rest).await.unwrap();
    assert!(
        UnixStream::connect(&socket).await.is_err(),
        "still accepting"
    );
    drop(idle);
}

#[tokio::test]
async fn bind_refuses_anything_but_a_dead_socket_of_ours() {
    let dir = TempDir::new("bind-refuse");
    let at = |name: &str| dir.0.join(name);
    fs::write(at("target"), "keep").unwrap();
    symlink(at("target"), at("link.sock")).unwrap();
    symlink(at("nowhere"), at("dangling.sock")).unwrap();
    fs::write(at("file.sock"), "keep").unwrap();
    fs::create_dir(at("dir.sock")).unwrap();
    let foreign = at("foreign.sock");
    drop(std::os::unix::net::UnixListener::bind(&foreign).unwrap());
    // We run as root: give it to nobody.
    std::os::unix::fs::lchown(&foreign, Some(65_534), None).unwrap();

    for (name, want) in [
        ("link.sock", "it is a symlink"),
        ("dangling.sock", "it is a symlink"),
        ("file.sock", "it exists and is not a socket"),
        ("dir.sock", "it exists and is not a socket"),
        ("foreign.sock", "it is owned by uid 65534"),
    ] {
        let path = at(name);
        let e = bind(&path, None).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains(want), "{e}");
    }
    assert_eq!(fs::read_to_string(at("target")).unwrap(), "keep");
    assert_eq!(fs::read_to_string(at("file.sock")).unwrap(), "keep");
    assert!(!at("nowhere").exists(), "bind followed a dangling link");
    assert!(
        fs::symlink_metadata(&foreign)
            .unwrap()
            .file_type()
            .is_socket()
    );

    let e = bind(&at("new.sock"), Some("lb-no-such-group")).unwrap_err();
    assert!(matches!(e, ServerError::UnknownGroup { .. }), "{e}");
    assert!(!at("new.sock").exists(), "a refused bind left a socket");
}

#[tokio::test]
async fn bind_sets_the_mode_and_replaces_a_stale_socket() {
    let dir = TempDir::new("bind-mode");
    let socket = dir.0.join("run/lb/lbd.sock");
    let listener = bind(&socket, None).unwrap();
    let meta = fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o7777, 0o660);
    assert_eq!(meta.uid(), euid());
    assert!(fs::metadata(dir.0.join("run/lb")).unwrap().is_dir());

    // Live: a second bind refuses and leaves it working.
    let e = bind(&socket, None).unwrap_err();
    assert!(matches!(e, ServerError::InUse { .. }), "{e}");
    let client = UnixStream::connect(&socket).await.unwrap();
    let accepted = listener.accept().await;
    accepted.unwrap();
    drop(client);

    // Stale: lbd went away and left its socket; the next bind replaces it.
    drop(listener);
    assert!(fs::symlink_metadata(&socket).is_ok());
    let listener = bind(&socket, Some("nogroup")).unwrap();
    let meta = fs::symlink_metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o660);
    assert_eq!(meta.gid(), group_id("nogroup").unwrap());
    assert_ne!(meta.gid(), 0);
    let client = UnixStream::connect(&socket).await.unwrap();
    listener.accept().await.unwrap();
    drop(client);
    assert_eq!(group_id("root").unwrap(), 0);
}

#[tokio::test]
async fn stats_and_the_debug_switch() {
    let server = start("stats", seeded(), TIMEOUTS);
    let reply = server.get("/v1/stats?idle_timeout=5").await;
    let stats: Stats = reply.json();
    assert_eq!(stats.idle_timeout_secs, 5);
    assert_eq!(stats.vips[0].backends.len(), 2);
    assert_eq!(stats.vips[0].backends[0].traffic.packets, 5);

    let reply = server.get("/v1/debug").await;
    assert_eq!(reply.json::<Debug>(), Debug { data_plane: false });
    let put = |body: &str| {
        raw(
            "PUT",
            "/v1/debug",
            Some("application/json"),
            body.as_bytes(),
        )
    };
    let reply = server.send(&put(r#"{"data_plane":true}"#)).await;
    assert_eq!(reply.json::<Debug>(), Debug { data_plane: true });
    assert!(server.fake.lock().unwrap().debug);
    // Refusals name the field and leave the switch as it was.
    for (body, needle) in [
        (r#"{"data_plane":"yes"}"#, "data_plane"),
        (r#"{"data_plane":false,"verbose":1}"#, "verbose"),
        (r"{}", "data_plane"),
    ] {
        let reply = server.send(&put(body)).await;
        assert_eq!(reply.status, 400, "{body}: {reply}");
        assert!(reply.error().contains(needle), "{body}: {reply}");
    }
    assert!(server.fake.lock().unwrap().debug);
    let reply = server
        .post("/v1/debug", &serde_json::json!({"data_plane": false}))
        .await;
    assert_eq!(reply.status, 405, "{reply}");
}

#[tokio::test]
async fn bind_refuses_a_folder_others_control() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("bind-folder");
    let make = |name: &str, mode: u32, owner: Option<u32>| {
        let folder = dir.0.join(name);
        fs::create_dir(&folder).unwrap();
        fs::set_permissions(&folder, fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&folder, owner, None).unwrap();
        folder.join("lbd.sock")
    };
    // We run as root: nobody's folder is another user's.
    let foreign = make("foreign", 0o755, Some(65_534));
    let open = make("open", 0o777, None);
    let group = make("group", 0o775, None);
    for (path, want) in [
        (
            &foreign,
            "is owned by uid 65534, not by lbd (uid 0) or root",
        ),
        (&open, "(mode 0777) is writable by other users"),
        (&group, "(mode 0775) is writable by other users"),
    ] {
        let e = bind(path, None).unwrap_err();
        assert!(
            matches!(
                e,
                ServerError::FolderNotOurs { .. } | ServerError::FolderWritable { .. }
            ),
            "{e}"
        );
        let e = e.to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(
            e.contains(&path.parent().unwrap().display().to_string()),
            "{e}"
        );
        assert!(e.contains(want), "{e}");
        assert!(!path.exists(), "a refused bind left a socket");
    }
    // Through a link, the folder it points to counts.
    symlink(foreign.parent().unwrap(), dir.0.join("via-link")).unwrap();
    let e = bind(&dir.0.join("via-link/lbd.sock"), None).unwrap_err();
    assert!(matches!(e, ServerError::FolderNotOurs { .. }), "{e}");

    // Sticky, like /tmp: others cannot touch our entry, so it is fine.
    let sticky = make("sticky", 0o1777, None);
    let listener = bind(&sticky, None).unwrap();
    assert_eq!(
        fs::symlink_metadata(&sticky).unwrap().mode() & 0o7777,
        0o660
    );
    drop(listener);
}

#[tokio::test]
async fn framing_and_nesting_errors_name_the_problem() {
    let server = start("framing", seeded(), TIMEOUTS);
    let before = server.state();
    let head = "POST /v1/changes HTTP/1.1\r\nHost: lbd\r\nConnection: close\r\n\
                Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            format!("{head}zz\r\n{{}}\r\n0\r\n\r\n").into_bytes(),
            "invalid chunk size",
        ),
        (
            format!("{head}2\r\n{{}}XX0\r\n\r\n").into_bytes(),
            "invalid chunk body cr",
        ),
        (
            format!("{head}fffffffffffffffffff\r\n").into_bytes(),
            "chunk size",
        ),
        (
            raw(
                "POST",
                "/v1/changes",
                Some("application/json"),
                // `op` comes last: serde buffers the whole change (a tagged enum) before it
                // can pick the variant, and only serde_json's depth limit stops the recursion.
                format!(r#"{{"changes": [{{"vip": {nested}, "op": "vip_add"}}]}}"#).as_bytes(),
            ),
            "recursion limit exceeded",
        ),
        (
            raw("POST", "/v1/apply", None, nested.as_bytes()),
            "expected a json object, got an array",
        ),
        // serde takes a struct as the array of its fields too: `[]` would be an apply of
        // nothing, removing every VIP.
        (
            raw("POST", "/v1/apply", None, b" []"),
            "expected a json object, got an array",
        ),
        (
            raw("PUT", "/v1/debug", None, b"[true]"),
            "expected a json object, got an array",
        ),
        (
            raw("POST", "/v1/changes", None, b"nul"),
            "expected a json object, got \"nul\"",
        ),
    ];
    for (request, needle) in cases {
        let reply = server.send(&request).await;
        let what = String::from_utf8_lossy(&request[..request.len().min(200)]).into_owned();
        assert_eq!(reply.status, 400, "{what}\n---\n{reply}");
        let error = reply.error();
        assert!(
            error.to_lowercase().contains(needle),
            "{what}\n---\n{error:?} lacks {needle:?}"
        );
    }
    assert_eq!(server.state(), before);
}
