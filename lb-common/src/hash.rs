//! The flow hash, the outer source's entropy and the IPv4 header checksum. Plain integer code with no loops over runtime
//! lengths, so the same functions run in the data plane and on the host (where `lbctl`, tests and
//! benchmarks predict which backend a flow gets).

// The data plane must not pay for a BPF-to-BPF call per packet on these few instructions.
#![allow(clippy::inline_always)]

use crate::keys::FlowKey;

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    // murmur3's per-word step.
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(mut h: u32) -> u32 {
    // murmur3's finaliser: every input bit affects every output bit.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

const SEED: u32 = 0x4c42_5f31;

/// Hash of the whole 5-tuple.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let mut h = SEED;
    h = mix(h, key.src[0]);
    h = mix(h, key.src[1]);
    h = mix(h, key.src[2]);
    h = mix(h, key.src[3]);
    h = mix(h, key.dst[0]);
    h = mix(h, key.dst[1]);
    h = mix(h, key.dst[2]);
    h = mix(h, key.dst[3]);
    h = mix(h, (u32::from(key.sport) << 16) | u32::from(key.dport));
    h = mix(h, u32::from(key.proto));
    finish(h)
}

/// Per-flow entropy for the outer source address (see `GlobalConfig::encap_src_v4_mask`): the
/// same for every packet of a flow, so a backend's receive-side scaling keeps a flow on one
/// queue, and spread over all 32 bits. It runs on every packet of an established flow, so it is
/// a multiply and a fold (a few instructions) rather than [`flow_hash`]'s ten rounds; nothing
/// picks a backend with it.
#[inline(always)]
pub fn encap_entropy(key: &FlowKey) -> u32 {
    let ports = (u32::from(key.sport) << 16) | u32::from(key.dport);
    let x = (key.src[0] ^ key.src[1] ^ key.src[2] ^ key.src[3] ^ ports).wrapping_mul(0x9e37_79b1);
    // The multiply carries every input bit upward only; the fold brings the high bits down.
    x ^ (x >> 16)
}

/// The GUE outer UDP source port (host order) for a flow's [`encap_entropy`]: its high half,
/// kept in 32768..=65535 so it never looks like a well-known service port.
#[inline(always)]
pub fn gue_source_port(entropy: u32) -> u16 {
    ((entropy >> 16) as u16) | 0x8000
}

/// The outer IPv6 flow label (host order, 20 bits) for a flow's [`encap_entropy`]: routers
/// hash it for ECMP, and it stays the same for every packet of the flow.
#[inline(always)]
pub fn flow_label(entropy: u32) -> u32 {
    entropy & 0x000f_ffff
}

/// Hash of the source address only (`VIP_F_HASH_SRC_ONLY`).
#[inline(always)]
pub fn src_hash(key: &FlowKey) -> u32 {
    let mut h = SEED;
    h = mix(h, key.src[0]);
    h = mix(h, key.src[1]);
    h = mix(h, key.src[2]);
    h = mix(h, key.src[3]);
    finish(h)
}

/// Folds a 32-bit one's complement sum to 16 bits and complements it.
#[inline(always)]
pub fn csum_fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Adds 16-bit words (any order, as long as the result is stored in the same order) to a
/// one's complement sum, for [`csum_fold`].
#[inline(always)]
pub fn csum_add<const N: usize>(mut sum: u32, words: &[u16; N]) -> u32 {
    let mut i = 0;
    // A constant bound: unrolled, no loop left for the verifier.
    while i < N {
        sum += u32::from(words[i]);
        i += 1;
    }
    sum
}

/// RFC 1624's incremental update of a stored checksum `check` when one 16-bit word of the data
/// changes from `old` to `new` (all three in the same byte order).
#[inline(always)]
pub fn csum_replace(check: u16, old: u16, new: u16) -> u16 {
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    csum_fold(sum)
}

/// Checksum of a 20-byte IPv4 header given as ten 16-bit words in memory order (the checksum
/// word itself must be zero). The result is in memory order too: store it as is.
#[inline(always)]
pub fn ipv4_header_csum(words: &[u16; 10]) -> u16 {
    let mut sum = 0u32;
    sum += u32::from(words[0]);
    sum += u32::from(words[1]);
    sum += u32::from(words[2]);
    sum += u32::from(words[3]);
    sum += u32::from(words[4]);
    sum += u32::from(words[5]);
    sum += u32::from(words[6]);
    sum += u32::from(words[7]);
    sum += u32::from(words[8]);
    sum += u32::from(words[9]);
    csum_fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_known_header() {
        // 45 00 00 73 00 00 40 00 40 11 [b8 61] c0 a8 00 01 c0 a8 00 c7 (Wikipedia's example).
        let bytes: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0x00,
            0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        let mut words = [0u16; 10];
        for (i, w) in words.iter_mut().enumerate() {
            *w = u16::from_ne_bytes([bytes[2 * i], bytes[2 * i + 1]]);
        }
        assert_eq!(ipv4_header_csum(&words).to_ne_bytes(), [0xb8, 0x61]);
        assert_eq!(csum_fold(csum_add(0, &words)).to_ne_bytes(), [0xb8, 0x61]);
    }

    #[test]
    fn incremental_update_matches_a_full_sum() {
        let mut words = [
            0x4500u16, 0x0073, 0, 0x4000, 0x4011, 0, 0xc0a8, 0x0001, 0xc0a8, 0x00c7,
        ];
        let check = csum_fold(csum_add(0, &words));
        for (old, new) in [(0x4011, 0x4001), (0x0073, 0xffff), (0x4011, 0x0000)] {
            words[4] = old;
            let check = csum_fold(csum_add(0, &words));
            words[4] = new;
            assert_eq!(
                csum_replace(check, old, new),
                csum_fold(csum_add(0, &words))
            );
        }
        assert_ne!(check, 0);
    }

    #[test]
    fn gue_port_and_flow_label_stay_in_range() {
        for e in [0, 1, 0x7fff_ffff, 0xffff_ffff, 0x1234_5678] {
            assert!(gue_source_port(e) >= 0x8000);
            assert!(flow_label(e) <= 0xf_ffff);
        }
        assert_ne!(gue_source_port(0x0001_0000), gue_source_port(0x0002_0000));
    }

    #[test]
    fn hash_depends_on_every_field() {
        let base = FlowKey {
            src: [1, 0, 0, 0],
            dst: [2, 0, 0, 0],
            sport: 3,
            dport: 4,
            proto: 6,
            family: 4,
            pad: [0; 2],
        };
        let h = flow_hash(&base);
        assert_ne!(
            h,
            flow_hash(&FlowKey {
                src: [9, 0, 0, 0],
                ..base
            })
        );
        assert_ne!(
            h,
            flow_hash(&FlowKey {
                dst: [9, 0, 0, 0],
                ..base
            })
        );
        assert_ne!(h, flow_hash(&FlowKey { sport: 9, ..base }));
        assert_ne!(h, flow_hash(&FlowKey { dport: 9, ..base }));
        assert_ne!(h, flow_hash(&FlowKey { proto: 17, ..base }));
        assert_eq!(src_hash(&base), src_hash(&FlowKey { sport: 9, ..base }));
    }
}

#[cfg(test)]
mod spread {
    use super::*;

    /// Sequential client ports (what a client's kernel hands out) must spread evenly: 30000
    /// flows over 3 buckets, each within 3% of a third.
    #[test]
    fn sequential_ports_spread_evenly() {
        let mut buckets = [0u32; 3];
        for port in (32768u16..62768).step_by(1) {
            let key = FlowKey {
                src: [u32::from_ne_bytes([10, 10, 0, 1]), 0, 0, 0],
                dst: [u32::from_ne_bytes([10, 200, 0, 100]), 0, 0, 0],
                sport: port.to_be(),
                dport: 80u16.to_be(),
                proto: 6,
                family: 4,
                pad: [0; 2],
            };
            buckets[(flow_hash(&key) % 65537 % 3) as usize] += 1;
        }
        for b in buckets {
            assert!((9700..=10300).contains(&b), "{buckets:?}");
        }
    }

    /// Sequential client ports, then sequential client addresses, through a /16 of outer
    /// sources (either half of the word, since the mask is in wire order): 4096 flows land on
    /// at least 4000 distinct values, and each of 16 buckets of the masked value gets within
    /// 25% of its share.
    #[test]
    fn encap_entropy_spreads_over_either_half_word() {
        let keys = |i: u16, by_port: bool| FlowKey {
            src: [
                u32::from_ne_bytes([10, 10, (i >> 8) as u8, i as u8]) * u32::from(!by_port)
                    + u32::from_ne_bytes([10, 10, 0, 1]) * u32::from(by_port),
                0,
                0,
                0,
            ],
            dst: [u32::from_ne_bytes([10, 200, 0, 100]), 0, 0, 0],
            sport: if by_port {
                (32768 + i).to_be()
            } else {
                40000u16.to_be()
            },
            dport: 443u16.to_be(),
            proto: 6,
            family: 4,
            pad: [0; 2],
        };
        for by_port in [true, false] {
            for mask in [0xffff_0000u32, 0x0000_ffff] {
                let mut values = [0u32; 4096];
                for (i, v) in (0u16..).zip(values.iter_mut()) {
                    *v = encap_entropy(&keys(i, by_port)) & mask;
                }
                let mut sorted = values;
                sorted.sort_unstable();
                let distinct = 1 + sorted.windows(2).filter(|w| w[0] != w[1]).count();
                assert!(distinct >= 4000, "{by_port} {mask:x}: {distinct}");
                let mut buckets = [0u32; 16];
                for v in values {
                    let v = if mask == 0xffff { v } else { v >> 16 };
                    buckets[(v >> 12) as usize] += 1;
                }
                for b in buckets {
                    assert!((192..=320).contains(&b), "{by_port} {mask:x}: {buckets:?}");
                }
            }
        }
    }
}
