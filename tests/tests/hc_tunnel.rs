//! Health checks through the tunnel, end to end in a one-arm topology: the gateway runs
//! `lb_xdp` and `lb_hc_encap` (tc egress) on the maps reconcile filled; backend1 decapsulates with
//! `lb_decap`, backend2 has no decapsulation at all (both hold the VIP on `lo` and run a server).
//! A TCP connect from the gateway to VIP:port with `SO_MARK = hc_mark(slot)` reaches backend1
//! through its slot's tunnel and gets its answer directly; through backend2's slot it gets none,
//! although a direct connect to backend2 works. The link survives an upgrade and a reload
//! (adopted from its pin), and a backend marked down by its checks is still checked through its
//! tunnel (so it can come back). Needs root; skips otherwise.
//!
//! The gateway needs a route to the VIP out of the interface running `lb_hc_encap`, via a next
//! hop that answers ARP (here the client, standing in for the upstream router): a bare
//! `VIP/32 dev eth0` route would have the kernel ask ARP for the VIP, which no backend answers
//! (`arp_ignore`), and the SYN would wait on the neighbour entry and never reach tc egress.

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use lb_common::{
    VipKey,
    keys::{PROTO_TCP, SLOT_ACTIVE, SLOT_DOWN, SLOT_FREE, SLOT_RETIRED, wire_addr},
    maps::hc_mark,
};
use lb_tests::{
    bpf::{self, PinDir},
    netns::{Netns, topology::Topology},
    traffic::{Server, who},
};
use lb_userspace::{
    config::Settings,
    dataplane::{
        DataPlane as _,
        decap::attach_decap,
        kernel::{self, AttachMode, Attached, KernelDataPlane, LoadOptions},
    },
    reconcile::{BackendPlan, Egress, Reconciler, Tunnel, VipPlan},
};

const PORT: u16 = 80;
const RING_SIZE: u32 = 251;
/// A working tunnel answers within milliseconds; a broken one never does.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

fn is_root() -> bool {
    bpf::is_root("namespaces, BPF")
}

/// Connects to `addr` from a socket marked `mark` within `timeout`, asks `WHO` and returns the
/// server's name: what a TCP health check through the tunnel does, plus the answer's origin.
fn marked_who(addr: SocketAddrV4, mark: u32, timeout: Duration) -> io::Result<String> {
    let mut stream = connect_marked(addr, mark, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"WHO\n")?;
    let mut reply = String::new();
    stream.take(256).read_to_string(&mut reply)?;
    reply
        .strip_suffix('\n')
        .map(str::to_owned)
        .ok_or_else(|| io::Error::other(format!("WHO reply {reply:?}")))
}

fn check(ret: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(ret)
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: fd is open; the option value is a c_int of the size passed.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(ret, "setsockopt").map(drop)
}

/// A non-blocking connect with `SO_MARK` set first, bounded by `timeout`.
fn connect_marked(addr: SocketAddrV4, mark: u32, timeout: Duration) -> io::Result<TcpStream> {
    // SAFETY: plain socket(2) call; the descriptor is owned right away.
    let fd = check(
        unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        },
        "socket",
    )?;
    // SAFETY: fd was just returned by socket(2) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)?;
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sin is a valid sockaddr_in of the size passed.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = timeout.as_millis() as libc::c_int;
        // SAFETY: one valid pollfd.
        if check(unsafe { libc::poll(&raw mut pfd, 1, ms) }, "poll")? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer from {addr} within {timeout:?}"),
            ));
        }
        let mut err: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: err and len are valid out-parameters of the sizes given.
        check(
            unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    (&raw mut err).cast(),
                    &raw mut len,
                )
            },
            "getsockopt",
        )?;
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// The slot reconcile gave `addr` (for the test's one VIP) and its state.
fn slot_of(dp: &KernelDataPlane, addr: Ipv4Addr) -> (u32, u8) {
    let wire = wire_addr(IpAddr::V4(addr)).0;
    let slots = dp.backends().expect("reading LB_BACKENDS");
    let index = slots
        .iter()
        .position(|s| s.state != SLOT_FREE && s.state != SLOT_RETIRED && s.addr == wire)
        .unwrap_or_else(|| panic!("no slot for {addr}"));
    (index as u32, slots[index].state)
}

/// Loads the data plane on `pins` in the gateway's namespace (adopting what is pinned), brings
/// it to `plan`, attaches `lb_xdp` and `lb_hc_encap` to eth0 and returns the slots of `backends`
/// (in order, with their states) and how the health-check link was attached.
fn gateway(
    ns: &Netns,
    pins: &PinDir,
    mode: AttachMode,
    plan: &VipPlan,
    backends: &[Ipv4Addr],
) -> (Vec<(u32, u8)>, Attached) {
    ns.run(|| {
        let mut dp = KernelDataPlane::load(&LoadOptions {
            pin_dir: pins.path().to_path_buf(),
            flow_table_size: 4096,
            ring_pool_size: 4096,
        })
        .unwrap_or_else(|e| panic!("loading the data plane: {e}"));
        dp.set_config(&Settings::default().global_config())
            .expect("set_config");
        let mut rec = Reconciler::adopt(&dp, Duration::from_millis(50)).expect("adopt");
        rec.apply(&mut dp, std::slice::from_ref(plan))
            .unwrap_or_else(|e| panic!("apply: {e}"));
        dp.attach("eth0", mode)
            .unwrap_or_else(|e| panic!("attaching lb_xdp: {e}"));
        let attached = dp
            .attach_hc("eth0")
            .unwrap_or_else(|e| panic!("attaching lb_hc_encap: {e}"));
        let slots = backends.iter().map(|b| slot_of(&dp, *b)).collect();
        (slots, attached)
    })
}

/// The topology's VIP on `PORT`/tcp over both backends, healthy, out of the gateway's eth0.
fn plan(topo: &Topology) -> VipPlan {
    let gw = topo.gw();
    let ifindex = gw.ns.ifindex("eth0").expect("gateway eth0 ifindex");
    VipPlan {
        key: VipKey::new(IpAddr::V4(topo.vip), PORT, PROTO_TCP),
        flags: 0,
        tunnel: Tunnel::Ipip,
        ring_size: RING_SIZE,
        backends: topo
            .backends
            .iter()
            .map(|b| BackendPlan {
                addr: IpAddr::V4(b.ip()),
                weight: 1,
                egress: Some(Egress {
                    ifindex,
                    src_mac: gw.front.mac,
                    dst_mac: b.eth0.mac,
                }),
                healthy: true,
            })
            .collect(),
    }
}

/// Checks from the gateway through each backend's tunnel: backend1's answers (from backend1),
/// backend2's gets no answer.
fn expect_checks(topo: &Topology, slots: [u32; 2], when: &str) {
    let (gw, be1) = (topo.gw(), &topo.backends[0]);
    let target = SocketAddrV4::new(topo.vip, PORT);
    let answer = gw
        .ns
        .run(|| marked_who(target, hc_mark(slots[0]), CHECK_TIMEOUT));
    assert_eq!(
        answer.unwrap_or_else(|e| panic!("{when}: check through backend1's tunnel: {e}")),
        be1.name,
        "{when}: the tunnel of backend1's slot leads to backend1"
    );
    let started = Instant::now();
    let answer = gw
        .ns
        .run(|| marked_who(target, hc_mark(slots[1]), CHECK_TIMEOUT));
    match answer {
        Ok(name) => panic!("{when}: backend2 cannot decapsulate, yet its check reached {name}"),
        Err(e) => eprintln!(
            "{when}: backend2 through its tunnel: {e} after {:?}",
            started.elapsed()
        ),
    }
}

fn tunnel_checks(label: &str, mode: AttachMode) {
    if !is_root() {
        return;
    }
    let topo = Topology::one_arm(label)
        .backends(2)
        .build()
        .expect("topology");
    let (be1, be2) = (&topo.backends[0], &topo.backends[1]);
    let vip = topo.vip;
    // Only backend1 can decapsulate.
    let iface = vec![be1.eth0.name.clone()];
    let _decap = be1
        .ns
        .run(|| attach_decap(&iface, mode, &[IpAddr::V4(vip)]))
        .expect("lb_decap on backend1");
    let _servers: Vec<Server> = [be1, be2]
        .iter()
        .map(|b| Server::start(&b.ns, &b.name, PORT).expect("backend server"))
        .collect();

    let gw = topo.gw();
    let plan = plan(&topo);
    let pins = PinDir::new(label);
    let (slots, attached) = gateway(&gw.ns, &pins, mode, &plan, &[be1.ip(), be2.ip()]);
    assert_eq!(attached, Attached::New);
    assert_eq!([slots[0].1, slots[1].1], [SLOT_ACTIVE; 2]);
    let slots = [slots[0].0, slots[1].0];
    assert!(
        pins.path().join("hc-links/eth0").exists(),
        "health-check link pinned"
    );
    // The deployment requirement: a route to the VIP out of eth0 via a next hop that resolves.
    gw.ns
        .ip([
            "route",
            "add",
            &format!("{vip}/32"),
            "via",
            &topo.client.ip().to_string(),
            "dev",
            "eth0",
        ])
        .expect("gateway route to the VIP");

    expect_checks(&topo, slots, "fresh");
    // A direct check of backend2 would pass: only its tunnel is broken.
    let direct = std::net::SocketAddr::new(IpAddr::V4(be2.ip()), PORT);
    assert_eq!(
        who(&gw.ns, direct).expect("direct connect to backend2"),
        be2.name
    );

    // lbd upgrade replaces the program inside the health-check link too.
    let upgraded = kernel::upgrade(pins.path()).expect("upgrade");
    assert_eq!(upgraded, ["eth0", "hc:eth0"]);
    expect_checks(&topo, slots, "after upgrade");

    // lbd restarting, with both backends now down by their checks: the pinned link is adopted,
    // and a down backend is still checked through its tunnel, so it can come back.
    let mut down = plan.clone();
    for b in &mut down.backends {
        b.healthy = false;
    }
    let (now, attached) = gateway(&gw.ns, &pins, mode, &down, &[be1.ip(), be2.ip()]);
    assert_eq!(attached, Attached::Adopted, "the pinned link adopted");
    assert_eq!(
        now,
        [(slots[0], SLOT_DOWN), (slots[1], SLOT_DOWN)],
        "same slots, down"
    );
    expect_checks(&topo, slots, "down, after adoption");
}

#[test]
fn tunnel_checks_generic() {
    tunnel_checks("hct-g", AttachMode::Generic);
}

#[test]
fn tunnel_checks_native() {
    tunnel_checks("hct-n", AttachMode::Native);
}
