//! End to end through the real XDP program: a client, a gateway running lbd, three backends
//! decapsulating with `lb_decap`, real TCP connections to the VIP. One-arm (`XDP_TX` back out of the
//! ingress interface) and two-arm (devmap redirect to the backends' interface), each in native
//! and in generic XDP mode.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use lb_tests::{
    lb::ServedTopology,
    netns::topology::Topology,
    traffic::{download, upload, who},
};
use lb_userspace::dataplane::kernel::AttachMode;

// The issue asks for at least 300; 600 keeps the 70%..130% band about 5 sigma wide, so a fair
// hash does not flake.
const CONNECTIONS: usize = 600;
const TEN_MB: u64 = 10 * 1024 * 1024;
const PORT: u16 = 80;

fn balance_and_integrity(label: &str, two_arm: bool, mode: AttachMode) {
    let builder = if two_arm {
        Topology::two_arm(label)
    } else {
        Topology::one_arm(label)
    };
    let bed = ServedTopology::build(builder.backends(3), mode, PORT).expect("topology");
    let (topo, servers) = (&bed.topo, &bed.servers);
    let vip = IpAddr::V4(topo.vip);
    let lbd = bed.start_lbd().expect("lbd");

    let target = SocketAddr::new(vip, PORT);
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..CONNECTIONS {
        let name = who(&topo.client.ns, target).unwrap_or_else(|e| {
            panic!("connection {i} to {target}: {e:#}\nlbd log:\n{}", lbd.log())
        });
        *per_backend.entry(name).or_default() += 1;
    }
    let even = CONNECTIONS as f64 / servers.len() as f64;
    for s in servers {
        let got = per_backend.get(s.name()).copied().unwrap_or(0);
        assert!(
            (0.7 * even..=1.3 * even).contains(&(got as f64)),
            "{label}: {} got {got} of {CONNECTIONS} connections (allowed 70%..130% of {even}): {per_backend:?}",
            s.name()
        );
    }
    assert_eq!(per_backend.values().sum::<usize>(), CONNECTIONS);
    assert_eq!(
        per_backend.len(),
        servers.len(),
        "answers from unknown names: {per_backend:?}"
    );

    download(&topo.client.ns, target, TEN_MB)
        .unwrap_or_else(|e| panic!("{label}: 10 MB download: {e:#}"));
    upload(&topo.client.ns, target, TEN_MB)
        .unwrap_or_else(|e| panic!("{label}: 10 MB upload: {e:#}"));
    eprintln!("{label}: {per_backend:?}; 10 MB each way intact");
}

#[test]
fn one_arm_native() {
    balance_and_integrity("e2e1n", false, AttachMode::Native);
}

#[test]
fn one_arm_generic() {
    balance_and_integrity("e2e1g", false, AttachMode::Generic);
}

#[test]
fn two_arm_native() {
    balance_and_integrity("e2e2n", true, AttachMode::Native);
}

#[test]
fn two_arm_generic() {
    balance_and_integrity("e2e2g", true, AttachMode::Generic);
}
