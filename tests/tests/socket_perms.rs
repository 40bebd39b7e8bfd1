//! The control socket's permissions against a real lbd (each alone in a namespace, on `lo`):
//!
//! - created 0660 and owned by root (or by `--socket-group`'s group): forked children that
//!   drop to uid 65534 with chosen groups are refused (`EACCES`) unless they are in the
//!   socket's group, and those in it get answers;
//! - lbd refuses to start, exiting non-zero with a message naming the path and the reason and
//!   touching nothing (no pins, no XDP program, targets left as they were), when the socket
//!   path is a symlink, another user's socket, not a socket, a live lbd's socket, in another
//!   user's folder or in a folder others may write to, or when the group does not exist.

use std::{
    ffi::CString,
    fs,
    os::unix::{
        ffi::OsStrExt as _,
        fs::{MetadataExt as _, PermissionsExt as _, symlink},
        net::UnixListener,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::lb::BareLbd;

/// An unprivileged uid and gid (nobody, nogroup) with no entry needed anywhere.
const NOBODY: u32 = 65_534;
/// How long a refusing lbd may take to exit.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn socket_mode_and_group_decide_who_connects() {
    let bed = BareLbd::new("sp-perm").expect("bed");
    if let Err(e) = mode_and_group(&bed) {
        panic!("{e:#}");
    }
}

fn mode_and_group(bed: &BareLbd) -> Result<()> {
    // Without --socket-group: root's group, 0660.
    let socket = bed.run_dir.join("root.sock");
    let pid = bed.start(&socket, &[])?;
    expect_socket(&socket, 0)?;
    // The data plane really is attached here: the "nothing attached" checks below can fail.
    ensure!(
        bed.data_plane_trace()?.is_some(),
        "a running lbd left no trace in the data plane"
    );
    for (who, gid, groups, want) in [
        ("nobody", NOBODY, vec![], Outcome::Refused(libc::EACCES)),
        ("nobody in group 0", NOBODY, vec![0], Outcome::Served),
        ("uid 65534 with gid 0", 0, vec![], Outcome::Served),
    ] {
        let got = connect_as(&socket, NOBODY, gid, &groups)?;
        ensure!(
            got == want,
            "{who} on {}: {got:?}, expected {want:?}",
            socket.display()
        );
    }
    ensure!(
        connect_as(&socket, 0, 0, &[])? == Outcome::Served,
        "root refused"
    );
    bed.stop(pid)?;

    // With --socket-group: that group, 0660; root's group is out.
    let (group, gid) = some_group()?;
    let socket = bed.run_dir.join("group.sock");
    bed.start(&socket, &["--socket-group", &group])?;
    expect_socket(&socket, gid)?;
    for (who, primary, groups, want) in [
        ("nobody", NOBODY, vec![], Outcome::Refused(libc::EACCES)),
        (
            "nobody in group 0",
            NOBODY,
            vec![0],
            Outcome::Refused(libc::EACCES),
        ),
        (
            "nobody in the socket group",
            NOBODY,
            vec![gid],
            Outcome::Served,
        ),
        (
            "uid 65534 with the socket's gid",
            gid,
            vec![],
            Outcome::Served,
        ),
    ] {
        let got = connect_as(&socket, NOBODY, primary, &groups)?;
        ensure!(
            got == want,
            "{who} on {} (group {group}, gid {gid}): {got:?}, expected {want:?}",
            socket.display()
        );
    }
    eprintln!("socket perms: 0660 root:root and root:{group} ({gid}) checked with 9 clients");
    Ok(())
}

/// The socket is a socket, mode 0660, owned by root and `gid`.
fn expect_socket(socket: &Path, gid: u32) -> Result<()> {
    let meta = fs::symlink_metadata(socket).with_context(|| socket.display().to_string())?;
    let mode = meta.mode() & 0o7777;
    ensure!(
        std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type())
            && mode == 0o660
            && meta.uid() == 0
            && meta.gid() == gid,
        "{}: mode {mode:o}, owner {}:{}, expected a socket 660 0:{gid}",
        socket.display(),
        meta.uid(),
        meta.gid()
    );
    Ok(())
}

/// An existing group other than root's and nogroup (lbd looks `--socket-group` up by name).
fn some_group() -> Result<(String, u32)> {
    let groups = fs::read_to_string("/etc/group").context("reading /etc/group")?;
    groups
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid: u32 = fields.nth(1)?.parse().ok()?;
            (gid != 0 && gid != NOBODY && !name.is_empty()).then(|| (name.to_owned(), gid))
        })
        .context("no group in /etc/group besides root and nogroup")
}

/// What a client got from the socket.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// It connected and `GET /v1/status` came back 200.
    Served,
    /// `connect` failed with this errno.
    Refused(i32),
    /// Anything else (the child's exit status, described).
    Other(String),
}

/// Exit codes of the child besides a connect errno (all below 200).
const CHILD_SERVED: i32 = 200;
const CHILD_BAD_REPLY: i32 = 201;
const CHILD_SETUP: i32 = 202;
const CHILD_IO: i32 = 203;

/// Forks a child that takes `groups`, `gid` and `uid` (in that order: dropping the uid last),
/// connects to `socket` and asks for `/v1/status`. The child calls only async-signal-safe
/// functions, on memory prepared before the fork.
fn connect_as(socket: &Path, uid: u32, gid: u32, groups: &[u32]) -> Result<Outcome> {
    // SAFETY: an all-zero sockaddr_un is valid (AF_UNSPEC, empty path); set below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = CString::new(socket.as_os_str().as_bytes())?;
    let bytes = path.as_bytes_with_nul();
    ensure!(bytes.len() <= addr.sun_path.len(), "socket path too long");
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let request = b"GET /v1/status HTTP/1.1\r\nHost: lbd\r\nConnection: close\r\n\r\n";
    let expect = b"HTTP/1.1 200 ";
    let groups: Vec<libc::gid_t> = groups.to_vec();

    // SAFETY: the child runs only the block below: raw system calls on memory that already
    // exists (no allocation, no locks), then _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: async-signal-safe calls only; every pointer is to live memory of the right
        // size.
        unsafe {
            libc::alarm(10);
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                libc::_exit(CHILD_SETUP);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                libc::_exit(CHILD_SETUP);
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(fd, (&raw const addr).cast(), len) != 0 {
                libc::_exit(*libc::__errno_location());
            }
            let mut sent = 0;
            while sent < request.len() {
                let n = libc::write(fd, request[sent..].as_ptr().cast(), request.len() - sent);
                if n <= 0 {
                    libc::_exit(CHILD_IO);
                }
                sent += n.cast_unsigned();
            }
            let mut reply = [0u8; 13];
            let mut got = 0;
            while got < reply.len() {
                let n = libc::read(fd, reply[got..].as_mut_ptr().cast(), reply.len() - got);
                if n <= 0 {
                    libc::_exit(CHILD_IO);
                }
                got += n.cast_unsigned();
            }
            libc::_exit(if reply == *expect {
                CHILD_SERVED
            } else {
                CHILD_BAD_REPLY
            });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child, status into a local.
    if unsafe { libc::waitpid(pid, &raw mut status, 0) } != pid {
        bail!("waitpid: {}", std::io::Error::last_os_error());
    }
    Ok(if libc::WIFEXITED(status) {
        match libc::WEXITSTATUS(status) {
            CHILD_SERVED => Outcome::Served,
            code @ 1..200 => Outcome::Refused(code),
            CHILD_BAD_REPLY => Outcome::Other("a reply other than 200".into()),
            CHILD_SETUP => Outcome::Other("could not take the uid and groups".into()),
            CHILD_IO => Outcome::Other("connected, then no reply".into()),
            code => Outcome::Other(format!("exit {code}")),
        }
    } else {
        Outcome::Other(format!("killed by signal {}", libc::WTERMSIG(status)))
    })
}

#[test]
fn lbd_refuses_a_socket_it_cannot_trust() {
    let bed = BareLbd::new("sp-refuse").expect("bed");
    if let Err(e) = refusals(&bed) {
        panic!("{e:#}");
    }
}

/// A socket path and what lbd's error must say about it.
struct Refusal {
    what: &'static str,
    socket: PathBuf,
    extra: Vec<&'static str>,
    reason: &'static str,
}

fn refusals(bed: &BareLbd) -> Result<()> {
    let dir = &bed.run_dir;
    let at = |name: &str| dir.join(name);
    let mode = |path: &Path, mode: u32| fs::set_permissions(path, fs::Permissions::from_mode(mode));

    fs::write(at("target"), "keep")?;
    symlink(at("target"), at("link.sock"))?;
    symlink(at("nowhere"), at("dangling.sock"))?;
    fs::write(at("file.sock"), "keep")?;
    drop(UnixListener::bind(at("foreign.sock"))?);
    std::os::unix::fs::lchown(at("foreign.sock"), Some(NOBODY), Some(NOBODY))?;
    fs::create_dir(at("theirs"))?;
    std::os::unix::fs::chown(at("theirs"), Some(NOBODY), Some(NOBODY))?;
    fs::create_dir(at("open"))?;
    mode(&at("open"), 0o777)?;
    fs::create_dir(at("group-writable"))?;
    mode(&at("group-writable"), 0o775)?;
    // Someone answers on it (a running lbd, as far as the check can tell).
    let live_listener = UnixListener::bind(at("live.sock"))?;

    let case = |what, socket: PathBuf, reason| Refusal {
        what,
        socket,
        extra: vec![],
        reason,
    };
    let mut cases = vec![
        case("a symlink to a file", at("link.sock"), "it is a symlink"),
        case("a dangling symlink", at("dangling.sock"), "it is a symlink"),
        case(
            "another user's socket",
            at("foreign.sock"),
            "it is owned by uid 65534",
        ),
        case(
            "a regular file",
            at("file.sock"),
            "it exists and is not a socket",
        ),
        case(
            "a live socket",
            at("live.sock"),
            "another server answers on it",
        ),
        case(
            "in another user's folder",
            at("theirs/lbd.sock"),
            "is owned by uid 65534",
        ),
        case(
            "in a world-writable folder",
            at("open/lbd.sock"),
            "(mode 0777) is writable by other users",
        ),
        case(
            "in a group-writable folder",
            at("group-writable/lbd.sock"),
            "(mode 0775) is writable by other users",
        ),
    ];
    cases.push(Refusal {
        what: "an unknown group",
        socket: at("nogroup.sock"),
        extra: vec!["--socket-group", "lb-test-no-such-group"],
        reason: "\"lb-test-no-such-group\": no such group",
    });
    ensure!(
        bed.data_plane_trace()?.is_none(),
        "the data plane is not clean before the refusals"
    );

    let mut failures = Vec::new();
    for case in &cases {
        if let Err(e) = refusal(bed, case) {
            failures.push(format!("{}: {e:#}", case.what));
        }
    }
    drop(live_listener);
    ensure!(
        fs::read_to_string(at("target"))? == "keep",
        "the link's target changed"
    );
    ensure!(
        fs::read_to_string(at("file.sock"))? == "keep",
        "the file changed"
    );
    ensure!(!at("nowhere").exists(), "lbd followed a dangling link");
    ensure!(
        fs::symlink_metadata(at("foreign.sock"))?.uid() == NOBODY,
        "the foreign socket was replaced"
    );
    eprintln!(
        "socket refusals: {} cases, {} wrong",
        cases.len(),
        failures.len()
    );
    ensure!(failures.is_empty(), "{}", failures.join("\n\n"));
    Ok(())
}

/// lbd exits non-zero, its error names the path and the reason, and it touched nothing.
fn refusal(bed: &BareLbd, case: &Refusal) -> Result<()> {
    let before = fs::symlink_metadata(&case.socket)
        .ok()
        .map(|m| (m.ino(), m.mode()));
    let run = bed.run(&case.socket, &case.extra, REFUSAL_TIMEOUT)?;
    let stderr = &run.stderr;
    ensure!(
        !run.success() && run.code().is_some(),
        "lbd did not refuse: {}",
        run.describe()
    );
    let path = case.socket.display().to_string();
    // A missing group is not about the path: the error names the group instead.
    let names_path = !case.extra.is_empty() || stderr.contains(&path);
    ensure!(
        names_path && stderr.contains(case.reason),
        "the error does not name {path} and {:?}: {}",
        case.reason,
        run.describe()
    );
    let after = fs::symlink_metadata(&case.socket)
        .ok()
        .map(|m| (m.ino(), m.mode()));
    ensure!(
        before == after,
        "lbd changed {path}: {before:?} -> {after:?}"
    );
    if let Some(trace) = bed.data_plane_trace()? {
        bail!("lbd refused but left {trace}: {}", run.describe());
    }
    Ok(())
}
