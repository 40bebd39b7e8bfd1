//! `cargo xtask demo`: a guided run of the load balancer in namespaces (not written yet).

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("demo not yet implemented");
    ExitCode::FAILURE
}
