//! The DNAT rewrites of `nat` on an skb: the same fields, with the kernel's checksum helpers
//! instead of `lb_common::checksum`. An skb's TCP/UDP checksum may be `CHECKSUM_PARTIAL` (a
//! segment sent by a local socket through a veth, TSO/GSO): the field then holds only the
//! pseudo-header sum, which the device or GSO completes. `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` updates that
//! sum for an address change and leaves it alone for a port change; for a full checksum it updates
//! the field (and `skb->csum` under `CHECKSUM_COMPLETE`). An incremental update done by hand would
//! corrupt partial checksums.
//!
//! Offsets, not packet pointers: every helper here may move the skb's data, which invalidates
//! pointers taken before it.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{
    protocol,
    service::{family, Addr},
};

use super::Chosen;
use crate::packet::{
    header::{IPV4_CHECK, IPV4_DST, IPV4_SRC, IPV6_DST, IPV6_SRC, TCP_CHECK, UDP_CHECK},
    Flow,
};

/// Where `flow`'s headers start, as offsets from the frame's start.
#[derive(Clone, Copy)]
pub struct Offsets {
    // 16 bits are plenty for header offsets, and keep `lb_tc`'s frame small (see
    // `tc::to_backend`).
    l3: u16,
    l4: u16,
}

impl Offsets {
    /// Taken by the entry point that parsed `flow`, before any helper call: the packet pointers
    /// in `flow` are valid only until then, and only in that BPF function (a callee reading them
    /// from its caller's frame sees plain numbers, which the verifier does not let it add to the
    /// packet's start).
    #[inline(always)]
    pub fn of(ctx: &TcContext, flow: &Flow) -> Self {
        let start = ctx.data();
        Self {
            l3: (flow.l3 - start) as u16,
            l4: (flow.l4 - start) as u16,
        }
    }
}

impl Offsets {
    /// Start of the IP header.
    #[inline(always)]
    pub fn l3(&self) -> usize {
        self.l3 as usize
    }

    /// Start of the TCP/UDP header.
    #[inline(always)]
    pub fn l4(&self) -> usize {
        self.l4 as usize
    }
}

/// DNAT: the destination becomes the backend `chosen` names, and its port. Returns the verdict
/// (`TC_ACT_OK`, or a counted drop if a helper refused).
// A BPF function of its own, called from the entry points: its stack does not add to
// `to_backend`'s.
#[inline(never)]
pub fn to_backend(ctx: &TcContext, flow: &Flow, at: &Offsets, chosen: &Chosen) -> i32 {
    let key = &flow.key;
    super::verdict(rewrite(
        ctx,
        flow,
        *at,
        &key.dst,
        &chosen.backend,
        key.dst_port,
        chosen.port,
        false,
    ))
}

/// Rewrites one address (source or destination) and its port. `Err` if a helper refused (the
/// packet is then partly rewritten: the caller drops it).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn rewrite(
    ctx: &TcContext,
    flow: &Flow,
    at: Offsets,
    old: &Addr,
    new: &Addr,
    old_port: u16,
    new_port: u16,
    source: bool,
) -> Result<(), i64> {
    let udp = flow.key.protocol == protocol::UDP;
    let l4_check = at.l4() + if udp { UDP_CHECK } else { TCP_CHECK };
    // UDP over IPv4 may carry no checksum (0): MARK_MANGLED_0 leaves it at 0 and never writes a
    // computed 0 (it becomes 0xffff).
    let l4_flags = (if udp { BPF_F_MARK_MANGLED_0 } else { 0 }) as u64;
    if flow.key.family == family::IPV4 {
        let field = at.l3() + if source { IPV4_SRC } else { IPV4_DST };
        let (old, new) = (old.0[0] as u64, new.0[0] as u64);
        ctx.l4_csum_replace(l4_check, old, new, l4_flags | BPF_F_PSEUDO_HDR as u64 | 4)?;
        ctx.l3_csum_replace(at.l3() + IPV4_CHECK, old, new, 4)?;
        ctx.store(field, &(new as u32), 0)?;
    } else {
        let field = at.l3() + if source { IPV6_SRC } else { IPV6_DST };
        for i in 0..4 {
            let (old, new) = (old.0[i] as u64, new.0[i] as u64);
            ctx.l4_csum_replace(l4_check, old, new, l4_flags | BPF_F_PSEUDO_HDR as u64 | 4)?;
        }
        ctx.store(field, new, 0)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(l4_check, old_port as u64, new_port as u64, l4_flags | 2)?;
        ctx.store(at.l4() + if source { 0 } else { 2 }, &new_port, 0)?;
    }
    Ok(())
}
