//! The control socket on disk: where it may be created, its mode and group. lbd refuses to
//! take over anything but a dead socket of its own.

use std::{
    ffi::CString,
    fs::{self, DirBuilder, Permissions},
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    },
    path::Path,
};

use tokio::net::UnixListener;

use super::ServerError;

const LISTEN_BACKLOG: i32 = 128;
const SOCKET_MODE: u32 = 0o660;

/// Binds the control socket at `path`, mode 0660, owned by lbd's uid and `group` (else lbd's
/// gid). Creates the parent folder (0755) if missing. Refuses a folder of another user or one
/// others may write to, a symlink, anything that is not a socket, a socket of another user and
/// a socket someone answers on; removes a stale one of ours.
///
/// Must be called within a Tokio runtime.
pub fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener, ServerError> {
    // A misspelt group fails before anything on disk changes.
    let gid = group.map(|g| group_id(g).map(|gid| (g, gid))).transpose()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| ServerError::CreateDir {
                path: path.to_owned(),
                source,
            })?;
    }
    check_folder(path)?;
    remove_stale(path)?;
    let listener = bind_socket(path)?;
    if let Err(e) = restrict(path, gid) {
        drop(listener);
        if let Err(rm) = fs::remove_file(path) {
            tracing::warn!("control socket {}: cannot remove it: {rm}", path.display());
        }
        return Err(e);
    }
    Ok(listener)
}

/// The socket's folder must be lbd's own (or root's) and closed to other writers: whoever may
/// write to it can swap the socket for theirs and speak for lbd to every lbctl. A sticky folder
/// such as /tmp is safe (nobody else can rename or remove our entry).
fn check_folder(path: &Path) -> Result<(), ServerError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    // Follows links: what counts is the folder the socket really lands in.
    let meta = fs::metadata(dir).map_err(|source| ServerError::Inspect {
        path: path.to_owned(),
        source,
    })?;
    let euid = euid();
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(ServerError::FolderNotOurs {
            path: path.to_owned(),
            dir: dir.to_owned(),
            owner: meta.uid(),
            euid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(ServerError::FolderWritable {
            path: path.to_owned(),
            dir: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Checks what is at `path` and removes it only if it is a dead socket of ours.
fn remove_stale(path: &Path) -> Result<(), ServerError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::Inspect {
                path: path.to_owned(),
                source,
            });
        }
    };
    let path_buf = || path.to_owned();
    if meta.file_type().is_symlink() {
        return Err(ServerError::Symlink { path: path_buf() });
    }
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket { path: path_buf() });
    }
    let euid = euid();
    if meta.uid() != euid {
        return Err(ServerError::NotOurs {
            path: path_buf(),
            owner: meta.uid(),
            euid,
        });
    }
    // A socket someone still listens on belongs to a running lbd: taking its path would
    // leave it unreachable.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ServerError::InUse { path: path_buf() });
    }
    // unlink does not follow symlinks: a swap since the check removes the link, nothing else.
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ServerError::RemoveStale {
            path: path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// `bind()` creates the file and fails if anything (even a dangling symlink) is at `path`, so it
/// never follows a link planted after the checks.
fn bind_socket(path: &Path) -> Result<UnixListener, ServerError> {
    let bind_error = |source| ServerError::Bind {
        path: path.to_owned(),
        source,
    };
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
        .map_err(bind_error)?;
    // Linux creates the socket file with this mode (minus the umask): it never exists more
    // open than 0660, not even between bind and chmod.
    // SAFETY: fchmod on a descriptor we own; no memory is passed.
    if unsafe { libc::fchmod(socket.as_raw_fd(), SOCKET_MODE) } != 0 {
        return Err(bind_error(io::Error::last_os_error()));
    }
    socket
        .bind(&socket2::SockAddr::unix(path).map_err(bind_error)?)
        .map_err(bind_error)?;
    let listening = socket
        .listen(LISTEN_BACKLOG)
        .and_then(|()| socket.set_nonblocking(true))
        .and_then(|()| UnixListener::from_std(socket.into()));
    listening.map_err(|source| {
        if let Err(rm) = fs::remove_file(path) {
            tracing::warn!("control socket {}: cannot remove it: {rm}", path.display());
        }
        bind_error(source)
    })
}

/// Mode exactly 0660 (the umask may have taken group bits) and the group, if any.
fn restrict(path: &Path, group: Option<(&str, u32)>) -> Result<(), ServerError> {
    // set_permissions follows links, but swapping the fresh socket for one takes write access
    // to its folder, and whoever has that can replace the socket anyway.
    fs::set_permissions(path, Permissions::from_mode(SOCKET_MODE)).map_err(|source| {
        ServerError::Chmod {
            path: path.to_owned(),
            source,
        }
    })?;
    if let Some((name, gid)) = group {
        std::os::unix::fs::lchown(path, Some(euid()), Some(gid)).map_err(|source| {
            ServerError::Chown {
                path: path.to_owned(),
                group: name.to_owned(),
                source,
            }
        })?;
    }
    Ok(())
}

pub(super) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The gid of group `name`, from the system's group database (files, LDAP, ...).
pub(super) fn group_id(name: &str) -> Result<u32, ServerError> {
    let unknown = || ServerError::UnknownGroup {
        group: name.to_owned(),
    };
    let c_name = CString::new(name).map_err(|_| unknown())?;
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: an all-zero `group` (integers and null pointers) is a valid value.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and `buf.len()` is the buffer's size;
        // getgrnam_r writes only into `group`, `buf` and `found`.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &raw mut group,
                buf.as_mut_ptr(),
                buf.len(),
                &raw mut found,
            )
        };
        match rc {
            0 if found.is_null() => return Err(unknown()),
            0 => return Ok(group.gr_gid),
            libc::ENOENT => return Err(unknown()),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            e => {
                return Err(ServerError::GroupLookup {
                    group: name.to_owned(),
                    source: io::Error::from_raw_os_error(e),
                });
            }
        }
    }
}
