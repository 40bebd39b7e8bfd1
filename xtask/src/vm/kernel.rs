//! A stock kernel unpacked for booting: the uncompressed vmlinux (qemu boots it through its PVH
//! entry, faster under TCG than the bzImage's real-mode setup and self-decompression) and the
//! part of its module tree the tests can need, indexed by the host's depmod.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::util::{describe, output, run};

/// Module folders (under `lib/modules/<release>/kernel/`) that are unpacked; the rest (GPU,
/// sound, storage, wireless drivers) is never loaded in the guest. `drivers/net/` is taken
/// without its subfolders except `vxlan`.
const MODULE_DIRS: &[&str] = &[
    "net/",
    "fs/9p/",
    "fs/netfs/",
    "fs/fscache/",
    "fs/overlayfs/",
    "drivers/virtio/",
    "drivers/net/vxlan/",
    "lib/",
    "crypto/",
    "arch/x86/crypto/",
];

/// Written to `.complete` once a kernel is unpacked; bumped when [`MODULE_DIRS`] or the layout
/// changes, so older unpacks are redone.
const UNPACK_LAYOUT: &str = "2";

/// An unpacked kernel under `<target>/vm/kernels/<package>/`.
pub struct Kernel {
    /// `uname -r` of the kernel (the module folder's name).
    pub release: String,
    /// What qemu's `-kernel` gets: vmlinux, or the bzImage when no vmlinux could be extracted.
    pub image: PathBuf,
    /// `<dir>/root/lib/modules`, bind-mounted over the guest's /lib/modules.
    pub modules: PathBuf,
}

impl Kernel {
    pub fn dir(&self) -> &Path {
        self.modules
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .expect("modules sits at <dir>/root/lib/modules")
    }

    /// The unpacked kernel of `package`, unpacking `debs` first unless that was done before.
    pub fn unpack(kernels_dir: &Path, package: &str, debs: &[PathBuf]) -> Result<Self> {
        let dir = kernels_dir.join(package);
        let marker = fs::read_to_string(dir.join(".complete")).unwrap_or_default();
        if marker != UNPACK_LAYOUT {
            unpack_into(&dir, debs).with_context(|| format!("unpacking {package}"))?;
        }
        let modules = dir.join("root/lib/modules");
        let release = fs::read_dir(&modules)
            .with_context(|| format!("reading {}", modules.display()))?
            .filter_map(Result::ok)
            .find(|entry| entry.path().is_dir())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .with_context(|| format!("no release folder in {}", modules.display()))?;
        let vmlinux = dir.join("vmlinux");
        let image = if vmlinux.exists() {
            vmlinux
        } else {
            dir.join("vmlinuz")
        };
        Ok(Self {
            release,
            image,
            modules,
        })
    }

    /// The module files (paths relative to `lib/modules/<release>/`) that `names` need, each after
    /// its dependencies, skipping modules built into the image.
    pub fn module_closure(&self, names: &[&str]) -> Result<Vec<String>> {
        let base = self.modules.join(&self.release);
        let dep_file = base.join("modules.dep");
        let deps = fs::read_to_string(&dep_file)
            .with_context(|| format!("reading {}", dep_file.display()))?;
        let builtin = fs::read_to_string(base.join("modules.builtin")).unwrap_or_default();
        let mut ordered = Vec::new();
        for name in names {
            let wanted = module_name(name);
            if builtin.lines().any(|line| module_name(line) == wanted) {
                continue;
            }
            let Some(line) = deps.lines().find(|line| {
                line.split(':')
                    .next()
                    .is_some_and(|path| module_name(path) == wanted)
            }) else {
                bail!(
                    "module {name} is neither built in nor in {}",
                    dep_file.display()
                );
            };
            let (path, needs) = line.split_once(':').unwrap_or((line, ""));
            // modules.dep lists the whole closure, deepest dependency last.
            for need in needs.split_whitespace().rev().chain([path]) {
                if !ordered.iter().any(|seen| seen == need) {
                    ordered.push(need.to_owned());
                }
            }
        }
        Ok(ordered)
    }
}

/// `fs/9p/9p.ko.xz` → `9p`; dashes and underscores are the same to the kernel.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

fn unpack_into(dir: &Path, debs: &[PathBuf]) -> Result<()> {
    let mut partial_name = dir.as_os_str().to_owned();
    partial_name.push(".partial");
    let partial = PathBuf::from(partial_name);
    if partial.exists() {
        fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let root = partial.join("root");
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    for deb in debs {
        extract_wanted(deb, &root)?;
    }
    // trixie's packages use the merged-/usr path.
    let usr_modules = root.join("usr/lib/modules");
    let modules = root.join("lib/modules");
    if usr_modules.exists() {
        fs::create_dir_all(root.join("lib")).context("creating lib/")?;
        fs::rename(&usr_modules, &modules).context("moving usr/lib/modules to lib/modules")?;
    }
    let release = fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .filter_map(Result::ok)
        .find(|entry| entry.path().is_dir())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .context("the packages hold no lib/modules/<release>")?;

    let vmlinuz = [
        root.join(format!("boot/vmlinuz-{release}")),
        modules.join(&release).join("vmlinuz"),
    ]
    .into_iter()
    .find(|path| path.exists())
    .context("the packages hold no vmlinuz")?;
    fs::rename(&vmlinuz, partial.join("vmlinuz")).context("moving vmlinuz")?;
    match extract_vmlinux(&partial.join("vmlinuz")) {
        Ok(elf) => fs::write(partial.join("vmlinux"), elf).context("writing vmlinux")?,
        Err(err) => println!("vm: no vmlinux ({err:#}); booting the bzImage instead"),
    }

    run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    fs::write(partial.join(".complete"), UNPACK_LAYOUT).context("marking the unpack complete")?;
    fs::rename(&partial, dir).with_context(|| format!("renaming to {}", dir.display()))
}

/// Extracts from `deb` the kernel image, the module index files and the modules under
/// [`MODULE_DIRS`], into `root`.
fn extract_wanted(deb: &Path, root: &Path) -> Result<()> {
    let listing = output(
        Command::new("sh")
            .arg("-c")
            .arg("dpkg-deb --fsys-tarfile \"$1\" | tar -t")
            .arg("sh")
            .arg(deb),
    )?;
    let wanted: Vec<&str> = listing.lines().filter(|path| is_wanted(path)).collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let list = root.join(".extract-list");
    fs::write(&list, wanted.join("\n") + "\n").context("writing the extract list")?;
    run(Command::new("sh")
        .arg("-c")
        .arg("dpkg-deb --fsys-tarfile \"$1\" | tar -x --no-same-owner -C \"$2\" -T \"$3\"")
        .arg("sh")
        .arg(deb)
        .arg(root)
        .arg(&list))?;
    fs::remove_file(&list).context("removing the extract list")
}

fn is_wanted(path: &str) -> bool {
    if path.ends_with('/') {
        return false;
    }
    let path = path.trim_start_matches("./");
    let path = path.strip_prefix("usr/").unwrap_or(path);
    if path.starts_with("boot/vmlinuz-") {
        return true;
    }
    let Some(rest) = path.strip_prefix("lib/modules/") else {
        return false;
    };
    let Some((_release, inner)) = rest.split_once('/') else {
        return false;
    };
    if inner == "vmlinuz" || inner.starts_with("modules.builtin") || inner == "modules.order" {
        return true;
    }
    let Some(module) = inner.strip_prefix("kernel/") else {
        return false;
    };
    if let Some(file) = module.strip_prefix("drivers/net/")
        && !file.contains('/')
    {
        return true;
    }
    MODULE_DIRS.iter().any(|dir| module.starts_with(dir))
}

/// The ELF inside a bzImage, found as scripts/extract-vmlinux does: try each compressed-stream
/// signature and keep the first output that starts like an ELF file.
fn extract_vmlinux(bzimage: &Path) -> Result<Vec<u8>> {
    let data = fs::read(bzimage).with_context(|| format!("reading {}", bzimage.display()))?;
    let formats: [(&[u8], &str, &[&str]); 3] = [
        (b"\xfd7zXZ\x00", "xz", &["-dc"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-dcq"]),
        (b"\x1f\x8b\x08", "gzip", &["-dc"]),
    ];
    for (magic, tool, args) in formats {
        for offset in find_all(&data, magic) {
            let elf = decompress(tool, args, &data[offset..])?;
            if elf.starts_with(b"\x7fELF") {
                return Ok(elf);
            }
        }
    }
    bail!(
        "no xz, zstd or gzip stream in {} holds an ELF",
        bzimage.display()
    )
}

fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, window)| *window == needle)
        .map(|(at, _)| at)
        .collect()
}

/// Stdout of `tool args` fed `input`. Its exit status is ignored on purpose: the bzImage has
/// bytes after the stream, which the decompressors report as an error after a complete output.
fn decompress(tool: &str, args: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
    let mut stdin = child.stdin.take().context("decompressor stdin")?;
    let input = input.to_vec();
    // Fed from a thread so a full stdout pipe cannot deadlock the writer.
    let feeder = std::thread::spawn(move || {
        // A decompressor that stops early closes its stdin: not an error here.
        let _ignored = stdin.write_all(&input);
    });
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{}`", describe(&cmd)))?;
    if feeder.join().is_err() {
        bail!("the thread feeding `{}` panicked", describe(&cmd));
    }
    Ok(out.stdout)
}

/// `module` (a file under the module tree, possibly compressed) as a plain .ko.
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some(("xz", "-dc"))
    } else if name.ends_with(".ko.zst") {
        Some(("zstd", "-dcq"))
    } else if name.ends_with(".ko.gz") {
        Some(("gzip", "-dc"))
    } else {
        None
    };
    match tool {
        None => fs::read(path).with_context(|| format!("reading {name}")),
        Some((tool, flag)) => {
            let mut cmd = Command::new(tool);
            cmd.arg(flag).arg(path);
            let out = cmd
                .output()
                .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
            if !out.status.success() {
                bail!("`{}` failed: {}", describe(&cmd), out.status);
            }
            Ok(out.stdout)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{is_wanted, module_name};

    #[test]
    fn picks_image_index_and_network_modules() {
        assert!(is_wanted("./boot/vmlinuz-6.1.0-50-amd64"));
        assert!(is_wanted("./usr/lib/modules/7.3.4+deb13-amd64/vmlinuz"));
        assert!(is_wanted("./lib/modules/6.1.0-50-amd64/modules.builtin"));
        assert!(is_wanted(
            "./lib/modules/6.1.0-50-amd64/kernel/net/ipv4/ipip.ko"
        ));
        assert!(is_wanted(
            "./usr/lib/modules/7.3.4+deb13-amd64/kernel/drivers/net/veth.ko.xz"
        ));
        assert!(!is_wanted(
            "./lib/modules/6.1.0-50-amd64/kernel/drivers/net/wireless/ath/ath.ko"
        ));
        assert!(!is_wanted(
            "./lib/modules/6.1.0-50-amd64/kernel/drivers/gpu/drm/drm.ko"
        ));
        assert!(!is_wanted("./boot/System.map-6.1.0-50-amd64"));
    }

    #[test]
    fn module_names_ignore_folder_and_compression() {
        assert_eq!(module_name("kernel/fs/9p/9p.ko.xz"), "9p");
        assert_eq!(module_name("kernel/net/9p/9pnet_virtio.ko"), "9pnet_virtio");
        assert_eq!(module_name("virtio-pci"), "virtio_pci");
    }
}
