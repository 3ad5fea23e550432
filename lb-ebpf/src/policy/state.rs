//! The policy check's memory: connections whose forward packets passed (so their replies and
//! related ICMP errors pass without a rule) and datagrams whose first fragment passed (so their
//! later fragments, which carry no ports, follow it).
//!
//! Forward packets are checked against the rules every time, so a rule change that removes an
//! allowance stops a connection's forward packets at once; its replies keep passing until the entry
//! is idle for the protocol's timeout (`conntrack::timeouts`) or evicted, which without forward
//! packets is within one timeout.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    conntrack::{timeouts, FlowKey},
    fragments::{limits as fragment_limits, FragmentKey},
    policy::{conntrack_flags, Direction, PolicyConntrackEntry, PolicyFragmentEntry},
    protocol,
};

use super::{
    maps::{POLICY_CONNTRACK, POLICY_FRAGMENTS},
    parse::{Packet, Shape},
};

#[inline(always)]
fn idle_timeout(protocol: u8) -> u64 {
    if protocol == protocol::TCP {
        timeouts::TCP_ESTABLISHED_NS
    } else {
        timeouts::UDP_NS
    }
}

/// The connection `packet` replies to (its key reversed), or the one an ICMP error quotes.
#[inline(always)]
fn replied_connection(packet: &Packet) -> FlowKey {
    if let Shape::IcmpError(quoted) = &packet.shape {
        return *quoted;
    }
    let k = &packet.key;
    FlowKey {
        src: k.dst,
        dst: k.src,
        src_port: k.dst_port,
        dst_port: k.src_port,
        protocol: k.protocol,
        family: k.family,
        _pad: [0; 2],
    }
}

/// Whether `packet` is a reply (or related ICMP error) of a connection the opposite check of this
/// endpoint passed, still live. Refreshes the entry if so.
#[inline(always)]
pub fn is_reply(packet: &Packet, dir: Direction) -> bool {
    let connection = replied_connection(packet);
    let Some(entry) = POLICY_CONNTRACK.get_ptr_mut(&connection) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a valid map value; racing writers only move `last_seen_ns` forward.
    unsafe {
        if (*entry).flags & conntrack_flags::reply_needs(dir) == 0
            || now.wrapping_sub((*entry).last_seen_ns) > idle_timeout(connection.protocol)
        {
            return false;
        }
        (*entry).last_seen_ns = now;
    }
    true
}

/// Records that the check of `dir` passed a forward packet of `key`'s connection.
#[inline(always)]
pub fn remember(key: &FlowKey, dir: Direction) {
    let flag = conntrack_flags::passed(dir);
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(entry) = POLICY_CONNTRACK.get_ptr_mut(key) {
        // SAFETY: a valid map value. Not atomic (BPF has no 32-bit atomic or here): the other
        // check of the connection racing on another CPU may lose a flag, which the connection's
        // next forward packet sets again.
        unsafe {
            (*entry).last_seen_ns = now;
            if (*entry).flags & flag == 0 {
                (*entry).flags |= flag;
            }
        }
        return;
    }
    let entry = PolicyConntrackEntry {
        flags: flag,
        _pad: 0,
        last_seen_ns: now,
    };
    // A full LRU map evicts its oldest entry; an error only costs this connection's replies.
    let _ = POLICY_CONNTRACK.insert(key, &entry, 0);
}

#[inline(always)]
fn fragment_key(packet: &Packet, id: u32) -> FragmentKey {
    let k = &packet.key;
    FragmentKey::new(k.family, k.src, k.dst, id, k.protocol)
}

/// Whether the check of `dir` passed the first fragment of this later fragment's datagram, recently.
#[inline(always)]
pub fn first_fragment_passed(packet: &Packet, id: u32, dir: Direction) -> bool {
    // SAFETY: copied out at once.
    let Some(entry) = (unsafe { POLICY_FRAGMENTS.get(&fragment_key(packet, id)) }).copied() else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    entry.flags & conntrack_flags::passed(dir) != 0
        && now.wrapping_sub(entry.first_seen_ns) <= fragment_limits::TIMEOUT_NS
}

/// Records that the check of `dir` passed the first fragment of datagram `id`.
#[inline(always)]
pub fn remember_first_fragment(packet: &Packet, id: u32, dir: Direction) {
    let key = fragment_key(packet, id);
    let now = unsafe { bpf_ktime_get_ns() };
    let flag = conntrack_flags::passed(dir);
    let mut flags = flag;
    // SAFETY: copied out at once.
    if let Some(old) = unsafe { POLICY_FRAGMENTS.get(&key) } {
        if now.wrapping_sub(old.first_seen_ns) <= fragment_limits::TIMEOUT_NS {
            flags |= old.flags;
        }
    }
    let entry = PolicyFragmentEntry {
        flags,
        _pad: 0,
        first_seen_ns: now,
    };
    let _ = POLICY_FRAGMENTS.insert(&key, &entry, 0);
}
