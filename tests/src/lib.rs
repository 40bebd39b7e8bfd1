//! Test support: namespace topologies, traffic generators, program test-run fixtures.

pub mod lb;
pub mod netns;
pub mod packet;
pub mod traffic;
