//! Builds the eBPF programs (lb-ebpf) for bpfel-unknown-none with the nightly toolchain and
//! bpf-linker, and hands the object to `include_bytes_aligned!` through OUT_DIR. Set
//! `LB_EBPF_OBJECT=/path/to/object` to embed a prebuilt object instead.

use std::{env, path::PathBuf, process::Command};

fn main() {
    println!("cargo:rerun-if-env-changed=LB_EBPF_OBJECT");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("lb-ebpf.o");
    if let Some(prebuilt) = env::var_os("LB_EBPF_OBJECT") {
        std::fs::copy(&prebuilt, &out).unwrap_or_else(|e| {
            panic!("LB_EBPF_OBJECT={}: {e}", PathBuf::from(&prebuilt).display())
        });
        return;
    }

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let root = manifest_dir.parent().expect("workspace root").to_path_buf();
    for watched in ["lb-ebpf/src", "lb-ebpf/Cargo.toml", "lb-common/src", "lb-common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    // A target dir of its own: the outer build holds the lock on its own profile directory, and
    // sharing one across debug/release/clippy builds keeps the (slow) build-std work cached.
    let target_dir = root.join("target").join("ebpf");

    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--manifest-path")
        .arg(root.join("lb-ebpf/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer cargo (and clippy) set these for the host toolchain; the nested build must not
    // inherit them.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run rustup to build lb-ebpf ({e}); run `cargo xtask setup`"));
    if !output.status.success() {
        panic!(
            "building lb-ebpf failed (run `cargo xtask setup` if the nightly toolchain, rust-src or \
             bpf-linker is missing):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release/lb-ebpf");
    std::fs::copy(&built, &out).unwrap_or_else(|e| panic!("{}: {e}", built.display()));
}
