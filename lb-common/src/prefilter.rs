//! The address prefilter: a small bitmap, indexed by a hash of an address, that says whether the
//! address may be a VIP (of a service on some ports, or of an all-ports service) or a backend.
//! Written by the agent, read by the datapath before any hash-map lookup, so that traffic which is
//! neither to a VIP nor from a backend (most of a node's traffic) costs two array reads instead of
//! three hash lookups. A set bit only means "maybe": colliding addresses go on to the exact lookups,
//! which decide; a clear bit means "certainly not".
//!
//! Layout: [`SLOTS`] slots of [`ROLE_BITS`] bits each (one bit per [`role`]), packed
//! [`SLOTS_PER_WORD`] to a `u64` word; the [`WORDS`] words (32 KiB, fits in L1/L2 next to the
//! program's other hot data) are the datapath's global `ADDRESS_FILTER`, which it addresses
//! directly (no map lookup) and indexes by slot.

use crate::service::Addr;

/// log2 of the number of slots: 65536 slots for at most 4096 services and 65535 backends.
pub const SLOT_BITS: u32 = 16;
pub const SLOTS: u32 = 1 << SLOT_BITS;
/// Bits per slot: one per role.
pub const ROLE_BITS: u32 = 4;
pub const SLOTS_PER_WORD: u32 = 64 / ROLE_BITS;
/// `u64` words of the filter.
pub const WORDS: u32 = SLOTS / SLOTS_PER_WORD;

/// The filter: the datapath's global `ADDRESS_FILTER` (to userspace, the one value of the map
/// `.data.address_filter`).
pub type Words = [u64; WORDS as usize];

/// What an address may be: the bits of a slot.
pub mod role {
    /// The destination of a service with a port (exact `SERVICES` entry).
    pub const VIP_PORT: u8 = 1 << 0;
    /// The destination of an all-ports service (`SERVICES` entry with port 0).
    pub const VIP_ALL_PORTS: u8 = 1 << 1;
    /// A backend: the source of replies to translate (`NAT_REPLY`).
    pub const BACKEND: u8 = 1 << 2;
}

/// The slot of `addr` (both families): its four words folded into one (an IPv4 address has words
/// 1..4 zero, so its fold is the address word itself: the datapath's shortcut), then
/// [`slot_of_word`].
#[inline(always)]
pub fn slot(addr: &Addr) -> u32 {
    slot_of_word(fold(addr))
}

/// The words of `addr` XORed together: what [`slot_of_word`] hashes.
#[inline(always)]
pub fn fold(addr: &Addr) -> u32 {
    let a = addr.0;
    a[0] ^ a[1] ^ a[2] ^ a[3]
}

/// The slot of a folded address: multiplicative (Fibonacci) hashing, the top [`SLOT_BITS`] bits of
/// the word times an odd constant. One multiply and one shift, since the datapath computes it for
/// every packet's destination and most packets' source. An input bit changes the product from its
/// own position up, so the slot sees every bit of the address; consecutive addresses (how VIPs and
/// backends are numbered) get distinct slots: a /24 never shares a slot. Collisions only cost the
/// exact lookups.
#[inline(always)]
pub fn slot_of_word(word: u32) -> u32 {
    word.wrapping_mul(0x9e37_79b1) >> (32 - SLOT_BITS)
}

/// The roles `words` holds for the address whose [`fold`] is `folded`.
#[inline(always)]
pub fn roles_of_folded(words: &Words, folded: u32) -> u8 {
    let (index, shift) = position(slot_of_word(folded));
    // The mask changes nothing (a slot's word is below `WORDS`) but proves it: no bounds check.
    roles(words[(index & (WORDS - 1)) as usize], shift)
}

/// Index in [`Words`] of the word holding `slot`, and the shift of its role bits.
#[inline(always)]
pub fn position(slot: u32) -> (u32, u32) {
    (slot / SLOTS_PER_WORD, (slot % SLOTS_PER_WORD) * ROLE_BITS)
}

/// The roles `word` (the word of [`position`]) holds for the slot at `shift`.
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
        // A /20 of consecutive addresses (how VIPs and backends are usually numbered): at most the
        // collisions of a random spread (about 4096^2 / 2 / 65536 = 128 pairs).
        let mut seen = std::collections::HashSet::new();
        for i in 0..4096u32 {
            let b = i.to_be_bytes();
            seen.insert(slot(&v4([10, b[1], b[2], b[3]])));
        }
        assert!(seen.len() > 3900, "only {} distinct slots", seen.len());
        let slash24: std::collections::HashSet<u32> =
            (0..=255).map(|i| slot(&v4([198, 51, 100, i]))).collect();
        assert_eq!(slash24.len(), 256, "a /24 shares no slot");
        let v6 = |i: u32| Addr([0xb80d_0120, 0, 0, i.to_be()]);
        let distinct: std::collections::HashSet<u32> = (0..4096).map(|i| slot(&v6(i))).collect();
        assert!(
            distinct.len() > 3900,
            "only {} distinct slots",
            distinct.len()
        );
    }
}
