//! `cargo xtask install`: builds the release binaries and installs them, the systemd unit and a
//! first configuration on a gateway host. Files are written atomically (temp file + rename), an
//! operator's config is never overwritten, and a second run changes nothing.

use std::{
    fmt, fs,
    io::{ErrorKind, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Component, Path, PathBuf},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    tasks,
    util::{target_dir, workspace_root},
};

/// The binaries installed to PREFIX/bin, as cargo names them in target/release.
const BINARIES: &[&str] = &["lbd", "lbctl", "lb-decap"];
/// Where the unit template runs lbd from; replaced by PREFIX/bin/lbd at install.
const TEMPLATE_LBD: &str = "/usr/local/bin/lbd";
const UNIT_PATH: &str = "/etc/systemd/system/lbd.service";
const CONFIG_PATH: &str = "/etc/lb/lb.toml";
const ENV_PATH: &str = "/etc/lb/lbd.env";
const EXAMPLE_CONFIG: &str = "lb-userspace/lb.example.toml";

#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// Binaries go to PREFIX/bin, and the unit runs PREFIX/bin/lbd.
    #[arg(long, value_name = "DIR", default_value = "/usr/local")]
    prefix: PathBuf,
    /// Stage every file under DIR (for packaging); the unit still names PREFIX/bin/lbd.
    #[arg(long, value_name = "DIR")]
    destdir: Option<PathBuf>,
    /// Install the binaries already in target/release instead of building them first.
    #[arg(long)]
    no_build: bool,
}

/// What an install copies from: the built binaries and the files under deploy/.
#[derive(Debug, Clone)]
pub struct Sources {
    /// (name under PREFIX/bin, built file).
    pub binaries: Vec<(String, PathBuf)>,
    /// The unit template (deploy/lbd.service).
    pub unit: PathBuf,
    /// The environment file with `LBD_ARGS` (deploy/lbd.env).
    pub env: PathBuf,
    /// The commented example config.
    pub config: PathBuf,
}

impl Sources {
    /// The workspace's deploy files and the binaries in `bin_dir`.
    pub fn from_workspace(bin_dir: &Path) -> Self {
        let root = workspace_root();
        Self {
            binaries: BINARIES
                .iter()
                .map(|name| ((*name).to_owned(), bin_dir.join(name)))
                .collect(),
            unit: root.join("deploy/lbd.service"),
            env: root.join("deploy/lbd.env"),
            config: root.join(EXAMPLE_CONFIG),
        }
    }
}

/// What happened to one destination file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Created or replaced.
    Written,
    /// Already there with the same content and mode.
    Unchanged,
    /// Already there and owned by the operator: left alone.
    KeptExisting,
}

/// One destination file and what the install did to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub path: PathBuf,
    pub mode: u32,
    pub outcome: Outcome,
}

impl fmt::Display for Installed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        let mode = self.mode;
        match self.outcome {
            Outcome::Written => write!(f, "installed  {path} ({mode:04o})"),
            Outcome::Unchanged => write!(f, "unchanged  {path} ({mode:04o})"),
            Outcome::KeptExisting => {
                write!(f, "kept       {path}: it exists, not overwritten")
            }
        }
    }
}

/// Replace a file, or only create it when absent (an operator's own file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Replace,
    CreateOnly,
}

pub fn install(args: &InstallArgs) -> Result<()> {
    check_prefix(&args.prefix)?;
    if !args.no_build {
        tasks::build(true)?;
    }
    let bin_dir = target_dir().join("release");
    let sources = Sources::from_workspace(&bin_dir);
    for (_, path) in &sources.binaries {
        let hint = if args.no_build {
            "build it with `cargo xtask build --release`, or run without --no-build"
        } else {
            "the release build did not produce it"
        };
        ensure!(path.is_file(), "{} is missing: {hint}", path.display());
    }
    let destdir = args.destdir.clone().unwrap_or_else(|| PathBuf::from("/"));
    let installed = install_files(&sources, &args.prefix, &destdir)?;

    println!();
    for item in &installed {
        println!("{item}");
        if item.outcome == Outcome::KeptExisting && item.path.ends_with("lb.toml") {
            println!(
                "           (the commented example: {})",
                sources.config.display()
            );
        }
    }
    print_next_steps(args.destdir.as_deref());
    Ok(())
}

fn print_next_steps(destdir: Option<&Path>) {
    println!();
    if let Some(dir) = destdir {
        println!(
            "Staged under {}; on the target host, after copying:",
            dir.display()
        );
    } else {
        println!("Next steps:");
    }
    println!("  1. edit {ENV_PATH}: LBD_ARGS=\"--iface <gateway interface> ...\"");
    println!("  2. edit {CONFIG_PATH}: settings and the VIPs to start from");
    println!("  3. systemctl daemon-reload && systemctl enable --now lbd");
    println!(
        "If lbd is already running: `systemctl daemon-reload && systemctl restart lbd` runs the \
         new binaries (the data plane keeps forwarding); `lbd upgrade` swaps only the XDP program."
    );
}

/// Installs `sources` for `prefix` under `destdir` (`/` for a real install). Returns every
/// destination, in install order, with what was done to it. Every source is read before the
/// first write, so a missing one installs nothing.
pub fn install_files(sources: &Sources, prefix: &Path, destdir: &Path) -> Result<Vec<Installed>> {
    check_prefix(prefix)?;
    let read = |src: &Path| fs::read(src).with_context(|| format!("reading {}", src.display()));
    let bin_dir = staged(destdir, &prefix.join("bin"));
    let mut files = Vec::new();
    for (name, src) in &sources.binaries {
        files.push((bin_dir.join(name), read(src)?, 0o755, Policy::Replace));
    }
    let template = String::from_utf8(read(&sources.unit)?)
        .with_context(|| format!("{} is not UTF-8", sources.unit.display()))?;
    let unit = render_unit(&template, prefix)
        .with_context(|| format!("unit template {}", sources.unit.display()))?;
    files.push((
        staged(destdir, Path::new(UNIT_PATH)),
        unit.into_bytes(),
        0o644,
        Policy::Replace,
    ));
    for (src, dest) in [(&sources.config, CONFIG_PATH), (&sources.env, ENV_PATH)] {
        files.push((
            staged(destdir, Path::new(dest)),
            read(src)?,
            0o644,
            Policy::CreateOnly,
        ));
    }
    files
        .iter()
        .map(|(dest, bytes, mode, policy)| install_file(dest, bytes, *mode, *policy))
        .collect()
}

/// `path` (absolute) under `destdir`.
fn staged(destdir: &Path, path: &Path) -> PathBuf {
    destdir.join(path.strip_prefix("/").unwrap_or(path))
}

/// The prefix ends up in the unit's `ExecStart`, where spaces, quotes, `$` and `%` would be
/// interpreted by systemd; and a relative prefix would make the unit name a relative binary.
fn check_prefix(prefix: &Path) -> Result<()> {
    let Some(text) = prefix.to_str() else {
        bail!("--prefix {}: not UTF-8", prefix.display());
    };
    ensure!(prefix.is_absolute(), "--prefix {text}: must be absolute");
    ensure!(
        prefix
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
        "--prefix {text}: must not contain `.` or `..`"
    );
    if let Some(bad) = text
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || "\"'\\$%;".contains(*c))
    {
        bail!("--prefix {text}: {bad:?} would need quoting in the systemd unit");
    }
    Ok(())
}

/// The unit template with its `ExecStart=/usr/local/bin/lbd` pointing at `prefix`/bin/lbd.
pub fn render_unit(template: &str, prefix: &Path) -> Result<String> {
    let lbd = prefix.join("bin/lbd");
    let lbd = lbd.to_str().context("prefix is not UTF-8")?;
    let wanted = format!("ExecStart={TEMPLATE_LBD}");
    let mut found = 0;
    let mut out = String::with_capacity(template.len() + lbd.len());
    for line in template.split_inclusive('\n') {
        match line.strip_prefix(&wanted) {
            // The binary's name must end there: `/usr/local/bin/lbdx` is something else.
            Some(rest) if rest.is_empty() || rest.starts_with([' ', '\t', '\n']) => {
                found += 1;
                out.push_str("ExecStart=");
                out.push_str(lbd);
                out.push_str(rest);
            }
            _ => out.push_str(line),
        }
    }
    ensure!(found == 1, "expected one `{wanted}` line, found {found}");
    Ok(out)
}

/// Writes `bytes` to `dest` with `mode`, atomically: readers see the old file or the new one,
/// and a running binary is replaced rather than written into.
fn install_file(dest: &Path, bytes: &[u8], mode: u32, policy: Policy) -> Result<Installed> {
    let done = |outcome| Installed {
        path: dest.to_owned(),
        mode,
        outcome,
    };
    let existing = match fs::symlink_metadata(dest) {
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", dest.display())),
    };
    if let Some(meta) = &existing {
        if policy == Policy::CreateOnly {
            return Ok(done(Outcome::KeptExisting));
        }
        if meta.is_file()
            && meta.permissions().mode() & 0o7777 == mode
            && fs::read(dest).is_ok_and(|old| old == bytes)
        {
            return Ok(done(Outcome::Unchanged));
        }
    }

    let dir = dest
        .parent()
        .with_context(|| format!("{} has no parent folder", dest.display()))?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let temp = TempFile::write(dest, bytes, mode)?;
    match policy {
        Policy::Replace => fs::rename(&temp.0, dest)
            .with_context(|| format!("renaming {} to {}", temp.0.display(), dest.display()))?,
        // A hard link fails if `dest` appeared meanwhile, so an operator's file is never
        // replaced, not even by a race; the temp name is removed on drop.
        Policy::CreateOnly => match fs::hard_link(&temp.0, dest) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                return Ok(done(Outcome::KeptExisting));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("creating {}", dest.display()));
            }
        },
    }
    // The rename is durable once the folder is synced.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(done(Outcome::Written))
}

/// A fully written, synced temp file next to its destination, removed on drop unless renamed.
struct TempFile(PathBuf);

impl TempFile {
    fn write(dest: &Path, bytes: &[u8], mode: u32) -> Result<Self> {
        let name = dest
            .file_name()
            .with_context(|| format!("{} has no file name", dest.display()))?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".xtask-{}.tmp", std::process::id()));
        let path = dest.with_file_name(temp_name);
        // A leftover from a killed run with the same pid would make create_new fail.
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let temp = Self(path);
        file.write_all(bytes)
            .with_context(|| format!("writing {}", temp.0.display()))?;
        // Set explicitly: the mode given to open() is filtered by the umask.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", temp.0.display()))?;
        file.sync_all()
            .with_context(|| format!("syncing {}", temp.0.display()))?;
        Ok(temp)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        match fs::remove_file(&self.0) {
            // NotFound: it was renamed into place.
            Err(e) if e.kind() != ErrorKind::NotFound => {
                eprintln!("warning: cannot remove {}: {e}", self.0.display());
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        os::unix::fs::PermissionsExt as _,
        path::{Path, PathBuf},
        process::Command,
        time::{SystemTime, UNIX_EPOCH},
    };

    use super::{
        CONFIG_PATH, ENV_PATH, Installed, Outcome, Sources, UNIT_PATH, check_prefix, install_files,
        render_unit, staged,
    };
    use crate::util::workspace_root;

    /// A unique temp folder, removed on drop (also when the test panics).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(test: &str) -> Self {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos();
            let dir = std::env::temp_dir().join(format!(
                "xtask-install-{test}-{}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).expect("create temp dir");
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            if let Err(e) = std::fs::remove_dir_all(&self.0) {
                eprintln!("cannot remove {}: {e}", self.0.display());
            }
        }
    }

    /// Executable fake binaries plus the workspace's real deploy files.
    fn fake_sources(dir: &Path, flavour: &str) -> Sources {
        let bin_dir = dir.join(format!("build-{flavour}"));
        std::fs::create_dir_all(&bin_dir).expect("create bin dir");
        let sources = Sources::from_workspace(&bin_dir);
        for (name, path) in &sources.binaries {
            std::fs::write(path, format!("#!/bin/sh\necho {name} {flavour}\n"))
                .expect("write fake binary");
            // Built binaries are 0755; make the source 0700 to prove install sets the mode.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                .expect("chmod fake binary");
        }
        sources
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o7777
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn dest(destdir: &Path, path: &str) -> PathBuf {
        destdir.join(path.trim_start_matches('/'))
    }

    /// Every entry under `dir`, recursively, with its content and mode.
    fn snapshot(dir: &Path) -> Vec<(PathBuf, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_owned()];
        while let Some(d) = todo.pop() {
            for entry in std::fs::read_dir(&d).expect("read_dir") {
                let path = entry.expect("dir entry").path();
                if path.is_dir() {
                    todo.push(path.clone());
                    out.push((path, mode(&d), Vec::new()));
                } else {
                    let bytes = std::fs::read(&path).expect("read");
                    out.push((path.clone(), mode(&path), bytes));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn fresh_install_lands_every_file_with_its_mode() {
        let tmp = TempDir::new("fresh");
        let sources = fake_sources(&tmp.0, "v1");
        let destdir = tmp.0.join("root");
        let done = install_files(&sources, Path::new("/opt/lb"), &destdir).expect("install");

        assert!(
            done.iter().all(|i| i.outcome == Outcome::Written),
            "{done:?}"
        );
        for name in ["lbd", "lbctl", "lb-decap"] {
            let path = destdir.join("opt/lb/bin").join(name);
            assert_eq!(mode(&path), 0o755, "{}", path.display());
            assert_eq!(read(&path), format!("#!/bin/sh\necho {name} v1\n"));
        }
        let unit = dest(&destdir, UNIT_PATH);
        assert_eq!(mode(&unit), 0o644);
        let unit_text = read(&unit);
        let exec: Vec<&str> = unit_text
            .lines()
            .filter(|l| l.starts_with("ExecStart="))
            .collect();
        assert_eq!(exec, ["ExecStart=/opt/lb/bin/lbd $LBD_ARGS"]);
        // Apart from ExecStart, the unit is the template as written.
        let template = read(&sources.unit);
        assert_eq!(
            unit_text.replace("/opt/lb/bin/lbd", "/usr/local/bin/lbd"),
            template
        );

        let config = dest(&destdir, CONFIG_PATH);
        assert_eq!(mode(&config), 0o644);
        assert_eq!(read(&config), read(&sources.config));
        let env = dest(&destdir, ENV_PATH);
        assert_eq!(mode(&env), 0o644);
        assert!(read(&env).contains("\nLBD_ARGS=\"--iface eth0\"\n"));
        assert_eq!(mode(&destdir.join("etc/lb")), 0o755);
    }

    #[test]
    fn operator_files_are_never_overwritten() {
        let tmp = TempDir::new("keep");
        let sources = fake_sources(&tmp.0, "v1");
        let destdir = tmp.0.join("root");
        let config = dest(&destdir, CONFIG_PATH);
        let env = dest(&destdir, ENV_PATH);
        std::fs::create_dir_all(config.parent().expect("parent")).expect("mkdir");
        std::fs::write(&config, "# the operator's config\n").expect("write");
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(&env, "LBD_ARGS=\"--iface bond0\"\n").expect("write");

        let done = install_files(&sources, Path::new("/usr/local"), &destdir).expect("install");
        let outcome = |path: &Path| -> Outcome {
            done.iter()
                .find(|i| i.path == path)
                .map(|i: &Installed| i.outcome)
                .expect("reported")
        };
        assert_eq!(outcome(&config), Outcome::KeptExisting);
        assert_eq!(outcome(&env), Outcome::KeptExisting);
        assert_eq!(read(&config), "# the operator's config\n");
        assert_eq!(mode(&config), 0o600, "the operator's mode is kept too");
        assert_eq!(read(&env), "LBD_ARGS=\"--iface bond0\"\n");
        assert!(
            done.iter()
                .filter(|i| i.path != config && i.path != env)
                .all(|i| i.outcome == Outcome::Written)
        );
    }

    #[test]
    fn second_run_changes_nothing_and_leaves_no_temp_files() {
        let tmp = TempDir::new("twice");
        let sources = fake_sources(&tmp.0, "v1");
        let destdir = tmp.0.join("root");
        install_files(&sources, Path::new("/usr/local"), &destdir).expect("first install");
        let before = snapshot(&destdir);
        let done = install_files(&sources, Path::new("/usr/local"), &destdir).expect("second");
        for item in &done {
            let expected = if item.path.starts_with(destdir.join("etc/lb")) {
                Outcome::KeptExisting
            } else {
                Outcome::Unchanged
            };
            assert_eq!(item.outcome, expected, "{}", item.path.display());
        }
        assert_eq!(snapshot(&destdir), before);
        assert!(
            !before.iter().any(|(p, _, _)| p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(".tmp"))),
            "{before:?}"
        );
    }

    #[test]
    fn new_binaries_replace_old_ones_and_fix_modes() {
        let tmp = TempDir::new("upgrade");
        let destdir = tmp.0.join("root");
        install_files(&fake_sources(&tmp.0, "v1"), Path::new("/usr"), &destdir).expect("v1");
        let lbctl = destdir.join("usr/bin/lbctl");
        std::fs::set_permissions(&lbctl, std::fs::Permissions::from_mode(0o644)).expect("chmod");

        let done =
            install_files(&fake_sources(&tmp.0, "v2"), Path::new("/usr"), &destdir).expect("v2");
        for name in ["lbd", "lbctl", "lb-decap"] {
            let path = destdir.join("usr/bin").join(name);
            assert_eq!(read(&path), format!("#!/bin/sh\necho {name} v2\n"));
            assert_eq!(mode(&path), 0o755);
        }
        let unit = dest(&destdir, UNIT_PATH);
        assert_eq!(
            done.iter().find(|i| i.path == unit).map(|i| i.outcome),
            Some(Outcome::Unchanged)
        );
    }

    #[test]
    fn missing_binary_fails_naming_it_and_installs_nothing() {
        let tmp = TempDir::new("missing");
        let sources = fake_sources(&tmp.0, "v1");
        std::fs::remove_file(&sources.binaries[1].1).expect("rm");
        let destdir = tmp.0.join("root");
        let err = install_files(&sources, Path::new("/usr/local"), &destdir)
            .expect_err("a binary is missing");
        assert!(format!("{err:#}").contains("lbctl"), "{err:#}");
        assert!(!destdir.exists(), "nothing may be written");
    }

    #[test]
    fn prefix_must_be_absolute_and_safe_in_a_unit() {
        for ok in ["/usr/local", "/usr", "/opt/lb-1.0/", "/"] {
            check_prefix(Path::new(ok)).unwrap_or_else(|e| panic!("{ok}: {e:#}"));
        }
        for bad in [
            "usr/local",
            "/opt/my lb",
            "/opt/%n",
            "/opt/$HOME",
            "/opt/../usr",
            "/opt/\"lb\"",
        ] {
            assert!(check_prefix(Path::new(bad)).is_err(), "{bad} accepted");
        }
        let tmp = TempDir::new("badprefix");
        let sources = fake_sources(&tmp.0, "v1");
        assert!(install_files(&sources, Path::new("relative"), &tmp.0.join("root")).is_err());
    }

    #[test]
    fn render_unit_replaces_exactly_the_exec_start_binary() {
        let template = "# runs /usr/local/bin/lbd\nExecStart=/usr/local/bin/lbd $LBD_ARGS\n\
                        ExecReload=/bin/kill -HUP $MAINPID\n";
        let unit = render_unit(template, Path::new("/opt/lb/")).expect("render");
        assert_eq!(
            unit,
            "# runs /usr/local/bin/lbd\nExecStart=/opt/lb/bin/lbd $LBD_ARGS\n\
             ExecReload=/bin/kill -HUP $MAINPID\n"
        );
        assert!(render_unit("ExecStart=/usr/bin/lbd\n", Path::new("/opt")).is_err());
        assert!(render_unit("ExecStart=/usr/local/bin/lbdx\n", Path::new("/opt")).is_err());
        let twice = "ExecStart=/usr/local/bin/lbd\nExecStart=/usr/local/bin/lbd\n";
        assert!(render_unit(twice, Path::new("/opt")).is_err());
    }

    /// The shipped unit, as installed, passes `systemd-analyze verify`, which reports unknown
    /// keys, bad values and a non-executable `ExecStart`.
    #[test]
    fn installed_unit_passes_systemd_analyze_verify() {
        let found = Command::new("which").arg("systemd-analyze").output();
        if !found.is_ok_and(|out| out.status.success()) {
            println!("note: systemd-analyze not found; skipping the unit verification");
            return;
        }
        let tmp = TempDir::new("verify");
        let sources = fake_sources(&tmp.0, "v1");
        // A prefix that exists on this machine once "deployed", so verify finds PREFIX/bin/lbd.
        let prefix = tmp.0.join("prefix");
        let destdir = tmp.0.join("root");
        install_files(&sources, &prefix, &destdir).expect("install");
        std::fs::create_dir_all(&prefix).expect("mkdir prefix");
        std::fs::rename(staged(&destdir, &prefix.join("bin")), prefix.join("bin"))
            .expect("deploy the staged binaries");

        let unit = dest(&destdir, UNIT_PATH);
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .expect("run systemd-analyze");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        // Warnings about other units on the machine are not ours; any line about this one is.
        let ours: Vec<&str> = stderr
            .lines()
            .chain(stdout.lines())
            .filter(|l| l.contains("lbd.service"))
            .collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "systemd-analyze verify {}: {}\n{stdout}{stderr}",
            unit.display(),
            out.status
        );
    }

    #[test]
    fn workspace_deploy_files_exist() {
        let root = workspace_root();
        for file in ["deploy/lbd.service", "deploy/lbd.env"] {
            assert!(root.join(file).is_file(), "{file}");
        }
    }
}
