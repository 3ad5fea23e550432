//! The address prefilter: what an address may be (a VIP, a backend), from one array read; a clear
//! role is certain, a set one is checked by the exact lookup that follows (`lb_common::prefilter`).
//!
//! `packet::parse` asks it as soon as it has a TCP/UDP packet's addresses, before it reads the L4
//! header: traffic that is neither to a VIP nor from a backend (most of a node's) leaves there.

use lb_common::{
    prefilter::{position, role, roles, slot, slot_of_word},
    service::{family, Addr},
};

use crate::maps::ADDRESS_FILTER;

/// The roles a destination may have as a VIP.
pub const VIP: u8 = role::VIP_PORT | role::VIP_ALL_PORTS;

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

/// The roles that may make a packet the datapath's: its destination's [`VIP`] roles, or, when it
/// has none, `role::BACKEND` if its source may be a backend (a reply to translate). 0: neither.
#[inline(always)]
pub fn of_packet(dst: &Addr, src: &Addr, family: u8) -> u8 {
    let to = roles_of(dst, family) & VIP;
    if to != 0 {
        return to;
    }
    roles_of(src, family) & role::BACKEND
}
