//! The flow hash that picks a backend. Shared so that userspace and tests can predict the datapath's
//! choice for a given 5-tuple.

/// Mixes the 5-tuple into 32 bits (murmur3-style rounds). Inputs are the raw header words as loaded
/// from the packet (IPv4 addresses in word 0, the rest zero); the result only has to be stable and
/// well spread, not portable across byte orders.
#[inline(always)]
pub fn flow_hash(src: &[u32; 4], dst: &[u32; 4], ports: u32, protocol: u8, seed: u32) -> u32 {
    let mut h = seed ^ (protocol as u32).wrapping_mul(0x9e37_79b9);
    h = mix(h ^ src[0]);
    h = mix(h ^ src[1]);
    h = mix(h ^ src[2]);
    h = mix(h ^ src[3]);
    h = mix(h ^ dst[0]);
    h = mix(h ^ dst[1]);
    h = mix(h ^ dst[2]);
    h = mix(h ^ dst[3]);
    h = mix(h ^ ports);
    finalize(h)
}

/// Hash of the source address only (session affinity).
#[inline(always)]
pub fn source_hash(src: &[u32; 4], seed: u32) -> u32 {
    flow_hash(src, &[0; 4], 0, 0, seed)
}

#[inline(always)]
fn mix(mut h: u32) -> u32 {
    h = h.wrapping_mul(0xcc9e_2d51);
    h = h.rotate_left(15);
    h.wrapping_mul(0x1b87_3593)
}

#[inline(always)]
fn finalize(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
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
