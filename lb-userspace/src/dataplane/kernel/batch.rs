//! Batched map access through the raw bpf(2) syscall: aya 0.14 has no batch API, and one
//! syscall per element makes a 65537-entry ring write or a 1M-entry flow scan slow. Kernels
//! without the batch commands (before 5.6), or maps without them, get the per-element calls.

use std::{
    io,
    mem::{self, size_of},
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::{Pod, sys::SyscallError};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// The kernel-internal "operation not supported" some map types answer batch commands with.
const ENOTSUPP: i32 = 524;
/// Elements per batch call: large enough that the syscall cost vanishes, small enough that
/// the buffers stay in cache (a flow key and value are 56 bytes).
pub(super) const CHUNK: usize = 8192;

/// `bpf_attr` for the `BPF_MAP_*_BATCH` commands (`struct { ... } batch` in `linux/bpf.h`).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `bpf_attr` for the single-element commands (`value` is `next_key` for `GET_NEXT_KEY`).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    pad0: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const _: () = assert!(size_of::<BatchAttr>() == 56);
const _: () = assert!(size_of::<ElemAttr>() == 32);

fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<()> {
    // SAFETY: `attr` is a properly laid out prefix of `union bpf_attr` for `cmd` (the kernel
    // zero-fills the rest), and every pointer in it refers to a live buffer of whole keys and
    // values: the callers pass the descriptor of a map whose key and value sizes are those of
    // the types they use (checked when their handle on the map was made).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<A>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ptr<T>(items: &[T]) -> u64 {
    items.as_ptr() as u64
}

/// The kernel (or this map type) has no such batch command.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

fn syscall_error(call: &'static str) -> impl FnOnce(io::Error) -> SyscallError {
    move |io_error| SyscallError { call, io_error }
}

/// Opaque batch position: a u32 bucket index for hash maps, the last key read for other maps.
type Token = [u8; 64];

/// One `BPF_MAP_LOOKUP_BATCH` call: fills `keys` and `values` from `start` (the beginning when
/// `None`) and returns how many it filled and whether the map is exhausted. `values` holds one
/// value per key, or for a per-CPU map one per possible CPU per key.
fn lookup_batch<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    start: Option<&Token>,
    next: &mut Token,
    keys: &mut [K],
    values: &mut [V],
) -> io::Result<(usize, bool)> {
    debug_assert!(!keys.is_empty() && values.len().is_multiple_of(keys.len()));
    let mut attr = BatchAttr {
        in_batch: start.map_or(0, |t| t.as_ptr() as u64),
        out_batch: next.as_mut_ptr() as u64,
        map_fd: fd.as_raw_fd() as u32,
        keys: ptr(keys),
        values: ptr(values),
        count: keys.len() as u32,
        ..BatchAttr::default()
    };
    match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        Ok(()) => Ok((attr.count as usize, false)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok((attr.count as usize, true)),
        Err(e) => Err(e),
    }
}

/// Calls `f` on every entry of a hash map: batched, or key by key on kernels without batches.
/// The map keeps changing meanwhile (the data plane inserts and evicts), so the scan may miss
/// entries added during it; each entry present throughout is seen once.
pub(super) fn for_each_entry<K: Pod + Default, V: Pod + Default>(
    fd: BorrowedFd<'_>,
    max_entries: u32,
    f: &mut dyn FnMut(&K, &V),
) -> Result<(), SyscallError> {
    const { assert!(size_of::<K>() <= size_of::<Token>()) };
    let mut chunk = CHUNK;
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk];
    let (mut token, mut next): (Token, Token) = ([0; 64], [0; 64]);
    let mut started = false;
    loop {
        match lookup_batch(
            fd,
            started.then_some(&token),
            &mut next,
            &mut keys,
            &mut values,
        ) {
            Ok((n, done)) => {
                for (k, v) in keys.iter().zip(&values).take(n) {
                    f(k, v);
                }
                if done {
                    return Ok(());
                }
                mem::swap(&mut token, &mut next);
                started = true;
            }
            // One hash bucket holds more entries than the buffer: grow it and retry.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && chunk < 1 << 20 => {
                chunk *= 2;
                keys.resize(chunk, K::default());
                values.resize(chunk, V::default());
            }
            Err(e) if !started && unsupported(&e) => {
                return for_each_entry_by_key(fd, max_entries, f);
            }
            Err(e) => return Err(syscall_error("BPF_MAP_LOOKUP_BATCH")(e)),
        }
    }
}

/// The fallback: `GET_NEXT_KEY` then `LOOKUP_ELEM`. A key evicted under the walk restarts it
/// from the first key, so the walk stops after `max_entries` steps whatever happens.
fn for_each_entry_by_key<K: Pod + Default, V: Pod + Default>(
    fd: BorrowedFd<'_>,
    max_entries: u32,
    f: &mut dyn FnMut(&K, &V),
) -> Result<(), SyscallError> {
    let mut key = K::default();
    let mut next = K::default();
    let mut value = V::default();
    let mut first = true;
    for _ in 0..max_entries {
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: if first {
                0
            } else {
                std::ptr::from_ref(&key) as u64
            },
            value: std::ptr::from_mut(&mut next) as u64,
            ..ElemAttr::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(syscall_error("BPF_MAP_GET_NEXT_KEY")(e)),
        }
        first = false;
        key = next;
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: std::ptr::from_ref(&key) as u64,
            value: std::ptr::from_mut(&mut value) as u64,
            ..ElemAttr::default()
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(()) => f(&key, &value),
            // Evicted between the two calls.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(syscall_error("BPF_MAP_LOOKUP_ELEM")(e)),
        }
    }
    Ok(())
}

/// Writes `values` into an array map from index `offset` (the caller checked the bounds).
pub(super) fn update_array<V: Pod>(
    fd: BorrowedFd<'_>,
    offset: u32,
    values: &[V],
) -> Result<(), SyscallError> {
    let keys: Vec<u32> = (0..values.len() as u32).map(|i| offset + i).collect();
    update_entries(fd, &keys, values)
}

/// Writes `keys[i] -> values[i]` into a map with `BPF_MAP_UPDATE_BATCH`, key by key on kernels
/// without it. The map's key and value sizes must be those of `K` and `V`.
pub fn update_entries<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), SyscallError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut done = 0;
    while done < keys.len() {
        let end = keys.len().min(done + CHUNK);
        let mut attr = BatchAttr {
            map_fd: fd.as_raw_fd() as u32,
            keys: ptr(&keys[done..end]),
            values: ptr(&values[done..end]),
            count: (end - done) as u32,
            ..BatchAttr::default()
        };
        match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
            Ok(()) => done = end,
            Err(e) if done == 0 && unsupported(&e) => return update_by_key(fd, keys, values),
            Err(e) => return Err(syscall_error("BPF_MAP_UPDATE_BATCH")(e)),
        }
    }
    Ok(())
}

fn update_by_key<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), SyscallError> {
    for (key, value) in keys.iter().zip(values) {
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: std::ptr::from_ref(key) as u64,
            value: std::ptr::from_ref(value) as u64,
            ..ElemAttr::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map_err(syscall_error("BPF_MAP_UPDATE_ELEM"))?;
    }
    Ok(())
}

/// Reads `len` entries of an array map from index `offset` (the caller checked the bounds).
pub(super) fn lookup_array<V: Pod + Default>(
    fd: BorrowedFd<'_>,
    offset: u32,
    len: u32,
) -> Result<Vec<V>, SyscallError> {
    let len = len as usize;
    let mut out = vec![V::default(); len];
    let mut keys = vec![0u32; CHUNK.min(len)];
    let mut done = 0;
    while done < len {
        let chunk = keys.len().min(len - done);
        // The batch position of an array is the last index read: start after `offset - 1`.
        let start = offset as u64 + done as u64;
        let mut token: Token = [0; 64];
        token[..4].copy_from_slice(&(start.saturating_sub(1) as u32).to_ne_bytes());
        let mut next: Token = [0; 64];
        let result = lookup_batch(
            fd,
            (start > 0).then_some(&token),
            &mut next,
            &mut keys[..chunk],
            &mut out[done..done + chunk],
        );
        match result {
            Ok((0, _)) => {
                return Err(SyscallError {
                    call: "BPF_MAP_LOOKUP_BATCH",
                    io_error: io::Error::other(format!(
                        "no entries returned at index {start} of an array"
                    )),
                });
            }
            Ok((n, _)) => done += n,
            Err(e) if done == 0 && unsupported(&e) => {
                return lookup_array_by_key(fd, offset, len);
            }
            Err(e) => return Err(syscall_error("BPF_MAP_LOOKUP_BATCH")(e)),
        }
    }
    Ok(out)
}

/// Sums entries `0..count` of a per-CPU array of u64 over the `ncpus` possible CPUs, with one
/// `BPF_MAP_LOOKUP_BATCH` (reading a per-CPU array key by key costs a syscall per counter).
/// `count` must fit in one batch; callers fall back to key-by-key reads on an error.
pub fn sum_per_cpu_u64(
    fd: BorrowedFd<'_>,
    count: u32,
    ncpus: usize,
) -> Result<Vec<u64>, SyscallError> {
    let count = count as usize;
    let mut keys = vec![0u32; count];
    let mut values = vec![0u64; count * ncpus];
    let mut next: Token = [0; 64];
    let (read, _) = lookup_batch(fd, None, &mut next, &mut keys, &mut values)
        .map_err(syscall_error("BPF_MAP_LOOKUP_BATCH"))?;
    if read != count {
        return Err(SyscallError {
            call: "BPF_MAP_LOOKUP_BATCH",
            io_error: io::Error::other(format!("read {read} of {count} per-CPU entries")),
        });
    }
    Ok(values
        .chunks(ncpus)
        .map(|cpus| cpus.iter().fold(0u64, |acc, x| acc.wrapping_add(*x)))
        .collect())
}

fn lookup_array_by_key<V: Pod + Default>(
    fd: BorrowedFd<'_>,
    offset: u32,
    len: usize,
) -> Result<Vec<V>, SyscallError> {
    (0..len)
        .map(|i| {
            let key = offset + i as u32;
            let mut value = V::default();
            let mut attr = ElemAttr {
                map_fd: fd.as_raw_fd() as u32,
                key: std::ptr::from_ref(&key) as u64,
                value: std::ptr::from_mut(&mut value) as u64,
                ..ElemAttr::default()
            };
            bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map_err(syscall_error("BPF_MAP_LOOKUP_ELEM"))?;
            Ok(value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    //! Both paths of each operation on real maps of the balancer object (root only).

    use std::{collections::BTreeMap, os::fd::AsFd as _};

    use aya::{
        Ebpf, EbpfLoader,
        maps::{HashMap, Map},
    };
    use lb_common::{FlowKey, FlowValue, maps};

    use super::*;

    const POOL: u32 = 3 * CHUNK as u32 + 17;

    fn object() -> Option<Ebpf> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: needs root");
            return None;
        }
        let ebpf = EbpfLoader::new()
            .map_max_entries(maps::FLOWS, 1 << 14)
            .map_max_entries(maps::RINGS, POOL)
            .load(crate::lb_object())
            .expect("loading the balancer object");
        Some(ebpf)
    }

    fn fd<'a>(ebpf: &'a Ebpf, name: &str) -> BorrowedFd<'a> {
        match ebpf.map(name).expect("map") {
            Map::Array(d) | Map::LruHashMap(d) => d.fd().as_fd(),
            _ => panic!("{name}: unexpected map type"),
        }
    }

    #[test]
    fn array_writes_and_reads_agree_batched_and_one_by_one() {
        let Some(ebpf) = object() else { return };
        let rings = fd(&ebpf, maps::RINGS);
        // Spans several chunks and ends at the last entry.
        let offset = 5;
        let values: Vec<u32> = (0..POOL - offset).map(|i| i * 3 + 1).collect();
        update_array(rings, offset, &values).unwrap();
        assert_eq!(
            lookup_array::<u32>(rings, offset, POOL - offset).unwrap(),
            values
        );
        assert_eq!(
            lookup_array_by_key::<u32>(rings, offset, values.len()).unwrap(),
            values
        );
        assert_eq!(
            lookup_array::<u32>(rings, 0, 6).unwrap(),
            [0, 0, 0, 0, 0, 1]
        );

        let other: Vec<u32> = (0..100).map(|i| i + 1000).collect();
        let keys: Vec<u32> = (0..100).collect();
        update_by_key(rings, &keys, &other).unwrap();
        assert_eq!(lookup_array::<u32>(rings, 0, 100).unwrap(), other);
        assert_eq!(lookup_array::<u32>(rings, 100, 1).unwrap(), [values[95]]);
    }

    #[test]
    fn hash_scans_agree_batched_and_key_by_key() {
        let Some(mut ebpf) = object() else { return };
        let mut expected = BTreeMap::new();
        {
            let mut flows: HashMap<_, FlowKey, FlowValue> =
                HashMap::try_from(ebpf.map_mut(maps::FLOWS).expect("LB_FLOWS")).expect("hash");
            for i in 0..300u32 {
                let key = FlowKey {
                    src: [i, 0, 0, 0],
                    sport: i as u16,
                    ..FlowKey::default()
                };
                let value = FlowValue {
                    slot: i,
                    generation: i * 2,
                    last_seen: i * 3,
                    flags: i & 1,
                };
                flows.insert(key, value, 0).expect("insert");
                expected.insert(i, value);
            }
        }
        let flows = fd(&ebpf, maps::FLOWS);
        for batched in [true, false] {
            let mut seen = BTreeMap::new();
            let mut f = |k: &FlowKey, v: &FlowValue| {
                assert_eq!(k.src[0], v.slot);
                assert!(seen.insert(v.slot, *v).is_none(), "seen twice: {v:?}");
            };
            if batched {
                for_each_entry(flows, 1 << 14, &mut f).unwrap();
            } else {
                for_each_entry_by_key(flows, 1 << 14, &mut f).unwrap();
            }
            assert_eq!(seen, expected, "batched: {batched}");
        }
    }
}
