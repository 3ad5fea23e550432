//! The address prefilter: what an address may be (a VIP, a backend), from one read of the filter; a
//! clear role is certain, a set one is checked by the exact lookup that follows
//! (`lb_common::prefilter`).
//!
//! `packet::parse` asks it first, from the frame of a plain TCP/UDP packet (its screen), else once
//! the full parse has the addresses; either way before the L4 header is read: traffic that is
//! neither to a VIP nor from a backend (most of a node's) leaves there.

use lb_common::{
    prefilter::{fold, role, Words},
    service::{family, Addr},
};

use crate::maps::ADDRESS_FILTER;

/// The roles a destination may have as a VIP.
pub const VIP: u8 = role::VIP_PORT | role::VIP_ALL_PORTS;

/// The `lb_common::prefilter::role` bits of `addr`'s slot; 0: neither a VIP nor a backend.
/// `family` picks the shortcut: an IPv4 address is its first word.
#[inline(always)]
pub fn roles_of(addr: &Addr, family: u8) -> u8 {
    let folded = if family == family::IPV4 {
        addr.0[0]
    } else {
        fold(addr)
    };
    lb_common::prefilter::roles_of_folded(filter(), folded)
}

/// The filter's words (all zero until the agent writes them: then nothing is a VIP or backend).
#[inline(always)]
fn filter() -> &'static Words {
    // SAFETY: a global only userspace writes, whole; a read racing a write sees each byte old or
    // new, and the bits that stay the same are never wrong (`lb-agent/src/prefilter.rs`).
    unsafe { &*core::ptr::addr_of!(ADDRESS_FILTER) }
}

/// The roles that may make a packet the datapath's, from its folded destination and source: the
/// destination's [`VIP`] roles, or, when it has none, `role::BACKEND` if its source may be a
/// backend (a reply to translate). 0: neither.
#[inline(always)]
pub fn of_packet(dst_folded: u32, src_folded: u32) -> u8 {
    let words = filter();
    let to = lb_common::prefilter::roles_of_folded(words, dst_folded) & VIP;
    if to != 0 {
        return to;
    }
    lb_common::prefilter::roles_of_folded(words, src_folded) & role::BACKEND
}
