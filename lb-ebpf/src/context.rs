//! What the shared parser needs of a program's context: where the packet's directly readable bytes
//! start and end. `lb_xdp` (an XDP buffer) and `lb_tc` (an skb's linear part) share `packet::parse`
//! through it; every use is monomorphised, so `lb_xdp` runs the same instructions as before.

use aya_ebpf::programs::{TcContext, XdpContext};

use crate::packet::Extent;

pub trait PacketContext {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Start and end read with volatile loads, for separate BPF functions (see [`Extent`]).
    fn extent(&self) -> Extent;
}

impl PacketContext for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn extent(&self) -> Extent {
        // SAFETY: `self.ctx` is the program's context, valid while it runs.
        unsafe {
            Extent {
                start: core::ptr::read_volatile(&(*self.ctx).data) as usize,
                end: core::ptr::read_volatile(&(*self.ctx).data_end) as usize,
            }
        }
    }
}

impl PacketContext for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn extent(&self) -> Extent {
        // SAFETY: `self.skb.skb` is the program's context, valid while it runs.
        unsafe {
            Extent {
                start: core::ptr::read_volatile(&(*self.skb.skb).data) as usize,
                end: core::ptr::read_volatile(&(*self.skb.skb).data_end) as usize,
            }
        }
    }
}
