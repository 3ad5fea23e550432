//! Writes the datapath's address prefilter (`lb_common::prefilter`) from the programmed services
//! and backends: which slots may hold a VIP (with ports, or all ports) and which a backend whose
//! replies the node translates (DNAT and SNAT; DSR replies bypass the node).
//!
//! The filter is one map value, written whole when it changes. New roles are written before the map
//! entries they guard and stale ones cleared after those are gone (see `Datapath::apply_with`), so
//! a packet to a VIP being added is never passed by a stale filter.
//!
//! It is the datapath's global `ADDRESS_FILTER` (read without a map lookup), which aya makes the
//! map [`AddressFilter::MAP`] and creates zeroed at every load. It cannot adopt a pinned one:
//! writing the section's zeros into it would empty the filter of the program still running. So
//! `Datapath::carry_over_address_filter` copies the pinned words into the new map before any
//! program of the new load is attached, then pins the new map in place of the old one, as
//! [`AddressFilter::PIN_NAME`]. The programs still attached keep reading the filter they were
//! loaded with until the new ones replace them in their links, right after the first reconcile: a
//! VIP that reconcile adds is balanced from then on.

use std::borrow::Borrow;

use anyhow::{Context, Result};
use aya::maps::{Array, MapData};
use lb_common::{
    prefilter::{position, role, roles, slot, Words, SLOTS, WORDS},
    service::{Addr, ServiceKey},
};

/// The prefilter's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressFilter(Vec<u64>);

impl Default for AddressFilter {
    fn default() -> Self {
        Self(vec![0; WORDS as usize])
    }
}

impl AddressFilter {
    /// The filter's map: the data section `lb-ebpf/src/maps.rs` puts `ADDRESS_FILTER` in.
    pub const MAP: &str = ".data.address_filter";
    /// Its pin in the pin directory's `maps/`: the name, definition and contents of the map the
    /// filter was before it became a global, so agents on either side of that change adopt each
    /// other's.
    pub const PIN_NAME: &str = "ADDRESS_FILTER";

    fn set(&mut self, slot: u32, role: u8) {
        let (index, shift) = position(slot);
        self.0[index as usize] |= (role as u64) << shift;
    }

    fn clear(&mut self, slot: u32, role: u8) {
        let (index, shift) = position(slot);
        self.0[index as usize] &= !((role as u64) << shift);
    }

    /// `self` with `roles` (bits) added at `addr`.
    pub fn with_roles(mut self, addr: &Addr, roles: u8) -> Self {
        self.set(slot(addr), roles);
        self
    }

    /// Every role of `self` and of `other`.
    pub fn union(&self, other: &Self) -> Self {
        Self(self.0.iter().zip(&other.0).map(|(a, b)| a | b).collect())
    }

    /// Writes `self` as the map's one value. A reader racing the write sees each byte old or
    /// new, so the bits that stay the same are never wrong.
    pub fn write(&self, map: &mut Array<&mut MapData, Words>) -> Result<()> {
        let words: &Words = self.0.as_slice().try_into().expect("WORDS words");
        map.set(0, words, 0).context("writing ADDRESS_FILTER")
    }

    /// The filter the map holds.
    pub fn read(map: &Array<impl Borrow<MapData>, Words>) -> Result<Self> {
        Ok(Self(
            map.get(&0, 0).context("reading ADDRESS_FILTER")?.to_vec(),
        ))
    }

    /// The roles this filter holds for `addr`.
    pub fn roles_of(&self, addr: &Addr) -> u8 {
        let (index, shift) = position(slot(addr));
        roles(self.0[index as usize], shift)
    }
}

/// The role the prefilter gives a service's VIP.
pub fn vip_role(key: &ServiceKey) -> u8 {
    if key.port == 0 {
        role::VIP_ALL_PORTS
    } else {
        role::VIP_PORT
    }
}

/// An [`AddressFilter`] kept with how many VIPs and backends hold each role of each slot, so adding
/// or removing one updates the filter without recomputing it from every service (slots are shared:
/// a role is cleared only when its last holder goes).
#[derive(Debug, Clone, Default)]
pub struct CountedFilter {
    /// Per slot (`lb_common::prefilter::SLOTS`), per role bit: its holders. Allocated on first use.
    holders: Vec<[u32; ROLES]>,
    filter: AddressFilter,
}

/// Role bits counted per slot (`role::VIP_PORT`, `VIP_ALL_PORTS`, `BACKEND`).
const ROLES: usize = 3;

impl CountedFilter {
    /// One more holder of `role` (one bit) at `addr`.
    pub fn add(&mut self, addr: &Addr, role: u8) {
        let (slot, bit) = (slot(addr), role.trailing_zeros() as usize);
        if self.holders.is_empty() {
            self.holders = vec![[0; ROLES]; SLOTS as usize];
        }
        let holders = &mut self.holders[slot as usize][bit];
        *holders += 1;
        if *holders == 1 {
            self.filter.set(slot, role);
        }
    }

    /// One holder less of `role` at `addr` (one added before).
    pub fn remove(&mut self, addr: &Addr, role: u8) {
        let (slot, bit) = (slot(addr), role.trailing_zeros() as usize);
        let holders = &mut self.holders[slot as usize][bit];
        *holders -= 1;
        if *holders == 0 {
            self.filter.clear(slot, role);
        }
    }

    /// The filter of the holders there are.
    pub fn filter(&self) -> &AddressFilter {
        &self.filter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_set_per_kind_and_merged() {
        let vip = ServiceKey::new("198.51.100.10".parse().unwrap(), 80, 6);
        let all = ServiceKey::new("198.51.100.20".parse().unwrap(), 0, 6);
        let backend = Addr::from_ip("203.0.113.11".parse().unwrap());
        let mut counted = CountedFilter::default();
        counted.add(&vip.addr, vip_role(&vip));
        counted.add(&all.addr, vip_role(&all));
        counted.add(&backend, role::BACKEND);
        let filter = counted.filter().clone();
        let roles_of = |f: &AddressFilter, a: &Addr| f.roles_of(a);
        assert_eq!(roles_of(&filter, &vip.addr), role::VIP_PORT);
        assert_eq!(roles_of(&filter, &all.addr), role::VIP_ALL_PORTS);
        assert_eq!(roles_of(&filter, &backend), role::BACKEND);
        let mut other = CountedFilter::default();
        other.add(&all.addr, vip_role(&all));
        let other = other.filter();
        assert_eq!(
            roles_of(&filter.union(other), &all.addr),
            role::VIP_ALL_PORTS
        );
        assert_eq!(roles_of(other, &vip.addr), 0);
    }

    #[test]
    fn a_role_stays_until_its_last_holder_goes() {
        let vip = ServiceKey::new("198.51.100.10".parse().unwrap(), 80, 6);
        let backend = Addr::from_ip("198.51.100.10".parse().unwrap());
        let mut counted = CountedFilter::default();
        counted.add(&vip.addr, role::VIP_PORT);
        counted.add(&vip.addr, role::VIP_PORT);
        counted.add(&backend, role::BACKEND);
        counted.remove(&vip.addr, role::VIP_PORT);
        assert_eq!(
            counted.filter().roles_of(&vip.addr),
            role::VIP_PORT | role::BACKEND
        );
        counted.remove(&vip.addr, role::VIP_PORT);
        assert_eq!(counted.filter().roles_of(&vip.addr), role::BACKEND);
        counted.remove(&backend, role::BACKEND);
        assert_eq!(counted.filter(), &AddressFilter::default());
    }
}
