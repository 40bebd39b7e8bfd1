//! Weighted Maglev table builder (Eisenbud et al., NSDI 2016): a pure function of the backend
//! addresses, their weights and the table size, so every gateway host computing from the same
//! configuration gets the same table and a flow lands on the same backend on any of them.
//!
//! Each backend walks its own permutation of the table positions (`offset + j * skip`, both
//! derived from stable hashes of its address) and claims the first free position on its turn.
//! Turns are handed out in order of virtual time `placed / weight` (ties to the lower address),
//! as in weighted fair queueing: every backend's share ends within about one entry of its weight
//! share, and with equal weights this is exactly the paper's round-robin.
//!
//! The hashes and the turn order are part of the contract between gateway hosts (and with
//! `lbctl`'s flow predictions): changing either remaps flows on mixed-version deployments.

use std::{cmp::Ordering, collections::BinaryHeap, net::IpAddr};

use lb_common::keys::RING_EMPTY;

/// A backend as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weighted {
    pub addr: IpAddr,
    /// Relative share of the table; 0 owns nothing.
    pub weight: u32,
}

/// Builds a Maglev table of `size` entries (a prime; callers validate).
///
/// Entry `i` is the index into `backends` of the backend owning table position `i`, or
/// [`RING_EMPTY`] for every entry when no backend has a weight above zero. The result does not
/// depend on the order of `backends` (they are ranked by address internally). Addresses must be
/// unique.
pub fn build_table(backends: &[Weighted], size: u32) -> Vec<u32> {
    debug_assert!(is_prime(size), "Maglev table size {size} is not prime");
    assert!(
        u32::try_from(backends.len()).is_ok_and(|n| n < RING_EMPTY),
        "too many backends for a u32 table entry"
    );
    let m = size as usize;
    let mut table = vec![RING_EMPTY; m];

    let mut ranked: Vec<usize> = (0..backends.len())
        .filter(|&i| backends[i].weight > 0)
        .collect();
    ranked.sort_unstable_by_key(|&i| backends[i].addr);
    debug_assert!(
        ranked
            .windows(2)
            .all(|w| backends[w[0]].addr != backends[w[1]].addr),
        "duplicate backend address"
    );
    if ranked.is_empty() || m == 0 {
        return table;
    }

    let mut cursors: Vec<Cursor> = ranked
        .iter()
        .map(|&i| Cursor::new(backends[i].addr, i as u32, m))
        .collect();
    let mut turns: BinaryHeap<Turn> = ranked
        .iter()
        .enumerate()
        .map(|(rank, &i)| Turn {
            next: 1,
            weight: backends[i].weight,
            rank: rank as u32,
        })
        .collect();

    for _ in 0..m {
        // Never empty: every backend in the heap is pushed back after its turn.
        let mut turn = turns.peek_mut().expect("at least one backend");
        let cursor = &mut cursors[turn.rank as usize];
        // Terminates: the permutation visits every position and one is still free.
        loop {
            let pos = cursor.pos;
            cursor.pos += cursor.skip;
            if cursor.pos >= m {
                cursor.pos -= m;
            }
            if table[pos] == RING_EMPTY {
                table[pos] = cursor.owner;
                break;
            }
        }
        // Dropping the PeekMut re-sifts the heap with the advanced virtual time.
        turn.next += 1;
    }
    table
}

/// One backend's walk through its permutation of the table positions.
struct Cursor {
    pos: usize,
    skip: usize,
    owner: u32,
}

impl Cursor {
    fn new(addr: IpAddr, owner: u32, m: usize) -> Self {
        let bytes = match addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let offset = (hash(&bytes, OFFSET_SEED) % m as u64) as usize;
        let mut skip = if m > 1 {
            (hash(&bytes, SKIP_SEED) % (m as u64 - 1)) as usize + 1
        } else {
            1
        };
        // A no-op for a prime size; for any other size it keeps the walk a full permutation (so
        // the fill loop ends) instead of relying on callers having validated.
        while gcd(skip, m) != 1 {
            skip += 1;
        }
        Self {
            pos: offset,
            skip,
            owner,
        }
    }
}

/// A backend's next turn: it places its `next`-th entry at virtual time `next / weight`.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Turn {
    next: u64,
    weight: u32,
    rank: u32,
}

impl Ord for Turn {
    /// Greater means sooner (`BinaryHeap` is a max-heap): earlier virtual time, then lower rank.
    fn cmp(&self, other: &Self) -> Ordering {
        // next <= 2^32 and weight < 2^32, so the products fit in a u64.
        let mine = self.next * u64::from(other.weight);
        let theirs = other.next * u64::from(self.weight);
        theirs.cmp(&mine).then(other.rank.cmp(&self.rank))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

const OFFSET_SEED: u64 = 0x6f66_6673_6574_0001;
const SKIP_SEED: u64 = 0x736b_6970_0000_0002;

/// FNV-1a over the bytes followed by splitmix64's finaliser (FNV alone mixes the last bytes
/// poorly). Stable across runs, hosts and Rust versions, unlike std's `RandomState`.
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Trial division; fast enough for table sizes (at most 2^16 divisions for any u32).
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// The smallest prime `>= n`, or `None` above the largest 32-bit prime.
pub fn next_prime_at_least(n: u32) -> Option<u32> {
    (n.max(2)..=u32::MAX).find(|&c| is_prime(c))
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        net::{Ipv4Addr, Ipv6Addr},
    };

    use super::*;

    const M: u32 = 65_537;

    fn backend(i: u32, weight: u32) -> Weighted {
        let [_, b, c, d] = (i + 1).to_be_bytes();
        Weighted {
            addr: IpAddr::V4(Ipv4Addr::new(10, b, c, d)),
            weight,
        }
    }

    fn equal(n: u32) -> Vec<Weighted> {
        (0..n).map(|i| backend(i, 100)).collect()
    }

    fn rising(n: u32) -> Vec<Weighted> {
        (0..n).map(|i| backend(i, i + 1)).collect()
    }

    /// The owner's address of each position, so tables over different backend lists compare.
    fn owners(table: &[u32], backends: &[Weighted]) -> Vec<Option<IpAddr>> {
        table
            .iter()
            .map(|&e| (e != RING_EMPTY).then(|| backends[e as usize].addr))
            .collect()
    }

    fn moved(a: &[Option<IpAddr>], b: &[Option<IpAddr>]) -> usize {
        a.iter().zip(b).filter(|(x, y)| x != y).count()
    }

    fn check_shares(backends: &[Weighted], size: u32) {
        let table = build_table(backends, size);
        assert_eq!(table.len(), size as usize);
        let mut counts = vec![0usize; backends.len()];
        for &e in &table {
            assert_ne!(e, RING_EMPTY, "table has a hole");
            counts[e as usize] += 1;
        }
        let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
        for (b, &count) in backends.iter().zip(&counts) {
            let share = count as f64 / f64::from(size);
            let want = b.weight as f64 / total as f64;
            assert!(
                (share - want).abs() <= 0.01,
                "{} (weight {}) owns {share:.4} of the table, expected {want:.4}",
                b.addr,
                b.weight
            );
        }
    }

    #[test]
    fn shares_follow_weights() {
        for n in [3, 10, 100] {
            check_shares(&equal(n), M);
            check_shares(&rising(n), M);
        }
        // A wide spread of weights, including the model's extremes.
        let mut spread = rising(5);
        spread.push(backend(50, 65_535));
        spread.push(backend(51, 1));
        check_shares(&spread, M);
    }

    #[test]
    fn shares_are_exact_to_one_entry() {
        // Stronger than the 1% bound: the virtual-time order keeps each count within one entry.
        let backends = rising(10);
        let table = build_table(&backends, M);
        let total: u32 = backends.iter().map(|b| b.weight).sum();
        for (i, b) in backends.iter().enumerate() {
            let count = table.iter().filter(|&&e| e as usize == i).count() as f64;
            let want = f64::from(M) * f64::from(b.weight) / f64::from(total);
            assert!((count - want).abs() <= 1.0, "{}: {count} vs {want}", b.addr);
        }
    }

    #[test]
    fn adding_a_backend_moves_little() {
        for n in [3, 10, 100] {
            for list in [equal(n), rising(n)] {
                let before = owners(&build_table(&list, M), &list);
                let mut grown = list.clone();
                grown.push(backend(n, list[0].weight));
                let after = owners(&build_table(&grown, M), &grown);
                let limit = M as usize / (n as usize + 1) + M as usize / 100;
                let changed = moved(&before, &after);
                assert!(
                    changed <= limit,
                    "n={n}: {changed} entries moved, limit {limit}"
                );
            }
        }
    }

    #[test]
    fn removing_a_backend_moves_only_its_entries() {
        for n in [3, 10, 100] {
            for list in [equal(n), rising(n)] {
                let gone = list[n as usize / 2].addr;
                let before = owners(&build_table(&list, M), &list);
                let shrunk: Vec<_> = list.iter().copied().filter(|b| b.addr != gone).collect();
                let after = owners(&build_table(&shrunk, M), &shrunk);
                assert!(after.iter().all(|o| *o != Some(gone)));
                let others = before
                    .iter()
                    .zip(&after)
                    .filter(|(b, a)| **b != Some(gone) && b != a)
                    .count();
                let limit = M as usize / 100;
                assert!(others <= limit, "n={n}: {others} foreign entries moved");
            }
        }
    }

    #[test]
    fn weight_change_moves_little() {
        let list = equal(10);
        let before = owners(&build_table(&list, M), &list);
        let mut changed = list.clone();
        changed[3].weight = 50;
        let after = owners(&build_table(&changed, M), &changed);
        // Backend 3 gives up about 1/19 of the table; allow the same again for reshuffling.
        let n = moved(&before, &after);
        assert!(
            n <= 2 * M as usize / 19 + M as usize / 100,
            "{n} entries moved"
        );
    }

    #[test]
    fn order_of_input_does_not_matter() {
        let list = rising(20);
        let table = build_table(&list, M);
        let mut shuffled = list.clone();
        shuffled.reverse();
        shuffled.swap(3, 11);
        let other = build_table(&shuffled, M);
        assert_eq!(owners(&table, &list), owners(&other, &shuffled));
        assert_ne!(table, other, "indices should follow the caller's order");
    }

    #[test]
    fn zero_weight_owns_nothing() {
        let mut list = equal(4);
        list[1].weight = 0;
        let table = build_table(&list, 13);
        assert!(table.iter().all(|&e| e != 1 && e != RING_EMPTY));

        let none = [backend(0, 0), backend(1, 0)];
        assert!(build_table(&none, 13).iter().all(|&e| e == RING_EMPTY));
        assert!(build_table(&[], 7).iter().all(|&e| e == RING_EMPTY));
    }

    #[test]
    fn small_sizes_and_mixed_families() {
        let list = vec![
            backend(0, 1),
            Weighted {
                addr: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
                weight: 1,
            },
        ];
        for size in [2, 3, 7, 13, 101] {
            let table = build_table(&list, size);
            assert_eq!(table.len(), size as usize);
            assert!(table.iter().all(|&e| e < 2));
            if size >= 7 {
                let mut counts: HashMap<u32, usize> = HashMap::new();
                for e in table {
                    *counts.entry(e).or_default() += 1;
                }
                assert!(
                    counts[&0].abs_diff(counts[&1]) <= 1,
                    "size {size}: {counts:?}"
                );
            }
        }
    }

    #[test]
    fn more_backends_than_entries() {
        let list = equal(20);
        let table = build_table(&list, 7);
        let mut seen: Vec<u32> = table.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(
            seen.len(),
            7,
            "each entry goes to a different backend: {table:?}"
        );
    }

    #[test]
    fn table_is_stable_across_versions() {
        // Gateway hosts running different builds must agree: pin small tables (cross-checked
        // against an independent implementation of the algorithm in the module doc).
        let table = build_table(&equal(3), 13);
        assert_eq!(table, [1, 2, 0, 0, 2, 1, 1, 0, 0, 1, 2, 0, 2]);
        let table = build_table(&rising(4), 13);
        assert_eq!(table, [1, 2, 3, 3, 2, 2, 1, 3, 0, 1, 2, 3, 3]);
    }

    #[test]
    #[ignore = "slow in debug builds; run with --release -- --ignored"]
    fn large_table() {
        let list = equal(1000);
        let size = 655_373;
        assert!(is_prime(size));
        check_shares(&list, size);
    }

    #[test]
    fn primes() {
        let known = [2, 3, 5, 7, 13, 65_537, 655_373, 1_048_573, 4_294_967_291];
        for p in known {
            assert!(is_prime(p), "{p}");
        }
        for c in [0, 1, 4, 9, 65_536, 65_535, 1_048_575, 4_294_967_295] {
            assert!(!is_prime(c), "{c}");
        }
        assert_eq!(next_prime_at_least(0), Some(2));
        assert_eq!(next_prime_at_least(65_536), Some(65_537));
        assert_eq!(next_prime_at_least(65_537), Some(65_537));
        assert_eq!(next_prime_at_least(650_000), Some(650_011));
        assert_eq!(next_prime_at_least(4_294_967_292), None);
    }
}
