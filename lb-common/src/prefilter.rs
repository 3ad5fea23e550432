//! The address prefilter: a small bitmap, indexed by a hash of an address, that says whether the
//! address may be a VIP (of a service on some ports, or of an all-ports service) or a backend.
//! Written by the agent, read by the datapath before any hash-map lookup, so that traffic which is
//! neither to a VIP nor from a backend (most of a node's traffic) costs two array reads instead of
//! three hash lookups. A set bit only means "maybe": colliding addresses go on to the exact lookups,
//! which decide; a clear bit means "certainly not".
//!
//! Layout: [`SLOTS`] slots of [`ROLE_BITS`] bits each (one bit per [`role`]), packed
//! [`SLOTS_PER_WORD`] to a `u64` word of the `ADDRESS_FILTER` array ([`WORDS`] words, 32 KiB, fits in
//! L1/L2 next to the program's other hot data).

use crate::service::Addr;

/// log2 of the number of slots: 65536 slots for at most 4096 services and 65535 backends.
pub const SLOT_BITS: u32 = 16;
pub const SLOTS: u32 = 1 << SLOT_BITS;
/// Bits per slot: one per role.
pub const ROLE_BITS: u32 = 4;
pub const SLOTS_PER_WORD: u32 = 64 / ROLE_BITS;
/// Entries (`u64` words) of the `ADDRESS_FILTER` array.
pub const WORDS: u32 = SLOTS / SLOTS_PER_WORD;

/// What an address may be: the bits of a slot.
pub mod role {
    /// The destination of a service with a port (exact `SERVICES` entry).
    pub const VIP_PORT: u8 = 1 << 0;
    /// The destination of an all-ports service (`SERVICES` entry with port 0).
    pub const VIP_ALL_PORTS: u8 = 1 << 1;
    /// A backend: the source of replies to translate (`NAT_REPLY`).
    pub const BACKEND: u8 = 1 << 2;
}

/// The slot of `addr` (both families: an IPv4 address has words 1..4 zero). Multiply-xorshift mixing
/// so that addresses differing in any bit spread over all slots.
#[inline(always)]
pub fn slot(addr: &Addr) -> u32 {
    let a = addr.0;
    slot_of_word(a[0] ^ a[1].rotate_left(8) ^ a[2].rotate_left(16) ^ a[3].rotate_left(24))
}

/// [`slot`] of an address folded to one word; for IPv4 that is the address word itself (the
/// datapath's shortcut).
#[inline(always)]
pub fn slot_of_word(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h >> (32 - SLOT_BITS)
}

/// Index in `ADDRESS_FILTER` of the word holding `slot`, and the shift of its role bits.
#[inline(always)]
pub fn position(slot: u32) -> (u32, u32) {
    (slot / SLOTS_PER_WORD, (slot % SLOTS_PER_WORD) * ROLE_BITS)
}

/// The roles `word` (the `ADDRESS_FILTER` entry of [`position`]) holds for the slot at `shift`.
#[inline(always)]
pub fn roles(word: u64, shift: u32) -> u8 {
    ((word >> shift) & ((1 << ROLE_BITS) - 1)) as u8
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    fn v4(a: [u8; 4]) -> Addr {
        Addr::from_v4_word(u32::from_ne_bytes(a))
    }

    #[test]
    fn layout_fits_the_slots() {
        assert_eq!(WORDS * SLOTS_PER_WORD, SLOTS);
        let (word, shift) = position(SLOTS - 1);
        assert_eq!(word, WORDS - 1);
        assert_eq!(shift, 64 - ROLE_BITS);
        assert_eq!(roles(0b0101 << shift, shift), 0b0101);
    }

    #[test]
    fn ipv4_shortcut_is_the_same_slot() {
        for word in [0, 1, 0x0a64_33c6, 0xffff_ffff, 0x1234_5678] {
            assert_eq!(slot_of_word(word), slot(&Addr::from_v4_word(word)));
        }
    }

    #[test]
    fn neighbouring_addresses_spread_over_slots() {
        // A /20 of consecutive addresses (how VIPs and backends are usually numbered): few
        // collisions, like a random spread (expected about 4096^2 / 2 / 65536 = 128 pairs).
        let mut seen = std::collections::HashSet::new();
        for i in 0..4096u32 {
            let b = i.to_be_bytes();
            seen.insert(slot(&v4([10, b[1], b[2], b[3]])));
        }
        assert!(seen.len() > 3900, "only {} distinct slots", seen.len());
        let v6 = |i: u32| Addr([0xb80d_0120, 0, 0, i.to_be()]);
        let distinct: std::collections::HashSet<u32> = (0..4096).map(|i| slot(&v6(i))).collect();
        assert!(
            distinct.len() > 3900,
            "only {} distinct slots",
            distinct.len()
        );
    }
}
