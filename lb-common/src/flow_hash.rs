//! The flow hash that picks a backend. Shared so that userspace and tests can predict the datapath's
//! choice for a given 5-tuple.

/// Mixes the 5-tuple into 32 bits. Inputs are the raw header words as loaded from the packet (IPv4
/// addresses in word 0, the rest zero); the result only has to be stable and well spread, not
/// portable across byte orders.
///
/// Rounds work on 64-bit lanes (two address words each): in BPF a round is four instructions on
/// 64-bit registers with one multiply, where 32-bit murmur rounds needed masking for every 32-bit
/// operation and two multiplies per word (about 3x the latency on a new flow's path).
#[inline(always)]
pub fn flow_hash(src: &[u32; 4], dst: &[u32; 4], ports: u32, protocol: u8, seed: u32) -> u32 {
    let lane = |words: &[u32; 4], i: usize| words[i] as u64 | (words[i + 1] as u64) << 32;
    let mut h = (seed as u64) << 32 | protocol as u64;
    h = round(h, lane(src, 0));
    h = round(h, lane(src, 2));
    h = round(h, lane(dst, 0));
    h = round(h, lane(dst, 2));
    h = round(h, ports as u64);
    finalize(h)
}

/// Hash of the source address only (session affinity).
#[inline(always)]
pub fn source_hash(src: &[u32; 4], seed: u32) -> u32 {
    flow_hash(src, &[0; 4], 0, 0, seed)
}

/// 2^64 / golden ratio, odd.
const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

/// Multiply (every input bit reaches the high half), then fold the high half into the low one.
#[inline(always)]
fn round(h: u64, lane: u64) -> u64 {
    let p = (h ^ lane).wrapping_mul(MULTIPLIER);
    p ^ (p >> 32)
}

/// The murmur3 64-bit finaliser, folded to 32 bits.
#[inline(always)]
fn finalize(mut h: u64) -> u32 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 29;
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ports_spread_evenly_over_backends() {
        let backends = 4u32;
        let mut hits = [0u32; 4];
        for sport in 10_000u32..14_000 {
            let h = flow_hash(
                &[0x0102_00c0, 0, 0, 0],
                &[0x0a64_33c6, 0, 0, 0],
                (sport << 16) | 80,
                6,
                0,
            );
            hits[(h % backends) as usize] += 1;
        }
        for h in hits {
            assert!((900..1100).contains(&h), "uneven spread: {hits:?}");
        }
    }

    #[test]
    fn hash_depends_on_every_field() {
        let (a, b) = ([1, 0, 0, 0], [2, 0, 0, 0]);
        let base = flow_hash(&a, &b, 3, 6, 0);
        assert_ne!(base, flow_hash(&[9, 0, 0, 0], &b, 3, 6, 0));
        assert_ne!(base, flow_hash(&[1, 0, 0, 9], &b, 3, 6, 0));
        assert_ne!(base, flow_hash(&a, &[2, 0, 9, 0], 3, 6, 0));
        assert_ne!(base, flow_hash(&a, &b, 9, 6, 0));
        assert_ne!(base, flow_hash(&a, &b, 3, 17, 0));
        assert_ne!(base, flow_hash(&a, &b, 3, 6, 1));
    }
}
