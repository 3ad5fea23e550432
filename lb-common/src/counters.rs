//! Datapath counters: one per-CPU `u64` slot per reason, so every pass, forward and drop is named.
//! Userspace sums the per-CPU values; the index of each slot is the enum discriminant.

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $variant:ident = $index:literal => $name:literal,)*) => {
        /// What the datapath did with a packet, and why.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[doc = $doc])* $variant = $index,)*
        }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];

            /// Stable snake_case name, used in logs, metrics and the CLI.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => $name,)*
                }
            }
        }
    };
}

counters! {
    /// Neither IPv4 nor IPv6 (ARP, LLDP, ...): passed to the stack.
    PassNotIp = 0 => "pass_not_ip",
    /// IPv4 with options: passed untouched rather than mis-balanced.
    PassIpv4Options = 1 => "pass_ipv4_options",
    /// An IPv4 fragment: passed untouched (fragment tracking comes later).
    PassFragment = 2 => "pass_fragment",
    /// IPv6 with extension headers before TCP/UDP: passed untouched.
    PassIpv6ExtensionHeader = 3 => "pass_ipv6_extension_header",
    /// Neither TCP nor UDP: passed.
    PassNotTcpUdp = 4 => "pass_not_tcp_udp",
    /// TCP/UDP that is neither to a VIP nor a tracked reply: passed.
    PassNotService = 5 => "pass_not_service",
    /// A new flow to a VIP: backend chosen by Maglev, conntrack entry created.
    ForwardNewFlow = 6 => "forward_new_flow",
    /// A packet of a tracked flow, sent to its backend.
    ForwardConntrackHit = 7 => "forward_conntrack_hit",
    /// A backend's reply rewritten back to the VIP (reverse NAT).
    ReplyTranslated = 8 => "reply_translated",
    /// Sent to a VIP whose Maglev table is empty (no backend, or all draining/unhealthy).
    DropNoBackend = 9 => "drop_no_backend",
    /// Headers shorter than they claim: dropped.
    DropMalformed = 10 => "drop_malformed",
    /// A TCP packet other than SYN without a conntrack entry: the entry was evicted (conntrack
    /// pressure) or the flow predates the datapath. It is balanced by the Maglev table, which picks
    /// the same backend while the backend set is unchanged.
    ConntrackMidflowMiss = 11 => "conntrack_midflow_miss",
    /// A tracked flow whose backend was removed: a new backend was chosen.
    ConntrackBackendGone = 12 => "conntrack_backend_gone",
    /// The Maglev table slot or backend could not be read (a table being replaced): dropped.
    DropTableMiss = 13 => "drop_table_miss",
}

impl Counter {
    /// Number of slots in the counters map.
    pub const COUNT: u32 = Self::ALL.len() as u32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discriminants_are_dense_indexes() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{}", c.name());
        }
    }
}
