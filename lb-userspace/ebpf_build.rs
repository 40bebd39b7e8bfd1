//! Builds one lb-ebpf object for bpfel-unknown-none with the nightly toolchain and bpf-linker.
//! Shared (through `#[path]`) by lb-userspace's build.rs, which embeds lbd's objects, and by
//! xtask, which builds the benchmark's knock-out variants: one command line for both.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Builds `bin` with only `features` (comma-separated) into `target_dir` and returns the path
/// of the object, or cargo's error output. Each object is its own build with only its own
/// features: a map static in the lib is an exported symbol that bpf-linker keeps in every bin
/// linking the lib.
pub fn build(root: &Path, target_dir: &Path, bin: &str, features: &str) -> Result<PathBuf, String> {
    let mut cmd = Command::new("rustup");
    // `cargo rustc` so the linker argument goes to the final link only.
    cmd.args(["run", "nightly", "cargo", "rustc", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--manifest-path")
        .arg(root.join("lb-ebpf/Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .args([
            "--no-default-features",
            "--features",
            features,
            "--bin",
            bin,
        ])
        .arg("--")
        // bpf-linker's default (--bpf-expand-memcpy-in-order) turns every small memset, such as
        // zeroing a map key's padding, into a call to a byte loop in .text; without it LLVM
        // emits plain stores.
        .args(["-C", "link-arg=--disable-expand-memcpy-in-order"])
        // BPF ISA v3 (ALU32, JMP32; kernel 5.1+). Verifier workaround: with the generic CPU,
        // LLVM may zero-extend the u32 `ctx->data` with `<<= 32; >>= 32`, and the verifier
        // rejects shifts on packet pointers ("pointer arithmetic with <<= operator prohibited").
        .args(["-C", "target-cpu=v3"]);
    // An outer cargo (and clippy) sets these for the host toolchain; the nested build must not
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
    let output = cmd.output().map_err(|e| {
        format!("cannot run rustup to build lb-ebpf ({e}); run `cargo xtask setup`")
    })?;
    if !output.status.success() {
        return Err(format!(
            "building {bin} (features {features}) from lb-ebpf failed (run `cargo xtask setup` \
             if the nightly toolchain, rust-src or bpf-linker is missing):\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(target_dir.join("bpfel-unknown-none/release").join(bin))
}
