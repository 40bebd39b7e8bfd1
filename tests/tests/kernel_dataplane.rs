//! `KernelDataPlane` against the real kernel: batched ring writes and reads, the flow-table
//! scan (with its cost on a full 1M-entry table), and `upgrade`, which swaps the program inside
//! pinned links while keeping every pinned map. Needs root; skips otherwise.

use std::{fs, time::Instant};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapInfo},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
};
use lb_common::{FlowKey, FlowValue, GlobalConfig, keys::FAMILY_V4, maps};
use lb_tests::{
    bpf::{self, PinDir},
    netns::Netns,
};
use lb_userspace::dataplane::{
    DataPlane, DataPlaneError,
    kernel::{self, AttachMode, Attached, KernelDataPlane, LoadOptions},
};

const FULL_TABLE: u32 = 1 << 20;

fn is_root() -> bool {
    bpf::is_root("BPF maps, pins and links")
}

fn load(pins: &PinDir, flows: u32, ring_pool: u32) -> KernelDataPlane {
    KernelDataPlane::load(&LoadOptions {
        pin_dir: pins.path().to_path_buf(),
        flow_table_size: flows,
        ring_pool_size: ring_pool,
    })
    .unwrap_or_else(|e| panic!("loading the data plane: {e}"))
}

fn pinned_array(pins: &PinDir, name: &str) -> Array<MapData, u32> {
    let data = MapData::from_pin(pins.map(name)).expect("map pin");
    Array::try_from(Map::from_map_data(data).expect("map type")).expect("array")
}

const TABLE: u32 = 65_537;

#[test]
fn ring_writes_land_in_place_and_read_back() {
    if !is_root() {
        return;
    }
    let pins = PinDir::new("ring");
    let pool = 3 * TABLE;
    let mut dp = load(&pins, 1024, pool);
    let entries: Vec<u32> = (0..TABLE).map(|i| i.wrapping_mul(2_654_435_761)).collect();
    let offset = TABLE + 5;

    let started = Instant::now();
    dp.write_ring(offset, &entries).expect("write_ring");
    let write = started.elapsed();
    let started = Instant::now();
    let back = dp.read_ring(offset, TABLE).expect("read_ring");
    let read = started.elapsed();
    assert!(back == entries, "read_ring returns what write_ring wrote");

    // Checked through an independent handle: every entry in place, neighbours untouched.
    let rings = pinned_array(&pins, maps::RINGS);
    for (i, expected) in [(offset - 1, 0), (offset + TABLE, 0)].into_iter().chain(
        (0..TABLE)
            .step_by(997)
            .map(|i| (offset + i, entries[i as usize])),
    ) {
        assert_eq!(rings.get(&i, 0).expect("ring entry"), expected, "entry {i}");
    }

    // Bounds: nothing is written when the range does not fit.
    let err = dp.write_ring(pool - 10, &[7; 11]).unwrap_err();
    assert!(
        matches!(err, DataPlaneError::RingOutOfBounds { .. }),
        "{err}"
    );
    assert_eq!(dp.read_ring(pool - 10, 10).expect("read_ring"), [0; 10]);
    assert!(dp.read_ring(pool - 10, 11).is_err());
    // Reads and writes of a single entry at the edges.
    dp.write_ring(pool - 1, &[9]).expect("last entry");
    dp.write_ring(0, &[8]).expect("first entry");
    assert_eq!(dp.read_ring(pool - 1, 1).expect("read"), [9]);
    assert_eq!(dp.read_ring(0, 2).expect("read"), [8, 0]);
    assert_eq!(dp.read_ring(5, 0).expect("empty read"), Vec::<u32>::new());

    // Baseline: the same write and read one syscall per entry (what write_ring did before).
    let mut rings = pinned_array(&pins, maps::RINGS);
    let started = Instant::now();
    for (i, entry) in entries.iter().enumerate() {
        rings.set(offset + i as u32, entry, 0).expect("set");
    }
    let write_each = started.elapsed();
    let started = Instant::now();
    let back: Vec<u32> = (offset..offset + TABLE)
        .map(|i| rings.get(&i, 0).expect("get"))
        .collect();
    let read_each = started.elapsed();
    assert!(back == entries);

    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    eprintln!(
        "ring of {TABLE} entries: write_ring {:.1} ms (one syscall per entry: {:.1} ms), \
         read_ring {:.1} ms (one per entry: {:.1} ms)",
        ms(write),
        ms(write_each),
        ms(read),
        ms(read_each)
    );
}

/// CPUs listed in a sysfs CPU list such as `0-3,6`.
fn cpu_list(path: &str) -> Vec<usize> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.trim()
        .split(',')
        .flat_map(|part| {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            a.parse::<usize>().expect("cpu")..=b.parse::<usize>().expect("cpu")
        })
        .collect()
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity get a valid
    // set of the right size, for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set),
            0,
            "sched_setaffinity({cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
}

fn flow_key(i: u32) -> FlowKey {
    FlowKey {
        src: [i.to_be(), 0, 0, 0],
        dst: [0x6400_000a, 0, 0, 0],
        sport: (i as u16).to_be(),
        dport: 80u16.to_be(),
        proto: 6,
        family: FAMILY_V4,
        pad: [0; 2],
    }
}

/// Fills a 1M-entry flow table to the brim, then scans it through `flow_table()` and checks
/// every entry was seen once with its value. The table has one LRU list per CPU, filled from
/// that CPU, so each CPU inserts exactly its share (more would evict).
#[test]
fn flow_table_scan_sees_every_entry_of_a_full_table() {
    if !is_root() {
        return;
    }
    let pins = PinDir::new("scan");
    let dp = load(&pins, FULL_TABLE, 1024);
    let possible = cpu_list("/sys/devices/system/cpu/possible");
    let online = cpu_list("/sys/devices/system/cpu/online");
    let share = FULL_TABLE / possible.len() as u32;
    let data = MapData::from_pin(pins.map(maps::FLOWS)).expect("LB_FLOWS pin");
    let mut flows: HashMap<MapData, FlowKey, FlowValue> =
        HashMap::try_from(Map::from_map_data(data).expect("map type")).expect("lru hash");
    let started = Instant::now();
    let mut inserted = 0u32;
    let mut slot_sum = 0u64;
    for cpu in online {
        pin_to_cpu(cpu);
        for _ in 0..share {
            let i = inserted;
            let value = FlowValue {
                slot: i % 8192,
                generation: i,
                last_seen: 7,
                flags: i & 1,
            };
            flows.insert(flow_key(i), value, 0).expect("insert flow");
            slot_sum += u64::from(value.slot);
            inserted += 1;
        }
    }
    let fill = started.elapsed();

    let table = dp.flow_table();
    let started = Instant::now();
    let mut seen = vec![false; inserted as usize];
    let (mut count, mut seen_sum) = (0u32, 0u64);
    table
        .for_each_flow(&mut |v| {
            count += 1;
            seen_sum += u64::from(v.slot);
            assert_eq!(v.slot, v.generation % 8192, "value intact");
            assert_eq!((v.last_seen, v.flags), (7, v.generation & 1));
            let first = !std::mem::replace(&mut seen[v.generation as usize], true);
            assert!(first, "entry {} seen twice", v.generation);
        })
        .expect("scan");
    let scan = started.elapsed();
    assert_eq!(count, inserted, "every entry seen");
    assert_eq!(seen_sum, slot_sum);

    // Baseline: the same scan one key at a time (GET_NEXT_KEY + LOOKUP_ELEM per entry).
    let started = Instant::now();
    let (walked, walked_sum) = flows.iter().fold((0u32, 0u64), |(n, sum), entry| {
        let (_, v) = entry.expect("walk");
        (n + 1, sum + u64::from(v.slot))
    });
    let walk = started.elapsed();
    assert_eq!((walked, walked_sum), (inserted, slot_sum));

    eprintln!(
        "flow table of {FULL_TABLE} entries ({inserted} present): batched scan {:.0} ms, \
         key-by-key walk {:.0} ms (filling it took {:.1} s)",
        scan.as_secs_f64() * 1e3,
        walk.as_secs_f64() * 1e3,
        fill.as_secs_f64()
    );
}

/// Every map lbd pins.
const PINNED: [&str; maps::BALANCER_MAPS.len()] = maps::BALANCER_MAPS;

fn map_ids(pins: &PinDir) -> Vec<u32> {
    PINNED
        .iter()
        .map(|name| {
            MapData::from_pin(pins.map(name))
                .and_then(|m| m.info())
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .id()
        })
        .collect()
}

/// The program id the pinned link runs.
fn link_program(pins: &PinDir, iface: &str) -> u32 {
    let link = PinnedLink::from_pin(pins.path().join("links").join(iface)).expect("link pin");
    FdLink::from(link).info().expect("link info").program_id()
}

fn flows_map(pins: &PinDir) -> HashMap<MapData, FlowKey, FlowValue> {
    let data = MapData::from_pin(pins.map(maps::FLOWS)).expect("LB_FLOWS pin");
    HashMap::try_from(Map::from_map_data(data).expect("map type")).expect("lru hash")
}

#[test]
fn upgrade_swaps_the_program_in_the_pinned_link_and_keeps_every_map() {
    if !is_root() {
        return;
    }
    let ns = Netns::new("upgrade").unwrap_or_else(|e| panic!("{e:#}"));
    ns.ip(["link", "add", "up0", "type", "veth", "peer", "name", "up1"])
        .and_then(|_| ns.link_up("up0"))
        .and_then(|()| ns.link_up("up1"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let pins = PinDir::new("upgrade");
    let config = GlobalConfig {
        encap_src_v4: 0x0102_0304,
        ..GlobalConfig::default()
    };
    // Attach from inside the namespace (interface names resolve there); the pins outlive `dp`.
    ns.run(|| {
        let mut dp = load(&pins, 4096, 1024);
        assert_eq!(
            dp.attach("up0", AttachMode::Generic).expect("attach"),
            Attached::New
        );
        dp.set_config(&config).expect("set_config");
    });
    let (key, flow) = (
        flow_key(42),
        FlowValue {
            slot: 3,
            generation: 9,
            last_seen: 11,
            flags: 0,
        },
    );
    flows_map(&pins).insert(key, flow, 0).expect("insert flow");
    let maps_before = map_ids(&pins);
    let program_before = link_program(&pins, "up0");

    let upgraded = kernel::upgrade(pins.path()).expect("upgrade");

    assert_eq!(upgraded, ["up0"]);
    let program_after = link_program(&pins, "up0");
    assert_ne!(program_after, program_before, "the link runs a new program");
    assert_eq!(map_ids(&pins), maps_before, "every pinned map kept");
    let program = loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == program_after)
        .expect("the new program is loaded");
    let used = program.map_ids().expect("map ids").expect("map ids known");
    // Besides the pinned maps, only the program's own aya-log ring and read-only data (format
    // strings): neither holds state a restart or upgrade must keep.
    let stateless = |id: &u32| {
        MapInfo::from_id(*id).ok().is_some_and(|m| {
            m.name_as_str()
                .is_some_and(|n| n == "AYA_LOGS" || n.starts_with(".rodata"))
        })
    };
    assert!(
        used.iter()
            .all(|id| maps_before.contains(id) || stateless(id)),
        "the new program uses the pinned maps only: {used:?} vs {maps_before:?}"
    );
    assert_eq!(flows_map(&pins).get(&key, 0).expect("flow kept"), flow);
    let data = MapData::from_pin(pins.map(maps::CONFIG)).expect("LB_CONFIG pin");
    let cfg: Array<MapData, GlobalConfig> =
        Array::try_from(Map::from_map_data(data).expect("map type")).expect("array");
    assert_eq!(cfg.get(&0, 0).expect("config"), config, "no map written");

    // A missing map pin: refused, nothing created, the link untouched.
    let removed = pins.map(maps::VIP_STATS);
    fs::remove_file(&removed).expect("unpin");
    let err = kernel::upgrade(pins.path()).unwrap_err();
    assert!(
        matches!(&err, DataPlaneError::Pin { path, .. } if *path == removed),
        "{err}"
    );
    assert!(!removed.exists(), "upgrade created no map");
    assert_eq!(link_program(&pins, "up0"), program_after);
}

/// Creates and pins an empty map of the given shape, as an older lbd would have left it.
fn pin_old_map(pins: &PinDir, name: &str, kind: &str, key: u32, value: u32, entries: u32) {
    fs::create_dir_all(pins.path().join("maps")).expect("maps folder");
    let path = pins.map(name);
    let status = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&path)
        .args([
            "type",
            kind,
            "key",
            &key.to_string(),
            "value",
            &value.to_string(),
        ])
        .args(["entries", &entries.to_string(), "name", name])
        .status()
        .expect("bpftool runs (cargo xtask test installs it)");
    assert!(status.success(), "bpftool map create {name}");
}

#[test]
fn a_start_replaces_counter_and_config_maps_of_an_older_shape() {
    if !is_root() {
        return;
    }
    let pins = PinDir::new("oldshape");
    // The shapes of the release before IPv6: a 16-byte config and 16 global counters.
    pin_old_map(&pins, maps::CONFIG, "array", 4, 16, 1);
    pin_old_map(&pins, maps::GLOBAL_STATS, "percpu_array", 4, 8, 16);
    let old_config = MapInfo::from_pin(pins.map(maps::CONFIG)).expect("pin").id();

    let dp = load(&pins, 1024, 3 * TABLE);
    let config = MapInfo::from_pin(pins.map(maps::CONFIG)).expect("config pin");
    assert_ne!(config.id(), old_config, "LB_CONFIG was created anew");
    assert_eq!(config.value_size() as usize, size_of::<GlobalConfig>());
    let stats = MapInfo::from_pin(pins.map(maps::GLOBAL_STATS)).expect("stats pin");
    assert_eq!(stats.max_entries(), lb_common::stats::COUNTER_COUNT);
    assert_eq!(dp.config().expect("config").flags, 0);
}

#[test]
fn a_flow_table_of_another_shape_is_refused_by_name_and_kept() {
    if !is_root() {
        return;
    }
    let pins = PinDir::new("oldflows");
    pin_old_map(&pins, maps::FLOWS, "lru_hash", 36, 16, 1024);
    let flows = MapInfo::from_pin(pins.map(maps::FLOWS)).expect("pin").id();
    let err = KernelDataPlane::load(&LoadOptions {
        pin_dir: pins.path().to_path_buf(),
        flow_table_size: 1024,
        ring_pool_size: 3 * TABLE,
    })
    .err()
    .expect("a flow table with 36-byte keys is refused")
    .to_string();
    assert!(
        err.contains("LB_FLOWS has key size 36 but this data plane needs 40"),
        "{err}"
    );
    let kept = MapInfo::from_pin(pins.map(maps::FLOWS)).expect("the pin stays");
    assert_eq!(kept.id(), flows);

    // `lbd upgrade` writes no map, so it refuses an old config shape too, and says what to do.
    let pins = PinDir::new("oldupgrade");
    pin_old_map(&pins, maps::CONFIG, "array", 4, 16, 1);
    let err = kernel::upgrade(pins.path())
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("LB_CONFIG has value size 16") && err.contains("restart lbd instead"),
        "{err}"
    );
}
