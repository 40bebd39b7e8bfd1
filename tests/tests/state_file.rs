//! The state file under damage (issue 7).
//!
//! - `damaged_state_file_stops_lbd_and_is_kept`: a truncated file, binary garbage, text that is
//!   not TOML, the wrong schema (a config file, a JSON document), an empty file and a folder in
//!   its place each stop lbd at start with the file and the problem named (toml's line and
//!   column where it has them); the file is left byte for byte, and lbd touched neither the
//!   data plane nor its socket.
//! - `full_or_read_only_state_folder_fails_changes_cleanly`: lbd keeps its state on a small
//!   tmpfs. Filled to ENOSPC, then remounted read-only, a change through lbctl fails naming the
//!   state file and the OS error, and the export, the state file and the pinned maps stay as
//!   they were; with room again the same change goes through. The tmpfs is unmounted on drop.

use std::{
    ffi::CString,
    fs,
    io::Write as _,
    net::IpAddr,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{
    lb::{BareLbd, Lbd, Unchanged, VipConfig, render_config},
    lbctl::Run,
    netns::topology::Topology,
};
use lb_userspace::{config, dataplane::kernel::AttachMode, model::VipId};

const PORT: u16 = 80;
const RING: u32 = 251;

#[test]
fn damaged_state_file_stops_lbd_and_is_kept() {
    let bare = BareLbd::new("sfbad").expect("bare lbd");
    if let Err(e) = damaged(&bare) {
        panic!("{e:#}");
    }
}

fn damaged(bare: &BareLbd) -> Result<()> {
    let socket = bare.run_dir.join("lbd.sock");
    // A whole state file as lbd writes it (header, then the VIP list), to cut short.
    let state = config::parse_config(
        "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nring_size = 7\nbackends = [\n  \
         { address = \"10.1.0.1\" },\n  { address = \"10.1.0.2\", weight = 50 },\n]\n",
    )?
    .state;
    let whole = format!("# lbd's saved state\n\n{}", config::state_to_toml(&state));
    let cut = &whole.as_bytes()[..whole.len() * 2 / 3];
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "truncated",
            cut.to_vec(),
            vec!["TOML parse error at line", "column"],
        ),
        (
            "binary garbage",
            b"\x7fELF\x02\x01\x01\0\0\xff\xfe\0".to_vec(),
            vec!["not UTF-8 text (invalid byte at offset 9)"],
        ),
        (
            "text garbage",
            b"this is not TOML {{{\n".to_vec(),
            vec!["TOML parse error at line 1"],
        ),
        (
            "a config file",
            b"[settings]\nencap_source_prefix = \"172.16.0.0/16\"\n".to_vec(),
            vec!["line 1", "unknown field `settings`"],
        ),
        (
            "JSON",
            br#"{"vip": [{"address": "10.0.0.1:80/tcp"}]}"#.to_vec(),
            vec!["TOML parse error at line 1"],
        ),
        (
            "an invalid VIP",
            b"vip = [{ address = \"10.0.0.1:80/tcp\", ring_size = 8 }]\n".to_vec(),
            vec!["ring_size: 8 is not prime"],
        ),
        ("empty", Vec::new(), vec!["no `vip` key", "cut short"]),
    ];
    let path = bare.state_path.display().to_string();
    let named = format!("state file {path}: ");
    let mut checked = 0;
    for (what, bytes, wants) in &cases {
        fs::write(&bare.state_path, bytes)?;
        let run = bare.run(&socket, &[], Duration::from_secs(20))?;
        refused(bare, &socket, what, &run, &named, wants)?;
        ensure!(
            fs::read(&bare.state_path)? == *bytes,
            "{what}: the state file changed"
        );
        checked += 1;
    }
    // A folder where the file should be.
    fs::remove_file(&bare.state_path)?;
    fs::create_dir(&bare.state_path)?;
    fs::write(bare.state_path.join("keep"), "x")?;
    let run = bare.run(&socket, &[], Duration::from_secs(20))?;
    refused(
        bare,
        &socket,
        "a folder",
        &run,
        &format!("{named}cannot read"),
        &["Is a directory"],
    )?;
    ensure!(
        fs::read_to_string(bare.state_path.join("keep"))? == "x",
        "the folder changed"
    );
    checked += 1;
    fs::remove_dir_all(&bare.state_path)?;
    // The whole file starts.
    fs::write(&bare.state_path, &whole)?;
    let pid = bare.start(&socket, &[])?;
    bare.stop(pid)?;
    eprintln!("damaged state files: {checked} refusals at start checked");
    Ok(())
}

/// lbd exited non-zero saying `named` and every one of `wants`, and left no trace.
fn refused(
    bare: &BareLbd,
    socket: &Path,
    what: &str,
    run: &Run,
    named: &str,
    wants: &[&str],
) -> Result<()> {
    ensure!(
        run.code() == Some(1),
        "{what}: expected exit 1: {}",
        run.describe()
    );
    for want in std::iter::once(&named).chain(wants) {
        ensure!(
            run.stderr.contains(want),
            "{what}: stderr does not say {want:?}: {}",
            run.describe()
        );
    }
    if let Some(trace) = bare.data_plane_trace()? {
        bail!("{what}: {trace}");
    }
    ensure!(!socket.exists(), "{what}: the socket was created");
    Ok(())
}

/// A small tmpfs mounted for the test, unmounted (lazily, so a busy file cannot keep it) and
/// its mount point removed on drop, whatever happened.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: PathBuf, size: &str) -> Result<Self> {
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let tmpfs = Self { path };
        tmpfs.mount_call(None, &format!("size={size},mode=0755"))?;
        Ok(tmpfs)
    }

    /// `mount -o remount,ro` (or `rw`).
    fn remount(&self, read_only: bool) -> Result<()> {
        let flags = libc::MS_REMOUNT | if read_only { libc::MS_RDONLY } else { 0 };
        self.mount_call(Some(flags), "")
    }

    fn mount_call(&self, flags: Option<libc::c_ulong>, data: &str) -> Result<()> {
        let target = CString::new(self.path.as_os_str().as_bytes())?;
        let fstype = CString::new("tmpfs")?;
        let data = CString::new(data)?;
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                flags.unwrap_or(0),
                data.as_ptr().cast(),
            )
        };
        ensure!(
            rc == 0,
            "mount tmpfs on {} (flags {flags:?}): {}",
            self.path.display(),
            std::io::Error::last_os_error()
        );
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.path.as_os_str().as_bytes()) {
            // SAFETY: a NUL-terminated path.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                eprintln!(
                    "unmounting {}: {}",
                    self.path.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        let _ = fs::remove_dir(&self.path);
    }
}

#[test]
fn full_or_read_only_state_folder_fails_changes_cleanly() {
    let topo = Topology::one_arm("sfull")
        .backends(2)
        .build()
        .expect("topology");
    let vip = VipConfig {
        address: format!("{}:{PORT}/tcp", topo.vip),
        ring_size: Some(RING),
        backends: vec![(IpAddr::V4(topo.backends[0].ip()), 100)],
    };
    let gw = topo.gw();
    let mut lbd = Lbd::start(
        &gw.ns,
        &gw.ifaces(),
        AttachMode::Generic,
        &render_config(&[vip]),
    )
    .expect("lbd");
    // Outside lbd's run folder, which its guard removes; named after the namespace.
    let mount = lbd
        .run_dir
        .with_file_name(format!("{}-statefs", gw.ns.name()));
    let tmpfs = Tmpfs::mount(mount, "1m").expect("tmpfs");
    let result = move_state(&mut lbd, &tmpfs.path).and_then(|()| no_room(&topo, &lbd, &tmpfs));
    lbd.finish(result, |_| false);
}

/// Restarts lbd (SIGTERM, then the same arguments) with its state file moved onto the tmpfs.
fn move_state(lbd: &mut Lbd, dir: &Path) -> Result<()> {
    let status = lbd.terminate()?;
    ensure!(status.success(), "lbd exited {status} on SIGTERM");
    let moved = dir.join("state.toml");
    fs::copy(&lbd.state_path, &moved).context("copying the state file")?;
    lbd.state_path = moved;
    lbd.spawn_with_args(&[])
}

fn no_room(topo: &Topology, lbd: &Lbd, tmpfs: &Tmpfs) -> Result<()> {
    let lbctl = lbd.lbctl()?;
    let v0 = format!("{}:{PORT}/tcp", topo.vip);
    let key = v0.parse::<VipId>()?.key();
    let b1 = IpAddr::V4(topo.backends[1].ip());
    let b1s = b1.to_string();
    wait_for(|| Ok(lbd.maps()?.table_addrs(&key)?.len() == 1))?;
    let before = Unchanged::take(lbd)?;
    let state = lbd.state_path.display().to_string();
    let add = ["backend", "add", v0.as_str(), b1s.as_str()];
    let new_vip = format!("{}:{}/tcp", topo.vip, PORT + 1);
    let ring = RING.to_string();
    let add_vip = ["vip", "add", new_vip.as_str(), "--ring-size", ring.as_str()];

    // Full: every page of the tmpfs taken by a filler file.
    let filler = tmpfs.path.join("filler");
    fill(&filler)?;
    for args in [&add[..], &add_vip[..]] {
        failed(
            &lbctl.run(args)?,
            &[
                &format!("state file {state}: cannot save"),
                "No space left on device",
            ],
        )?;
    }
    ensure!(
        Unchanged::take(lbd)? == before,
        "a change that could not be saved changed something"
    );
    fs::remove_file(&filler)?;

    // Read-only.
    tmpfs.remount(true)?;
    let run = lbctl.run(add)?;
    tmpfs.remount(false)?;
    failed(
        &run,
        &[
            &format!("state file {state}: cannot save"),
            "Read-only file system",
        ],
    )?;
    ensure!(
        Unchanged::take(lbd)? == before,
        "a change that could not be saved changed something"
    );
    let left: Vec<_> = fs::read_dir(&tmpfs.path)?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    ensure!(
        left.len() == 1,
        "temp files left beside the state file: {left:?}"
    );

    // With room again the same change goes through, to the file and the data plane.
    lbctl.ok(add)?;
    wait_for(|| lbd.maps()?.table_has(&key, b1))?;
    let saved = fs::read_to_string(&lbd.state_path)?;
    ensure!(
        saved.contains(&b1s),
        "the state file lacks the backend:\n{saved}"
    );
    Ok(())
}

/// Writes `path` until the filesystem has no room left.
fn fill(path: &Path) -> Result<()> {
    let mut file = fs::File::create(path)?;
    let chunk = vec![0u8; 64 << 10];
    loop {
        match file.write(&chunk) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(()),
            Err(e) => return Err(e).context("filling the tmpfs"),
        }
    }
}

/// lbctl failed (exit 1) and its error says every one of `wants`.
fn failed(run: &Run, wants: &[&str]) -> Result<()> {
    ensure!(run.code() == Some(1), "expected exit 1: {}", run.describe());
    for want in wants {
        ensure!(
            run.stderr.contains(want),
            "stderr does not say {want:?}: {}",
            run.describe()
        );
    }
    Ok(())
}

fn wait_for(mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done()? {
        ensure!(Instant::now() < deadline, "not done after 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
