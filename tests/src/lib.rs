//! Test support: namespace topologies, traffic generators, program test-run fixtures.

pub mod balancer;
pub mod bench;
pub mod bpf;
pub mod browser;
pub mod chatter;
pub mod fuzz;
pub mod lb;
pub mod lbctl;
pub mod netns;
pub mod nft;
pub mod packet;
pub mod packet_socket;
pub mod rng;
pub mod traffic;
