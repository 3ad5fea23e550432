//! Incremental Internet checksum updates (RFC 1624), used when NAT rewrites addresses and ports.
//!
//! One's-complement sums do not depend on byte order as long as every operand is read the same way,
//! so callers pass header words exactly as loaded from the packet (native loads of network-order
//! bytes) and store the result back the same way.

/// Folds a 32-bit one's-complement accumulator to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// New checksum after one 16-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace_u16(check: u16, old: u16, new: u16) -> u16 {
    // HC' = ~(~HC + ~m + m')
    let sum = (!check as u32) + (!old as u32) + (new as u32);
    !fold(sum)
}

/// New checksum after one 32-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace_u32(check: u16, old: u32, new: u32) -> u16 {
    let sum = (!check as u32)
        + (!(old & 0xffff) & 0xffff)
        + (!(old >> 16) & 0xffff)
        + (new & 0xffff)
        + (new >> 16);
    !fold(sum)
}

/// Updates a UDP checksum, keeping 0 ("no checksum", IPv4 only) as 0 and never producing 0
/// (which would mean "no checksum"): RFC 768 transmits a computed 0 as 0xffff.
#[inline(always)]
pub fn replace_u32_udp(check: u16, old: u32, new: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace_u32(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// Like [`replace_u32_udp`] for a 16-bit word (a port).
#[inline(always)]
pub fn replace_u16_udp(check: u16, old: u16, new: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace_u16(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// The value of a checksum field that finishing the checksum leaves as it is, when the rest of the
/// data it covers sums to `rest`: `v` such that `!fold(rest + v)` is `v` again (the kernel writes
/// a computed 0 as 0xffff, so 0xffff stands for both). `lb_tc`'s too-big answers put it in
/// the quoted transport checksum of a packet whose skb still asks for that checksum to be finished
/// (`CHECKSUM_PARTIAL`), so that the answer's bytes are the same whether or not it is.
///
/// In one's complement arithmetic, `rest + 2v` must be 0 (0xffff): `2v = !rest`, and halving is a
/// rotation by one bit (2^16 is 1 modulo 0xffff).
#[inline(always)]
pub fn completion_fixed_point(rest: u32) -> u16 {
    match (!fold(rest)).rotate_right(1) {
        0 => 0xffff,
        v => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full checksum over big-endian 16-bit words, as a reference.
    fn full(words: &[u16]) -> u16 {
        let mut sum: u32 = 0;
        for w in words {
            sum += *w as u32;
        }
        !fold(sum)
    }

    #[test]
    fn replace_matches_recomputation() {
        let mut data = [
            0x4500u16, 0x0073, 0x0000, 0x4000, 0x4011, 0, 0xc000, 0x0201, 0xc633, 0x640a,
        ];
        let check = full(&data);
        // Rewrite the destination address 198.51.100.10 -> 203.0.113.7.
        let old = ((data[8] as u32) << 16) | data[9] as u32;
        let new = 0xcb00_7107u32;
        data[8] = (new >> 16) as u16;
        data[9] = new as u16;
        assert_eq!(replace_u32(check, old, new), full(&data));
        // And a 16-bit field.
        let old16 = data[0];
        data[0] = 0x4501;
        let c2 = replace_u16(
            full(&{
                let mut d = data;
                d[0] = old16;
                d
            }),
            old16,
            0x4501,
        );
        assert_eq!(c2, full(&data));
    }

    #[test]
    fn byte_order_does_not_matter() {
        // The same update computed on byte-swapped words gives the byte-swapped result.
        let check = 0x1c46u16;
        let (old, new) = (0xc633_640au32, 0xcb00_7107u32);
        let be = replace_u32(check, old, new);
        let le = replace_u32(check.swap_bytes(), old.swap_bytes(), new.swap_bytes());
        assert_eq!(be, le.swap_bytes());
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(replace_u32_udp(0, 1, 2), 0);
        assert_eq!(replace_u16_udp(0, 1, 2), 0);
    }

    #[test]
    fn finishing_the_checksum_leaves_the_fixed_point() {
        // The kernel's `skb_checksum_help`: the folded complement of everything covered, field
        // included, a computed 0 written as 0xffff.
        let finish = |rest: u32, field: u16| match !fold(rest + field as u32) {
            0 => 0xffff,
            c => c,
        };
        for rest in (0..=0x2_ffffu32)
            .step_by(7)
            .chain([0, 0xffff, 0x1_fffe, 0x2_fffd])
        {
            let v = completion_fixed_point(rest);
            assert_eq!(finish(rest, v), v, "rest {rest:#x}, field {v:#x}");
        }
    }
}
