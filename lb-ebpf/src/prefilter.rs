//! The address prefilter: what an address may be (a VIP, a backend), from one array read; a clear
//! role is certain, a set one is checked by the exact lookup that follows (`lb_common::prefilter`).

use lb_common::{
    prefilter::{position, roles, slot},
    service::Addr,
};

use crate::maps::ADDRESS_FILTER;

/// The `lb_common::prefilter::role` bits of `addr`'s slot; 0: neither a VIP nor a backend.
#[inline(always)]
pub fn roles_of(addr: &Addr) -> u8 {
    let (index, shift) = position(slot(addr));
    ADDRESS_FILTER
        .get(index)
        .map_or(0, |word| roles(*word, shift))
}
