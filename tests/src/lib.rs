//! Test support: namespace topologies, traffic generators, program test-run fixtures.
