//! Builds the eBPF objects (lb-ebpf) for bpfel-unknown-none with the nightly toolchain and
//! bpf-linker, and hands them to `include_bytes_aligned!` through `OUT_DIR`: `bpf-balancer` (the
//! balancer and its maps), `bpf-decap` (backend-side programs and their one map) and `bpf-bench`
//! (the benchmark's reset program). Set `LB_EBPF_DIR=/path/to/folder` (holding all three) to
//! embed prebuilt objects.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
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
        build(&root, &target_dir, bin, feature);
        let built = target_dir.join("bpfel-unknown-none/release").join(bin);
        copy(&built, &out_dir.join(format!("{bin}.o")));
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
}

/// Each object is its own build with only its own feature: a map static in the lib is an
/// exported symbol that bpf-linker keeps in every bin linking the lib.
fn build(root: &Path, target_dir: &Path, bin: &str, feature: &str) {
    let mut cmd = Command::new("rustup");
    // `cargo rustc` so the linker argument goes to the final link only.
    cmd.args(["run", "nightly", "cargo", "rustc", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--manifest-path")
        .arg(root.join("lb-ebpf/Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .args(["--no-default-features", "--features", feature, "--bin", bin])
        .arg("--")
        // bpf-linker's default (--bpf-expand-memcpy-in-order) turns every small memset, such as
        // zeroing a map key's padding, into a call to a byte loop in .text; without it LLVM
        // emits plain stores.
        .args(["-C", "link-arg=--disable-expand-memcpy-in-order"])
        // BPF ISA v3 (ALU32, JMP32; kernel 5.1+). Verifier workaround: with the generic CPU,
        // LLVM may zero-extend the u32 `ctx->data` with `<<= 32; >>= 32`, and the verifier
        // rejects shifts on packet pointers ("pointer arithmetic with <<= operator prohibited").
        .args(["-C", "target-cpu=v3"]);
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
    let output = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run rustup to build lb-ebpf ({e}); run `cargo xtask setup`")
    });
    assert!(
        output.status.success(),
        "building {bin} from lb-ebpf failed (run `cargo xtask setup` if the nightly toolchain, \
         rust-src or bpf-linker is missing):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
