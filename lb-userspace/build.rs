//! Builds the eBPF objects (lb-ebpf, see `ebpf_build.rs`) and hands them to
//! `include_bytes_aligned!` through `OUT_DIR`: `bpf-balancer` (the balancer and its maps),
//! `bpf-decap` (backend-side programs and their one map) and `bpf-bench` (the benchmark's reset
//! program). Set `LB_EBPF_DIR=/path/to/folder` (holding all three) to
//! embed prebuilt objects.

mod ebpf_build;

use std::{
    env,
    path::{Path, PathBuf},
};

/// (bin target, cargo feature that gives it its maps and stages).
const OBJECTS: [(&str, &str); 3] = [
    ("bpf-balancer", "balancer"),
    ("bpf-decap", "decap"),
    ("bpf-bench", "bench"),
];

fn main() {
    println!("cargo:rerun-if-env-changed=LB_EBPF_DIR");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    if let Some(prebuilt) = env::var_os("LB_EBPF_DIR") {
        let prebuilt = PathBuf::from(prebuilt);
        for (bin, _) in OBJECTS {
            copy(&prebuilt.join(bin), &out_dir.join(format!("{bin}.o")));
            println!("cargo:rerun-if-changed={}", prebuilt.join(bin).display());
        }
        return;
    }

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let root = manifest_dir.parent().expect("workspace root").to_path_buf();
    for watched in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-common/src",
        "lb-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    // A target dir of its own: the outer build holds the lock on its own profile directory, and
    // sharing one across debug/release/clippy builds keeps the (slow) build-std work cached.
    let target_dir = root.join("target").join("ebpf");
    for (bin, feature) in OBJECTS {
        let built =
            ebpf_build::build(&root, &target_dir, bin, feature).unwrap_or_else(|e| panic!("{e}"));
        copy(&built, &out_dir.join(format!("{bin}.o")));
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
}
