//! The real data plane: loads `lb_xdp`, pins its maps and links under a bpffs folder, and adopts
//! what an earlier lbd pinned there. Adoption is what keeps established connections alive across
//! restarts and upgrades: the maps (flow table included) are reopened from their pins, and the
//! freshly loaded program replaces the old one inside the pinned link (`BPF_LINK_UPDATE`), so the
//! interface is never without a program. The same object's `lb_hc_encap` (tc egress, see
//! `kernel/hc.rs`) sends health checks through the backends' tunnels on the same maps.

mod batch;
mod counters;
mod detach;
mod hc;
mod log;
mod pins;
mod upgrade;

use std::{
    fs, io,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, IterableMap as _, Map, MapData, MapError},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
    sys::SyscallError,
};
use lb_common::{BackendSlot, FlowKey, FlowValue, GlobalConfig, VipKey, VipMeta, maps};

pub use self::upgrade::upgrade;
pub use batch::{sum_per_cpu_u64, update_entries};
pub use counters::KernelCounters;
pub use detach::Detached;

use super::{CounterTable, DataPlane, DataPlaneError, FlowTable};

/// How the program is attached to an interface (`--xdp-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AttachMode {
    /// In the driver (fastest; on veth the peer needs an XDP program for `XDP_TX` and redirects).
    Native,
    /// In the generic network stack (works everywhere, slower).
    Generic,
    /// Let the kernel pick: native where the driver supports it.
    #[default]
    Auto,
}

impl AttachMode {
    pub(super) fn xdp_mode(self) -> XdpMode {
        match self {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic => XdpMode::Skb,
            AttachMode::Auto => XdpMode::Default,
        }
    }
}

impl FromStr for AttachMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "native" => Ok(Self::Native),
            "generic" => Ok(Self::Generic),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "xdp mode {other:?}: expected native, generic or auto"
            )),
        }
    }
}

/// Sizes and places chosen at load time.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// bpffs folder for pins: `<pin_dir>/maps/<MAP>` and `<pin_dir>/links/<iface>`.
    pub pin_dir: PathBuf,
    pub flow_table_size: u32,
    pub ring_pool_size: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from("/sys/fs/bpf/lb"),
            flow_table_size: maps::DEFAULT_FLOWS,
            ring_pool_size: maps::DEFAULT_RING_POOL,
        }
    }
}

/// Largest flow table (`--flow-table-size`): 2^27 entries. The kernel sizes a hash map's bucket
/// array at the next power of two of its entries, 16 bytes a bucket, and refuses more than
/// `U32_MAX / 16` buckets (`htab_map_alloc`), so 2^27 is the most it creates; that is about
/// 15 GiB of memory (see [`flow_table_bytes`]).
pub const MAX_FLOW_TABLE_SIZE: u32 = 1 << 27;

/// Kernel memory a flow table of `entries` takes, all allocated when it is created (the LRU
/// hash is preallocated): per entry the kernel's element header (48 bytes) plus the key and
/// value rounded to 8 bytes (40 + 16), and per bucket 16 bytes, buckets being the next power
/// of two of the entries. 1M entries: about 120 MiB.
pub fn flow_table_bytes(entries: u32) -> u64 {
    const ELEM_HEADER: u64 = 48;
    const BUCKET: u64 = 16;
    let round8 = |n: usize| (n as u64).div_ceil(8) * 8;
    let elem = ELEM_HEADER + round8(size_of::<FlowKey>()) + round8(size_of::<FlowValue>());
    u64::from(entries) * elem + u64::from(entries).next_power_of_two() * BUCKET
}

/// Why a flow-table size cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FlowTableSizeError {
    #[error("must be at least 1")]
    Zero,
    #[error(
        "{entries} is above the maximum of {MAX_FLOW_TABLE_SIZE} (2^27: the kernel refuses \
         larger hash maps)"
    )]
    TooLarge { entries: u32 },
    #[error(
        "{entries} entries need about {need} MiB of kernel memory ({per_entry} bytes an entry), \
         more than the {available} MiB this host has available (MemAvailable)",
        need = bytes / (1 << 20),
        available = available / (1 << 20),
        per_entry = bytes / u64::from(*entries)
    )]
    NoMemory {
        entries: u32,
        bytes: u64,
        available: u64,
    },
    #[error("reading /proc/meminfo: {0}")]
    MemInfo(#[source] io::Error),
}

/// Refuses a flow-table size of 0 or above [`MAX_FLOW_TABLE_SIZE`].
pub fn check_flow_table_size(entries: u32) -> Result<(), FlowTableSizeError> {
    match entries {
        0 => Err(FlowTableSizeError::Zero),
        n if n > MAX_FLOW_TABLE_SIZE => Err(FlowTableSizeError::TooLarge { entries }),
        _ => Ok(()),
    }
}

/// Refuses a flow table that would not fit in the host's available memory. Only a table lbd
/// creates allocates memory, so a table already pinned under `pin_dir` (adopted as it is,
/// whatever size is asked) passes.
pub fn check_flow_table_memory(entries: u32, pin_dir: &Path) -> Result<(), FlowTableSizeError> {
    if pin_dir.join("maps").join(maps::FLOWS).exists() {
        return Ok(());
    }
    let meminfo = fs::read_to_string("/proc/meminfo").map_err(FlowTableSizeError::MemInfo)?;
    let available = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| FlowTableSizeError::MemInfo(io::Error::other("no MemAvailable line")))?
        * 1024;
    fits_in_memory(entries, available)
}

/// Refuses a flow table larger than `available` bytes.
fn fits_in_memory(entries: u32, available: u64) -> Result<(), FlowTableSizeError> {
    let bytes = flow_table_bytes(entries);
    if bytes > available {
        return Err(FlowTableSizeError::NoMemory {
            entries,
            bytes,
            available,
        });
    }
    Ok(())
}

/// Whether `attach` found a pinned link and swapped the program inside it, or made a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    Adopted,
    New,
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The maps lbd writes, opened (or created) from their pins.
pub struct KernelDataPlane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    vips: HashMap<MapData, VipKey, VipMeta>,
    vip_addrs: HashMap<MapData, VipKey, u32>,
    rings: Array<MapData, u32>,
    ring_pool_size: u32,
    backends: Array<MapData, BackendSlot>,
    config: Array<MapData, GlobalConfig>,
    tx_ports: DevMapHash<MapData>,
    flows: Arc<KernelFlows>,
    counters: Arc<KernelCounters>,
    /// Reads `lb_xdp`'s debug log (`None` when it cannot, see `kernel/log.rs`).
    _log: Option<log::LogReader>,
}

/// A read handle on `LB_FLOWS` (its own descriptor), shareable with a blocking scan task.
#[derive(Debug)]
pub struct KernelFlows {
    fd: OwnedFd,
    max_entries: u32,
}

impl KernelFlows {
    fn new(ebpf: &Ebpf) -> Result<Self, DataPlaneError> {
        let name = maps::FLOWS;
        let info = loaded_map(ebpf, name)?
            .info()
            .map_err(|e| DataPlaneError::map(name, e))?;
        // The raw batch calls write whole keys and values into buffers of these types.
        let (key, value) = (size_of::<FlowKey>(), size_of::<FlowValue>());
        let (key_size, value_size) = (info.key_size() as usize, info.value_size() as usize);
        if key_size != key {
            let e = MapError::InvalidKeySize {
                size: key_size,
                expected: key,
            };
            return Err(DataPlaneError::map(name, e));
        }
        if value_size != value {
            let e = MapError::InvalidValueSize {
                size: value_size,
                expected: value,
            };
            return Err(DataPlaneError::map(name, e));
        }
        Ok(Self {
            fd: map_fd(ebpf, name)?,
            max_entries: info.max_entries(),
        })
    }

    /// Entries the table holds at most (the size it was created with).
    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }
}

impl FlowTable for KernelFlows {
    /// One `BPF_MAP_LOOKUP_BATCH` per few thousand entries (key by key on kernels before 5.6).
    fn for_each_flow(&self, f: &mut dyn FnMut(&FlowValue)) -> Result<(), DataPlaneError> {
        batch::for_each_entry::<FlowKey, FlowValue>(
            self.fd.as_fd(),
            self.max_entries,
            &mut |_, v| f(v),
        )
        .map_err(|e| syscall_error(maps::FLOWS, e))
    }
}

/// Every map of the balancer object, all pinned.
const PINNED_MAPS: [&str; maps::BALANCER_MAPS.len()] = maps::BALANCER_MAPS;

impl KernelDataPlane {
    /// Loads `lb_xdp`, reopening every map already pinned under `pin_dir` and creating and
    /// pinning the rest. Nothing is attached yet.
    pub fn load(opts: &LoadOptions) -> Result<Self, DataPlaneError> {
        ensure_bpffs(&opts.pin_dir)?;
        let map_dir = opts.pin_dir.join("maps");
        fs::create_dir_all(&map_dir).map_err(|source| DataPlaneError::Pin {
            path: map_dir.clone(),
            source,
        })?;

        // Pins of an older shape: rebuilt maps are created anew, the rest must match.
        pins::check(
            &map_dir,
            crate::lb_object(),
            pins::OnMismatch::ReplaceRebuilt,
        )?;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(maps::FLOWS, opts.flow_table_size)
            .map_max_entries(maps::RINGS, opts.ring_pool_size);
        for name in PINNED_MAPS {
            loader.map_pin_path(name, map_dir.join(name));
        }
        let mut ebpf = loader
            .load(crate::lb_object())
            .map_err(|e| DataPlaneError::Load(Box::new(e)))?;

        let program: &mut Xdp = program_mut(&mut ebpf)?;
        program
            .load()
            .map_err(|e| program_error(maps::PROG_LB, e))?;

        // A pinned map keeps the size it was created with; the allocator must use that one.
        let ring_pool_size = max_entries(&ebpf, maps::RINGS)?;
        let flows = KernelFlows::new(&ebpf)?;
        // Takes AYA_LOGS out of `ebpf`, as the maps below are; follows the program in the
        // links attach pins (or an upgrade replaces).
        let log = log::start(&mut ebpf, opts.pin_dir.join("links"));
        Ok(Self {
            vips: take_typed(&mut ebpf, maps::VIPS)?,
            vip_addrs: take_typed(&mut ebpf, maps::VIP_ADDRS)?,
            rings: take_typed(&mut ebpf, maps::RINGS)?,
            ring_pool_size,
            backends: take_typed(&mut ebpf, maps::BACKENDS)?,
            config: take_typed(&mut ebpf, maps::CONFIG)?,
            tx_ports: take_typed(&mut ebpf, maps::TX_PORTS)?,
            flows: Arc::new(flows),
            counters: Arc::new(KernelCounters::take(&mut ebpf)?),
            pin_dir: opts.pin_dir.clone(),
            _log: log,
            ebpf,
        })
    }

    /// Attaches the program to `iface`: adopts the link pinned for it (replacing its program
    /// atomically, so packets never meet an interface without one), or attaches in `mode` and
    /// pins the new link.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<Attached, DataPlaneError> {
        let link_dir = self.pin_dir.join("links");
        fs::create_dir_all(&link_dir).map_err(|source| DataPlaneError::Pin {
            path: link_dir.clone(),
            source,
        })?;
        let link_pin = link_dir.join(iface);
        let program: &mut Xdp = program_mut(&mut self.ebpf)?;

        if link_pin.exists() {
            match adopt_link(program, &link_pin) {
                Ok(()) => return Ok(Attached::Adopted),
                // The link's interface is gone, or the pin is not an XDP link: the pin is stale,
                // so replace it with a fresh attachment below.
                Err(LinkAdoption::Stale(reason)) => {
                    tracing::warn!(iface, %reason, pin = %link_pin.display(), "stale link pin, attaching anew");
                    fs::remove_file(&link_pin).map_err(|source| DataPlaneError::Pin {
                        path: link_pin.clone(),
                        source,
                    })?;
                }
                // Anything else: keep the pin (the link may be live and forwarding) and fail.
                Err(LinkAdoption::Failed(reason)) => {
                    return Err(DataPlaneError::Interface {
                        iface: iface.to_owned(),
                        reason: format!(
                            "cannot adopt the pinned link {}: {reason}",
                            link_pin.display()
                        ),
                    });
                }
            }
        }

        let link_id =
            program
                .attach(iface, mode.xdp_mode())
                .map_err(|e| DataPlaneError::Interface {
                    iface: iface.to_owned(),
                    reason: format!("attaching lb_xdp ({mode:?} mode): {e}{}", attach_hint(mode)),
                })?;
        let link = program
            .take_link(link_id)
            .map_err(|e| program_error(maps::PROG_LB, e))?;
        let fd_link = FdLink::try_from(link).map_err(|e| DataPlaneError::Interface {
            iface: iface.to_owned(),
            reason: format!(
                "the kernel attached through netlink, not a bpf_link, so it cannot be pinned: {e}"
            ),
        })?;
        fd_link.pin(&link_pin).map_err(|e| DataPlaneError::Pin {
            path: link_pin.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        Ok(Attached::New)
    }

    /// Attaches `lb_hc_encap` to `iface`'s tc egress (tcx, kernel 6.6+), so probes marked with
    /// `lb_common::maps::hc_mark(slot)` leave encapsulated toward that slot's backend. Adopts
    /// the link pinned under `<pin_dir>/hc-links/<iface>` (replacing its program), or attaches
    /// and pins a new one. See `kernel/hc.rs` for the routes a deployment needs.
    pub fn attach_hc(&mut self, iface: &str) -> Result<Attached, DataPlaneError> {
        hc::attach(&mut self.ebpf, &self.pin_dir, iface)
    }

    /// Entries in the flow table (the size it was created with).
    pub fn flow_table_size(&self) -> u32 {
        self.flows.max_entries
    }

    /// The folder holding the pins.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

enum LinkAdoption {
    Stale(String),
    Failed(String),
}

/// What a failed attach in `mode` may mean. Kernels 5.8 to about 5.14 (5.10 measured, 6.1
/// fine) refuse generic XDP for a program that uses a devmap with 8-byte values, as `lb_xdp`
/// does (`LB_TX_PORTS`), with an empty netlink error.
fn attach_hint(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Generic | AttachMode::Auto => {
            " (generic XDP of a program with a devmap needs a kernel newer than 5.10; 6.1 takes \
             it: try --xdp-mode native)"
        }
        AttachMode::Native => "",
    }
}

/// Swaps `program` into the XDP link pinned at `pin` (`BPF_LINK_UPDATE`).
fn adopt_link(program: &mut Xdp, pin: &Path) -> Result<(), LinkAdoption> {
    adopt_pinned_link(program, pin, Xdp::attach_to_link, Xdp::take_link)
}

/// Swaps `program` into the link pinned at `pin` with the program type's own `attach` and
/// `take` (aya has no trait for them). A pin that is not an `L` link is stale.
fn adopt_pinned_link<P, L, Id>(
    program: &mut P,
    pin: &Path,
    attach: fn(&mut P, L) -> Result<Id, ProgramError>,
    take: fn(&mut P, Id) -> Result<L, ProgramError>,
) -> Result<(), LinkAdoption>
where
    L: TryFrom<FdLink>,
    L::Error: std::fmt::Display,
{
    let stale = |e: &dyn std::fmt::Display| LinkAdoption::Stale(e.to_string());
    let pinned = PinnedLink::from_pin(pin).map_err(|e| stale(&e))?;
    let link = L::try_from(FdLink::from(pinned)).map_err(|e| stale(&e))?;
    let id = attach(program, link).map_err(|e| link_update_error(&e))?;
    // The pin keeps the link alive; drop our handle so the program's lifetime does not matter.
    let link = take(program, id).map_err(|e| LinkAdoption::Failed(e.to_string()))?;
    drop(link);
    Ok(())
}

/// Classifies a failed `BPF_LINK_UPDATE` on a pinned link.
fn link_update_error(e: &ProgramError) -> LinkAdoption {
    // ENOLINK (os error 67): the link was detached because its interface went away.
    let message = format!(
        "{e}: {}",
        std::error::Error::source(e)
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    if message.contains("os error 67") {
        LinkAdoption::Stale(message)
    } else {
        LinkAdoption::Failed(message)
    }
}

fn ensure_bpffs(dir: &Path) -> Result<(), DataPlaneError> {
    // The pin folder must live on a bpffs; check the nearest existing ancestor.
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).map_err(|_| {
        DataPlaneError::Pin {
            path: dir.to_path_buf(),
            source: io::Error::other("path contains a NUL byte"),
        }
    })?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and st a properly sized out-parameter.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(DataPlaneError::Pin {
            path: probe,
            source: io::Error::last_os_error(),
        });
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(DataPlaneError::Pin {
            path: dir.to_path_buf(),
            source: io::Error::other(format!(
                "{} is not on a bpffs (mount one: mount -t bpf bpf /sys/fs/bpf)",
                probe.display()
            )),
        });
    }
    Ok(())
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, DataPlaneError> {
    let program = ebpf
        .program_mut(maps::PROG_LB)
        .ok_or(DataPlaneError::MissingMap {
            name: maps::PROG_LB,
        })?;
    program
        .try_into()
        .map_err(|e| program_error(maps::PROG_LB, e))
}

fn program_error(name: &'static str, e: ProgramError) -> DataPlaneError {
    DataPlaneError::Program {
        name,
        source: Box::new(e),
    }
}

fn take_typed<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataPlaneError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DataPlaneError::MissingMap { name })?;
    T::try_from(map).map_err(|e| DataPlaneError::map(name, e))
}

fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::DevMapHash(d) => Some(d),
        _ => None,
    }
}

fn loaded_map<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a MapData, DataPlaneError> {
    ebpf.map(name)
        .and_then(map_data)
        .ok_or(DataPlaneError::MissingMap { name })
}

/// A descriptor of its own on a loaded map.
fn map_fd(ebpf: &Ebpf, name: &'static str) -> Result<OwnedFd, DataPlaneError> {
    loaded_map(ebpf, name)?
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|io_error| {
            syscall_error(
                name,
                SyscallError {
                    call: "dup",
                    io_error,
                },
            )
        })
}

fn syscall_error(name: &'static str, e: SyscallError) -> DataPlaneError {
    DataPlaneError::map(name, MapError::SyscallError(e))
}

/// The size the kernel gave the map (a reused pin keeps the size it was created with).
fn max_entries(ebpf: &Ebpf, name: &'static str) -> Result<u32, DataPlaneError> {
    let info = loaded_map(ebpf, name)?
        .info()
        .map_err(|e| DataPlaneError::map(name, e))?;
    Ok(info.max_entries())
}

impl DataPlane for KernelDataPlane {
    fn config(&self) -> Result<GlobalConfig, DataPlaneError> {
        self.config
            .get(&0, 0)
            .map_err(|e| DataPlaneError::map(maps::CONFIG, e))
    }

    fn set_flow_guard(&mut self, limit: u32) -> Result<(), DataPlaneError> {
        self.counters.set_guard_limit(limit)
    }

    fn set_config(&mut self, config: &GlobalConfig) -> Result<(), DataPlaneError> {
        self.config
            .set(0, config, 0)
            .map_err(|e| DataPlaneError::map(maps::CONFIG, e))
    }

    fn write_ring(&mut self, offset: u32, entries: &[u32]) -> Result<(), DataPlaneError> {
        let end = u64::from(offset) + entries.len() as u64;
        if end > u64::from(self.ring_pool_size) {
            return Err(DataPlaneError::RingOutOfBounds {
                offset,
                end,
                pool: self.ring_pool_size,
            });
        }
        batch::update_array(self.rings.map().fd().as_fd(), offset, entries)
            .map_err(|e| syscall_error(maps::RINGS, e))
    }

    fn read_ring(&self, offset: u32, len: u32) -> Result<Vec<u32>, DataPlaneError> {
        let end = u64::from(offset) + u64::from(len);
        if end > u64::from(self.ring_pool_size) {
            return Err(DataPlaneError::RingOutOfBounds {
                offset,
                end,
                pool: self.ring_pool_size,
            });
        }
        batch::lookup_array(self.rings.map().fd().as_fd(), offset, len)
            .map_err(|e| syscall_error(maps::RINGS, e))
    }

    fn ring_pool_size(&self) -> u32 {
        self.ring_pool_size
    }

    fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), DataPlaneError> {
        self.vips
            .insert(key, meta, 0)
            .map_err(|e| DataPlaneError::map(maps::VIPS, e))
    }

    fn del_vip(&mut self, key: &VipKey) -> Result<(), DataPlaneError> {
        self.vips
            .remove(key)
            .map_err(|e| DataPlaneError::map(maps::VIPS, e))
    }

    fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>, DataPlaneError> {
        self.vips
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| DataPlaneError::map(maps::VIPS, e))
    }

    fn set_vip_addr(&mut self, key: &VipKey, vips_on_it: u32) -> Result<(), DataPlaneError> {
        self.vip_addrs
            .insert(key, vips_on_it, 0)
            .map_err(|e| DataPlaneError::map(maps::VIP_ADDRS, e))
    }

    fn del_vip_addr(&mut self, key: &VipKey) -> Result<(), DataPlaneError> {
        self.vip_addrs
            .remove(key)
            .map_err(|e| DataPlaneError::map(maps::VIP_ADDRS, e))
    }

    fn vip_addrs(&self) -> Result<Vec<VipKey>, DataPlaneError> {
        self.vip_addrs
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| DataPlaneError::map(maps::VIP_ADDRS, e))
    }

    fn set_backend(&mut self, slot: u32, backend: &BackendSlot) -> Result<(), DataPlaneError> {
        self.backends
            .set(slot, backend, 0)
            .map_err(|e| DataPlaneError::map(maps::BACKENDS, e))
    }

    fn backends(&self) -> Result<Vec<BackendSlot>, DataPlaneError> {
        self.backends
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| DataPlaneError::map(maps::BACKENDS, e))
    }

    fn add_tx_port(&mut self, ifindex: u32) -> Result<(), DataPlaneError> {
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| DataPlaneError::Interface {
                iface: format!("ifindex {ifindex}"),
                reason: format!("adding to {}: {e}", maps::TX_PORTS),
            })
    }

    fn flow_table(&self) -> Arc<dyn FlowTable> {
        self.flows.clone()
    }

    fn counters(&self) -> Arc<dyn CounterTable> {
        self.counters.clone()
    }

    fn reset_vip_counters(&mut self, vip_id: u32) -> Result<(), DataPlaneError> {
        self.counters.reset_vip(vip_id)
    }

    fn reset_backend_counters(&mut self, slot: u32) -> Result<(), DataPlaneError> {
        self.counters.reset_backend(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_table_sizes_are_bounded() {
        assert!(matches!(
            check_flow_table_size(0),
            Err(FlowTableSizeError::Zero)
        ));
        check_flow_table_size(1).unwrap();
        check_flow_table_size(MAX_FLOW_TABLE_SIZE).unwrap();
        let e = check_flow_table_size(MAX_FLOW_TABLE_SIZE + 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "134217729 is above the maximum of 134217728 (2^27: the kernel refuses larger hash \
             maps)"
        );
        // 104 bytes an element and 16 a bucket: 1M entries are 120 MiB (the README's "about
        // 100 MB" for a 1M table), the largest table 15 GiB.
        assert_eq!(flow_table_bytes(1 << 20), 120 << 20);
        assert_eq!(flow_table_bytes(MAX_FLOW_TABLE_SIZE), 15 << 30);
        assert_eq!(flow_table_bytes(3), 3 * 104 + 4 * 16);
    }

    /// Removes a test's temp folder even when the test fails.
    struct Cleanup(PathBuf);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            fs::remove_dir_all(&self.0).ok();
        }
    }

    #[test]
    fn memory_check_names_both_sizes_and_skips_an_adopted_table() {
        let dir = std::env::temp_dir().join(format!("lb-flow-size-{}", std::process::id()));
        let huge = MAX_FLOW_TABLE_SIZE;
        fits_in_memory(1 << 20, 120 << 20).unwrap();
        let e = fits_in_memory(1 << 20, 100 << 20).unwrap_err();
        assert_eq!(
            e.to_string(),
            "1048576 entries need about 120 MiB of kernel memory (120 bytes an entry), more \
             than the 100 MiB this host has available (MemAvailable)"
        );
        // This host: a small table fits; checking reads /proc/meminfo.
        check_flow_table_memory(1 << 16, &dir).unwrap();
        // An existing (pinned) table is adopted as it is: nothing to allocate.
        let _cleanup = Cleanup(dir.clone());
        fs::create_dir_all(dir.join("maps")).unwrap();
        fs::write(dir.join("maps").join(maps::FLOWS), "").unwrap();
        check_flow_table_memory(huge, &dir).unwrap();
        check_flow_table_memory(1, &dir).unwrap();
    }
}
