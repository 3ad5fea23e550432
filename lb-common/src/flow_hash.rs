//! The flow hash that picks a backend. Shared so that userspace and tests can predict the datapath's
//! choice for a given 5-tuple.

use crate::{
    conntrack::FlowKey,
    service::{family, Addr},
};

/// Mixes `flow`'s 5-tuple into 32 bits. Inputs are the raw header words as loaded from the packet;
/// the result only has to be stable and well spread, not portable across byte orders.
///
/// Rounds work on 64-bit lanes: in BPF a round is four instructions on 64-bit registers with one
/// multiply, where 32-bit murmur rounds needed masking for every 32-bit operation and two
/// multiplies per word. An IPv4 flow's two addresses fill one lane (their other words are zero),
/// so it takes two rounds where IPv6 takes five.
#[inline(always)]
pub fn flow_hash(flow: &FlowKey, seed: u32) -> u32 {
    let (src, dst) = (&flow.src.0, &flow.dst.0);
    let mut h = (seed as u64) << 32 | flow.protocol as u64;
    if flow.family == family::IPV4 {
        h = round(h, src[0] as u64 | (dst[0] as u64) << 32);
    } else {
        h = round(h, lane(src, 0));
        h = round(h, lane(src, 2));
        h = round(h, lane(dst, 0));
        h = round(h, lane(dst, 2));
    }
    finalize(round(
        h,
        ((flow.src_port as u32) << 16 | flow.dst_port as u32) as u64,
    ))
}

/// Hash of the source address only (session affinity).
#[inline(always)]
pub fn source_hash(src: &Addr, seed: u32) -> u32 {
    let h = round((seed as u64) << 32, lane(&src.0, 0));
    finalize(round(h, lane(&src.0, 2)))
}

/// The packet hash seed. Fixed, so every node maps a flow to the same table slot.
pub const PACKET_HASH_SEED: u32 = 0;

/// The slot of a service's Maglev table (`table_size` entries, not 0) that a new `flow` takes:
/// the datapath's choice, also computed by tests to predict it. `source_only`: the service hashes
/// the source address alone.
#[inline(always)]
pub fn maglev_slot(flow: &FlowKey, source_only: bool, table_size: u32) -> u32 {
    let hash = if source_only {
        source_hash(&flow.src, PACKET_HASH_SEED)
    } else {
        flow_hash(flow, PACKET_HASH_SEED)
    };
    reduce(hash, table_size)
}

/// `hash` mapped onto `0 .. n`: multiply-shift, as even as a modulo for a well-mixed hash, with
/// one multiply instead of a 64-bit division (tens of cycles) on a new flow's path.
#[inline(always)]
pub fn reduce(hash: u32, n: u32) -> u32 {
    ((hash as u64 * n as u64) >> 32) as u32
}

#[inline(always)]
fn lane(words: &[u32; 4], i: usize) -> u64 {
    words[i] as u64 | (words[i + 1] as u64) << 32
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

    fn v4_flow(src: u32, dst: u32, src_port: u16, dst_port: u16, protocol: u8) -> FlowKey {
        FlowKey {
            src: Addr::from_v4_word(src),
            dst: Addr::from_v4_word(dst),
            src_port,
            dst_port,
            protocol,
            family: family::IPV4,
            _pad: [0; 2],
        }
    }

    #[test]
    fn source_ports_spread_evenly_over_backends() {
        let mut hits = [0u32; 4];
        for sport in 10_000u16..14_000 {
            let flow = v4_flow(0x0102_00c0, 0x0a64_33c6, sport.to_be(), 80u16.to_be(), 6);
            hits[maglev_slot(&flow, false, 4) as usize] += 1;
        }
        for h in hits {
            assert!((900..1100).contains(&h), "uneven spread: {hits:?}");
        }
    }

    #[test]
    fn reduce_stays_in_range_and_spreads() {
        let n = 16381;
        let mut seen = [0u32; 16381];
        for i in 0..(n * 8) {
            let slot = reduce(finalize(i as u64), n);
            assert!(slot < n);
            seen[slot as usize] += 1;
        }
        let empty = seen.iter().filter(|&&c| c == 0).count();
        // 8 per slot on average: a random spread leaves about e^-8 (0.03%) of the slots empty.
        assert!(empty < 50, "{empty} slots never hit");
    }

    #[test]
    fn hash_depends_on_every_field() {
        let base_flow = v4_flow(1, 2, 3, 4, 6);
        let base = flow_hash(&base_flow, 0);
        let changed = |f: fn(&mut FlowKey)| {
            let mut flow = base_flow;
            f(&mut flow);
            flow_hash(&flow, 0)
        };
        assert_ne!(base, changed(|f| f.src.0[0] = 9));
        assert_ne!(base, changed(|f| f.dst.0[0] = 9));
        assert_ne!(base, changed(|f| f.src_port = 9));
        assert_ne!(base, changed(|f| f.dst_port = 9));
        assert_ne!(base, changed(|f| f.protocol = 17));
        assert_ne!(base, flow_hash(&base_flow, 1));
        let v6 = FlowKey {
            family: family::IPV6,
            ..base_flow
        };
        let base6 = flow_hash(&v6, 0);
        for word in 0..4 {
            let mut src = v6;
            src.src.0[word] = 9;
            assert_ne!(base6, flow_hash(&src, 0), "source word {word}");
            let mut dst = v6;
            dst.dst.0[word] = 9;
            assert_ne!(base6, flow_hash(&dst, 0), "destination word {word}");
        }
        assert_ne!(
            source_hash(&base_flow.src, 0),
            source_hash(&Addr([1, 0, 0, 9]), 0)
        );
    }
}
