//! The data plane's debug log: a tokio task reads the aya-log records `lb_xdp` writes into its
//! `AYA_LOGS` ring buffer while `CFG_F_DEBUG` is set, and hands them to the `log` crate, whose
//! records lbd's tracing subscriber prints (target `lb_xdp`, level DEBUG).
//!
//! The ring belongs to the loaded program, and a program that `lbd upgrade` swaps into the
//! links brings a ring of its own. So the task follows the program the pinned links run: every
//! `FOLLOW_INTERVAL` it reads the program id of the first link under `<pin_dir>/links` and, when
//! that is not the program it reads, moves to that program's ring (`EbpfLogger::init_from_id`).
//! A ring holds 128 KiB of records until it is read, so the move loses nothing short of that.

use std::{
    fs,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf,
    programs::links::{FdLink, PinnedLink},
};
use aya_log::EbpfLogger;
use lb_common::maps;
use tokio::{
    io::{Interest, unix::AsyncFd},
    runtime::Handle,
    task::JoinHandle,
    time::{self, Instant, MissedTickBehavior},
};

/// How often the reader checks which program the links run.
const FOLLOW_INTERVAL: Duration = Duration::from_secs(2);

/// The reading task; dropping it stops the task.
#[derive(Debug)]
pub struct LogReader(JoinHandle<()>);

impl Drop for LogReader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Takes `AYA_LOGS` out of `ebpf` (its `lb_xdp` loaded) and reads it on the current tokio
/// runtime, following the program the links pinned under `link_dir` run. The data plane
/// forwards without its debug log, so a missing runtime or ring only costs a warning and `None`.
pub fn start(ebpf: &mut Ebpf, link_dir: PathBuf) -> Option<LogReader> {
    let Ok(runtime) = Handle::try_current() else {
        tracing::warn!("no tokio runtime: the data plane's debug log will not be read");
        return None;
    };
    let mut reading = ebpf
        .program(maps::PROG_LB)
        .and_then(|program| program.info().ok())
        .map(|info| info.id());
    let logger = match EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            tracing::warn!(error = %e, "the data plane's debug log cannot be read");
            return None;
        }
    };
    let mut ring = register(logger)?;
    let task = runtime.spawn(async move {
        // Not at once: the links run the previous program until lbd attaches this one.
        let mut follow = time::interval_at(Instant::now() + FOLLOW_INTERVAL, FOLLOW_INTERVAL);
        follow.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let moved = tokio::select! {
                ready = ring.readable_mut() => {
                    let mut guard = match ready {
                        Ok(guard) => guard,
                        Err(e) => {
                            tracing::warn!(error = %e, "the data plane's debug log stopped");
                            return;
                        }
                    };
                    // Drains every record so far; the ring wakes us again for the next one.
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                    None
                }
                _ = follow.tick() => linked_program(&link_dir).filter(|id| Some(*id) != reading),
            };
            let Some(program) = moved else {
                continue;
            };
            // Tried once per program: a failure is warned about, not retried every interval.
            reading = Some(program);
            let next = match EbpfLogger::init_from_id(program) {
                Ok(logger) => register(logger),
                Err(e) => {
                    tracing::warn!(
                        program,
                        error = %e,
                        "cannot read the debug log of the program the links run"
                    );
                    None
                }
            };
            if let Some(next) = next {
                // The last records of the program the links ran before.
                ring.get_mut().flush();
                ring = next;
                tracing::info!(
                    program,
                    cause = "the program in the links was replaced (lbd upgrade)",
                    "data-plane debug log: reading the program the links now run"
                );
            }
        }
    });
    Some(LogReader(task))
}

/// The logger's ring, polled by the runtime.
fn register<T: AsRawFd>(logger: T) -> Option<AsyncFd<T>> {
    // SAFETY: the logger owns the ring's descriptor, which stays open and the same for as long
    // as the logger lives, and nothing here replaces it.
    match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(ring) => Some(ring),
        Err(e) => {
            tracing::warn!(error = %e, "the data plane's debug log cannot be polled");
            None
        }
    }
}

/// The program the first link pinned in `link_dir` runs (every link runs the same one).
fn linked_program(link_dir: &Path) -> Option<u32> {
    let mut pins: Vec<PathBuf> = fs::read_dir(link_dir)
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    pins.sort();
    pins.iter().find_map(|pin| {
        // Only opens the link: dropping the descriptor leaves the pin and the attachment.
        let link = FdLink::from(PinnedLink::from_pin(pin).ok()?);
        Some(link.info().ok()?.program_id())
    })
}
