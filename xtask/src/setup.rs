//! `cargo xtask setup`: installs what building and testing need. Every step checks before it
//! acts, so a second run changes nothing and takes well under a second.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::util::{describe, is_root, output, probe, run};

/// Debian packages the integration tests, the demo and the docs' examples call.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "nftables",
    "bpftool",
    "xdp-tools",
    "curl",
    "tcpdump",
    // The status-page test loads the page in headless Chromium (screenshot and DOM).
    "chromium",
];
/// Debian packages only `cargo xtask vm` needs: the emulator, kmod (the guest runs the host's
/// userspace, whose `modprobe` and `depmod` load and index the guest kernel's modules), and the
/// decompressors for kernel images and modules.
/// What `cargo xtask vm` needs besides qemu: the host's modprobe for the guest's modules, and
/// the kernel packages' compressions.
const VM_TOOLS: &[&str] = &["kmod", "xz-utils", "zstd"];
const QEMU: &str = "qemu-system-x86";
const BPF_LINKER_VERSION: &str = "0.13";
const BPFFS: &str = "/sys/fs/bpf";

#[derive(clap::Args, Debug, Default)]
pub struct SetupArgs {
    /// Reinstall bpf-linker even when a working 0.13 is found.
    #[arg(long)]
    pub reinstall_bpf_linker: bool,
    /// Install bpf-linker under this root (`cargo install --root`) instead of ~/.cargo.
    #[arg(long, value_name = "DIR", hide = true)]
    pub bpf_linker_root: Option<PathBuf>,
}

pub fn setup(args: &SetupArgs) -> Result<()> {
    apt_packages()?;
    nightly_toolchain()?;
    rust_src()?;
    bpf_linker(args)?;
    bpffs()?;
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root: run `cargo xtask setup` as root (or do this step by hand)");
    }
    Ok(())
}

fn apt_packages() -> Result<()> {
    install_missing(APT_PACKAGES, &[])
}

/// What `cargo xtask vm` needs on top of `setup` (not installed by `setup` itself: `test` must
/// not pull in an emulator). `--no-remove`: a qemu-utils from backports conflicts with
/// bookworm's qemu-system-x86, and apt must then stop rather than remove it.
pub fn vm_packages() -> Result<()> {
    install_missing(VM_TOOLS, &[])?;
    if not_installed(&[QEMU]).is_empty() {
        println!("ok: apt packages ({QEMU})");
        return Ok(());
    }
    require_root("installing qemu")?;
    install_qemu_from_backports()
}

/// qemu-system-x86 from the host's own `<codename>-backports`. This kind of machine ships
/// qemu-utils from backports, which the release's older qemu-system-x86 conflicts with (apt
/// would remove qemu-utils to install it). The sources and lists are private, under
/// target/vm/apt/host, so /etc/apt is neither read for sources nor written.
fn install_qemu_from_backports() -> Result<()> {
    let os = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    let codename = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_owned())
        .context("/etc/os-release names no VERSION_CODENAME")?;
    let dir = crate::util::target_dir().join("vm/apt/host");
    let lists = dir.join("lists");
    std::fs::create_dir_all(lists.join("partial"))
        .with_context(|| format!("creating {}", lists.display()))?;
    let sources = dir.join("sources.list");
    let keyring = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]";
    std::fs::write(
        &sources,
        format!(
            "deb {keyring} http://deb.debian.org/debian {codename} main\n\
             deb {keyring} http://deb.debian.org/debian {codename}-updates main\n\
             deb {keyring} http://deb.debian.org/debian-security {codename}-security main\n\
             deb {keyring} http://deb.debian.org/debian {codename}-backports main\n"
        ),
    )
    .with_context(|| format!("writing {}", sources.display()))?;
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.arg("-o")
            .arg(format!("Dir::Etc::SourceList={}", sources.display()))
            .args(["-o", "Dir::Etc::SourceParts=/dev/null", "-o"])
            .arg(format!("Dir::State::Lists={}", lists.display()))
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    println!("installing: {QEMU} from {codename}-backports");
    run(&mut apt(&["update"]))?;
    let release = format!("{codename}-backports");
    run(&mut apt(&[
        "install",
        "-y",
        "--no-install-recommends",
        "--no-remove",
        "-t",
        &release,
        QEMU,
    ]))
}

/// The packages of `packages` that are not installed.
fn not_installed<'a>(packages: &[&'a str]) -> Vec<&'a str> {
    // `dpkg-query` exits non-zero when a package is unknown; the lines it does print still
    // tell which ones are installed.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
        .args(packages)
        .output();
    let listed = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    packages
        .iter()
        .copied()
        .filter(|pkg| {
            !listed.lines().any(|line| {
                let mut fields = line.split_whitespace();
                fields.next() == Some(*pkg) && fields.next() == Some("ii")
            })
        })
        .collect()
}

fn install_missing(packages: &[&str], install_flags: &[&str]) -> Result<()> {
    let missing = not_installed(packages);
    if missing.is_empty() {
        println!("ok: apt packages ({})", packages.join(", "));
        return Ok(());
    }
    println!("installing: apt packages {}", missing.join(" "));
    require_root("installing apt packages")?;
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(install_flags)
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn nightly_toolchain() -> Result<()> {
    let list = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if list.lines().any(|line| line.starts_with("nightly-")) {
        println!("ok: nightly toolchain");
        return Ok(());
    }
    println!("installing: nightly toolchain");
    run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
}

fn rust_src() -> Result<()> {
    let list = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if list.lines().any(|line| line.trim() == "rust-src") {
        println!("ok: rust-src for nightly");
        return Ok(());
    }
    println!("installing: rust-src for nightly");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// The bpf-linker binary the build will call: on PATH, or under `--bpf-linker-root`.
fn bpf_linker_bin(args: &SetupArgs) -> PathBuf {
    match &args.bpf_linker_root {
        Some(root) => root.join("bin/bpf-linker"),
        None => PathBuf::from("bpf-linker"),
    }
}

/// `Some(version)` when the binary runs (which also proves its libLLVM loads).
fn bpf_linker_version(bin: &Path) -> Option<String> {
    let out = probe(Command::new(bin).arg("--version"))?;
    out.split_whitespace().nth(1).map(str::to_owned)
}

fn bpf_linker(args: &SetupArgs) -> Result<()> {
    let bin = bpf_linker_bin(args);
    let wanted = format!("{BPF_LINKER_VERSION}.");
    if args.reinstall_bpf_linker {
        println!("installing: bpf-linker {BPF_LINKER_VERSION} (reinstall requested)");
    } else {
        match bpf_linker_version(&bin) {
            Some(version) if version.starts_with(&wanted) => {
                println!("ok: bpf-linker {version}");
                return Ok(());
            }
            Some(version) => {
                println!("installing: bpf-linker {BPF_LINKER_VERSION} (found {version})");
            }
            None => println!("installing: bpf-linker {BPF_LINKER_VERSION}"),
        }
    }

    let llvm = NightlyLlvm::detect()?;
    let prefix = llvm.prefix()?;
    let mut cmd = Command::new("cargo");
    cmd.args([
        "install",
        "bpf-linker",
        "--locked",
        "--force",
        "--no-default-features",
    ])
    .args(["--version", &format!("^{BPF_LINKER_VERSION}")])
    .args(["--features", &format!("llvm-{}", llvm.major)])
    .env("LLVM_PREFIX", &prefix);
    if let Some(root) = &args.bpf_linker_root {
        cmd.arg("--root").arg(root);
    }
    // The host toolchain builds bpf-linker; a toolchain pinned by the environment must not leak in.
    cmd.env_remove("RUSTUP_TOOLCHAIN");
    println!("  LLVM_PREFIX={} {}", prefix.display(), describe(&cmd));
    run(&mut cmd)?;
    match bpf_linker_version(&bin) {
        Some(version) if version.starts_with(&wanted) => {
            println!("ok: bpf-linker {version} installed");
            Ok(())
        }
        other => bail!(
            "bpf-linker installed but `{} --version` gives {other:?}",
            bin.display()
        ),
    }
}

/// The libLLVM shipped with the nightly rustc: bpf-linker must link exactly this one, since the
/// bitcode it reads comes from that rustc.
struct NightlyLlvm {
    major: u32,
    /// `<sysroot>/lib/libLLVM.so.<major>.<minor>-rust-*`
    library: PathBuf,
}

impl NightlyLlvm {
    fn detect() -> Result<Self> {
        let verbose = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
        let version = verbose
            .lines()
            .find_map(|line| line.strip_prefix("LLVM version:"))
            .map(str::trim)
            .context("`rustc +nightly -vV` prints no LLVM version")?;
        let mut parts = version.split('.');
        let major: u32 = parts
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("LLVM version {version}"))?;
        let minor: u32 = parts
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("LLVM version {version}"))?;

        let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
        let lib_dir = Path::new(sysroot.trim()).join("lib");
        let wanted = format!("libLLVM.so.{major}.{minor}-rust-");
        let library = fs::read_dir(&lib_dir)
            .with_context(|| format!("reading {}", lib_dir.display()))?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| {
                path.file_name()
                    .is_some_and(|name| name.to_string_lossy().starts_with(&wanted))
            })
            .with_context(|| format!("no {wanted}* in {}", lib_dir.display()))?;
        Ok(Self { major, library })
    }

    /// A folder laid out like an LLVM install (`<prefix>/lib/libLLVM.so`) pointing at the
    /// nightly's library. It lives under ~/.cache rather than target/ because bpf-linker's rpath
    /// points into it, and `cargo clean` must not break the installed linker.
    fn prefix(&self) -> Result<PathBuf> {
        let cache = match env::var_os("XDG_CACHE_HOME") {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from(env::var_os("HOME").context("HOME is not set")?).join(".cache"),
        };
        let prefix = cache.join("lb-xdp/llvm-prefix");
        let lib = prefix.join("lib");
        fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
        let versioned = self.library.file_name().expect("a file in sysroot/lib");
        for link in [lib.join("libLLVM.so"), lib.join(versioned)] {
            if fs::read_link(&link).is_ok_and(|target| target == self.library) {
                continue;
            }
            if fs::symlink_metadata(&link).is_ok() {
                fs::remove_file(&link)
                    .with_context(|| format!("removing stale {}", link.display()))?;
            }
            symlink(&self.library, &link).with_context(|| {
                format!("linking {} -> {}", link.display(), self.library.display())
            })?;
        }
        Ok(prefix)
    }
}

fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&BPFFS) && fields.get(2) == Some(&"bpf")
    });
    if mounted {
        println!("ok: bpffs at {BPFFS}");
        return Ok(());
    }
    println!("installing: bpffs at {BPFFS}");
    require_root("mounting bpffs")?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}
