//! `lbd --detach-on-exit`: takes lbd's data plane out of the kernel. Every link pinned under the
//! pin folder (`links/` for `lb_xdp`, `hc-links/` for `lb_hc_encap`) is detached with
//! `BPF_LINK_DETACH`, so the interface stops running the program at once even if another
//! process holds the link open, and its pin removed; then the map pins and the folders go. The
//! programs and maps themselves are freed when lbd's own descriptors close at exit.
//!
//! Only what lbd pins is removed: a file it does not know in one of its folders is left alone
//! and reported (the folder then stays too).

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use lb_common::maps;

use super::{KernelDataPlane, hc};
use crate::dataplane::DataPlaneError;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `bpf_attr` for `BPF_OBJ_GET` (`pathname`, `bpf_fd`, `file_flags` in `linux/bpf.h`).
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `bpf_attr` for `BPF_LINK_DETACH` (`struct { __u32 link_fd; } link_detach`).
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// What [`KernelDataPlane::detach_and_unpin`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Detached {
    /// Interfaces whose `lb_xdp` link was detached.
    pub xdp: Vec<String>,
    /// Interfaces whose `lb_hc_encap` (tcx) link was detached.
    pub hc: Vec<String>,
    /// Map pins removed.
    pub maps: usize,
}

impl KernelDataPlane {
    /// Detaches every pinned link and removes every pin and the pin folder. Goes on past a
    /// failure so as much as possible is removed, and returns the first failure (each is
    /// logged). Afterwards the data plane lives only as long as this process's descriptors.
    pub fn detach_and_unpin(&mut self) -> Result<Detached, DataPlaneError> {
        let mut cleanup = Cleanup::default();
        let pin_dir = self.pin_dir.clone();
        // The XDP links first: from here on the interfaces pass every packet to the stack.
        cleanup.xdp_links = cleanup.links(&pin_dir.join("links"));
        cleanup.hc_links = cleanup.links(&pin_dir.join(hc::LINK_DIR));
        let map_dir = pin_dir.join("maps");
        for name in maps::BALANCER_MAPS {
            let pin = map_dir.join(name);
            match fs::remove_file(&pin) {
                Ok(()) => cleanup.maps += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => cleanup.failed(DataPlaneError::Pin { path: pin, source }),
            }
        }
        for dir in [
            map_dir,
            pin_dir.join("links"),
            pin_dir.join(hc::LINK_DIR),
            pin_dir,
        ] {
            cleanup.remove_dir(&dir);
        }
        match cleanup.first_error {
            Some(e) => Err(e),
            None => Ok(Detached {
                xdp: cleanup.xdp_links,
                hc: cleanup.hc_links,
                maps: cleanup.maps,
            }),
        }
    }
}

#[derive(Default)]
struct Cleanup {
    xdp_links: Vec<String>,
    hc_links: Vec<String>,
    maps: usize,
    first_error: Option<DataPlaneError>,
}

impl Cleanup {
    fn failed(&mut self, e: DataPlaneError) {
        tracing::warn!(error = %e, "detaching the data plane");
        self.first_error.get_or_insert(e);
    }

    /// Detaches and unpins every link pinned in `dir`; the interfaces done.
    fn links(&mut self, dir: &Path) -> Vec<String> {
        let mut pins: Vec<PathBuf> = match fs::read_dir(dir) {
            Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(source) => {
                self.failed(DataPlaneError::Pin {
                    path: dir.to_path_buf(),
                    source,
                });
                return Vec::new();
            }
        };
        pins.sort();
        let mut done = Vec::new();
        for pin in pins {
            let iface = pin
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // Unpinned even when the detach fails: the link then goes with lbd's descriptors.
            if let Err(e) = detach_link(&pin) {
                self.failed(DataPlaneError::Interface {
                    iface: iface.clone(),
                    reason: format!("detaching the link pinned at {}: {e}", pin.display()),
                });
            }
            match fs::remove_file(&pin) {
                Ok(()) => done.push(iface),
                Err(source) => self.failed(DataPlaneError::Pin { path: pin, source }),
            }
        }
        done
    }

    fn remove_dir(&mut self, dir: &Path) {
        match fs::remove_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
                let left: Vec<String> = fs::read_dir(dir)
                    .map(|entries| {
                        entries
                            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into()))
                            .collect()
                    })
                    .unwrap_or_default();
                self.failed(DataPlaneError::Pin {
                    path: dir.to_path_buf(),
                    source: io::Error::other(format!(
                        "not removed: it holds files lbd did not pin: {}",
                        left.join(", ")
                    )),
                });
            }
            Err(source) => self.failed(DataPlaneError::Pin {
                path: dir.to_path_buf(),
                source,
            }),
        }
    }
}

fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, valid for its
    // size; the kernel zero-extends a short attr and reads nothing beyond `size`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<A>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens the link pinned at `pin` and detaches it (`BPF_LINK_DETACH`): the hook stops running
/// its program now, and the link stays only as an empty shell until its last descriptor
/// closes. A link whose interface is already gone detaches without complaint.
fn detach_link(pin: &Path) -> io::Result<()> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("path contains a NUL byte"))?;
    let mut get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut get)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut detach = LinkDetachAttr {
        link_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
    };
    bpf(BPF_LINK_DETACH, &mut detach).map(drop)
}
