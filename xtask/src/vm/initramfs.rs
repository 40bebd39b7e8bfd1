//! The guest's initramfs, written as a newc cpio archive directly (no cpio tool, nothing
//! root-owned or device nodes created on the host): busybox, vm/init, and the modules needed to
//! mount the host's filesystem over 9p under an overlay. Everything else comes from the host over 9p.

use std::{fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result};

use super::kernel::{Kernel, read_module};

/// Modules /init loads (with their dependencies) before it can mount the host's root.
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// Writes `<kernel dir>/initramfs.cpio` for `kernel`, from `busybox` and the repository's
/// vm/init. Rebuilt on every run: it takes well under a second.
pub fn build(kernel: &Kernel, busybox: &Path, init: &Path) -> Result<std::path::PathBuf> {
    let mut cpio = Cpio::default();
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "newroot",
        "lower",
        "upper",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's stdio before anything is mounted.
    cpio.char_device("dev/console", 5, 1);
    let init_text = fs::read(init).with_context(|| format!("reading {}", init.display()))?;
    cpio.file("init", 0o755, &init_text);
    let busybox_bin =
        fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    cpio.file("bin/busybox", 0o755, &busybox_bin);

    let modules = kernel.module_closure(BOOT_MODULES)?;
    let base = kernel.modules.join(&kernel.release);
    let mut order = String::new();
    for module in &modules {
        let plain = read_module(&base.join(module))?;
        let file = module.rsplit('/').next().unwrap_or(module);
        let name = file.split(".ko").next().unwrap_or(file);
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &plain);
        writeln!(order, "/lib/modules/{name}.ko").expect("writing to a String");
    }
    cpio.file("lib/modules/load-order", 0o644, order.as_bytes());

    let path = kernel.dir().join("initramfs.cpio");
    fs::write(&path, cpio.finish()).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A newc ("070701") archive being built in memory.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    next_inode: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 2, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, 1, (0, 0), data);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, 1, (major, minor), &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_inode += 1;
        let size = u32::try_from(data.len()).expect("initramfs files are under 4 GiB");
        let name_size = u32::try_from(name.len() + 1).expect("short names");
        let fields = [
            self.next_inode,
            mode,
            0, // uid: root in the guest
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name_size,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::Cpio;

    #[test]
    fn newc_entries_are_aligned_and_terminated() {
        let mut cpio = Cpio::default();
        cpio.dir("bin");
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        let out = cpio.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        // 110-byte header + "bin\0" = 114, padded to 116.
        assert_eq!(&out[116..122], b"070701");
        let tail = String::from_utf8_lossy(&out[out.len() - 16..]).into_owned();
        assert!(tail.contains("TRAILER!!!"), "{tail:?}");
    }
}
