//! The address prefilter: what an address may be (a VIP, a backend), from one array read; a clear
//! role is certain, a set one is checked by the exact lookup that follows (`lb_common::prefilter`).

use lb_common::{
    prefilter::{position, roles, slot, slot_of_word},
    service::{family, Addr},
};

use crate::maps::ADDRESS_FILTER;

/// The `lb_common::prefilter::role` bits of `addr`'s slot; 0: neither a VIP nor a backend.
/// `family` picks the shortcut: an IPv4 address is its first word.
#[inline(always)]
pub fn roles_of(addr: &Addr, family: u8) -> u8 {
    let slot = if family == family::IPV4 {
        slot_of_word(addr.0[0])
    } else {
        slot(addr)
    };
    let (index, shift) = position(slot);
    ADDRESS_FILTER
        .get(index)
        .map_or(0, |word| roles(*word, shift))
}
