//! The CIDR deny list: packets whose source is in `CIDR_DENY_V4` / `CIDR_DENY_V6` are dropped
//! before they are parsed, by `lb_xdp` (before an skb is allocated) and by `lb_tc` (when the
//! balancer is attached as TC, where the list would otherwise not be checked at all). Costs nothing
//! unless enabled at load time: `POLICY_XDP_CIDR_DENY` (named when only XDP checked it) is a
//! read-only global, so with it 0 the verifier removes the lookup from both programs. Drops are
//! counted (`cidr_deny`), not reported one by one: the list is meant for floods, where per-packet
//! events would only fill the ring buffer.

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::policy::{IpKeyV4, IpKeyV6, Reason, Verdict};
use network_types::eth::EtherType;

use super::{
    maps::{CIDR_DENY_V4, CIDR_DENY_V6},
    report::count,
};
use crate::context::PacketContext;

/// Set at load time (`EbpfLoader::set_global`): non-zero when a CIDR deny list is configured.
#[unsafe(no_mangle)]
static POLICY_XDP_CIDR_DENY: u32 = 0;

const ETH_LEN: usize = 14;

/// The bytes the check reads: Ethernet and a fixed IPv6 header (`lb_tc` pulls them into an skb's
/// linear part when they are not there).
pub const HEADER_BYTES: usize = ETH_LEN + 40;

/// Whether a CIDR deny list was configured at load time.
#[inline(always)]
pub fn enabled() -> bool {
    // SAFETY: a global of this program.
    unsafe { core::ptr::read_volatile(&POLICY_XDP_CIDR_DENY) != 0 }
}

/// Whether the packet's source is denied (counted if so).
#[inline(always)]
pub fn cidr_denied<C: PacketContext>(ctx: &C) -> bool {
    enabled() && source_denied(ctx)
}

/// A separate BPF function, so its keys take nothing from the caller's stack frame.
#[inline(never)]
pub fn source_denied<C: PacketContext>(ctx: &C) -> bool {
    // Volatile: see `packet::Extent`.
    let packet = ctx.extent();
    let (start, end) = (packet.start, packet.end);
    // Too short for an IPv4 header: passed or dropped as without the list.
    if start + ETH_LEN + 20 > end {
        return false;
    }
    // SAFETY: 14 + 20 bytes are in the packet (checked above).
    let ether_type = unsafe { *((start + 12) as *const u16) };
    let denied = if ether_type == EtherType::Ipv4 as u16 {
        // SAFETY: the IPv4 source is bytes 12..16 of the IP header, within the 34 checked.
        let src = unsafe { core::ptr::read_unaligned((start + ETH_LEN + 12) as *const u32) };
        CIDR_DENY_V4
            .get(Key::new(IpKeyV4::FULL_PREFIX, IpKeyV4::from_be(0, src)))
            .is_some()
    } else if ether_type == EtherType::Ipv6 as u16 && start + ETH_LEN + 40 <= end {
        // SAFETY: the IPv6 source is bytes 8..24 of the 40 checked.
        let src = unsafe { core::ptr::read_unaligned((start + ETH_LEN + 8) as *const [u32; 4]) };
        CIDR_DENY_V6
            .get(Key::new(IpKeyV6::FULL_PREFIX, IpKeyV6::from_words(0, src)))
            .is_some()
    } else {
        false
    };
    if denied {
        count(Verdict::Deny, Reason::CidrDeny);
    }
    denied
}
