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
    /// IPv4 with a source-route option (LSRR/SSRR: the destination is not the final one), options
    /// that do not parse, or more options than the datapath walks: passed untouched, for the stack
    /// to route or reject. Other options are carried through the rewrite untouched.
    PassIpv4Options = 1 => "pass_ipv4_options",
    /// A fragment that is not balanced: a later fragment (IPv4 or IPv6) whose datagram's first
    /// fragment was not balanced (not VIP traffic, or not seen yet, lost, or its entry evicted or
    /// expired), or a fragment of a protocol other than TCP/UDP: passed untouched.
    PassFragment = 2 => "pass_fragment",
    /// IPv6 with an extension header the datapath does not walk (AH, mobility, HIP, shim6, a
    /// routing header with segments left, or more than 4 headers before TCP/UDP): passed untouched.
    /// Hop-by-hop, destination options, fragment and finished routing headers are walked.
    PassIpv6ExtensionHeader = 3 => "pass_ipv6_extension_header",
    /// Neither TCP nor UDP, nor an ICMP error (ICMP echo, neighbour discovery, ESP, ...): passed.
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
    /// Headers shorter than they claim: dropped. Also a SNAT request a helper refused to turn
    /// into its "time exceeded" or "destination unreachable" answer halfway (the packet already
    /// cut).
    DropMalformed = 10 => "drop_malformed",
    /// A TCP packet other than SYN without a conntrack entry: the entry was evicted (conntrack
    /// pressure) or the flow predates the datapath. It is balanced by the Maglev table, which picks
    /// the same backend while the backend set is unchanged.
    ConntrackMidflowMiss = 11 => "conntrack_midflow_miss",
    /// A tracked flow whose backend was removed: a new backend was chosen.
    ConntrackBackendGone = 12 => "conntrack_backend_gone",
    /// The Maglev table slot or backend could not be read (a table being replaced): dropped.
    DropTableMiss = 13 => "drop_table_miss",
    /// A backend's reply to a SNAT flow: node address and port → client, backend → VIP.
    SnatReplyTranslated = 14 => "snat_reply_translated",
    /// A new SNAT flow found every candidate source port taken (`modes::snat::ALLOCATION_ATTEMPTS`
    /// tries): dropped. Widen `node.snat_ports` or add SNAT addresses.
    DropSnatPortsExhausted = 15 => "drop_snat_ports_exhausted",
    /// A new SNAT flow took over a port whose reply entry belonged to a flow that has ended.
    SnatPortReclaimed = 16 => "snat_port_reclaimed",
    /// A SNAT or DSR-IPIP service without a source address in `SERVICE_MODES`: dropped.
    DropModeUnconfigured = 17 => "drop_mode_unconfigured",
    /// Sent out of another interface (`bpf_redirect`) after a `bpf_fib_lookup` (SNAT, DSR; with
    /// `lb_tc` DNAT too: every packet it forwards when the FIB knows the next hop).
    XmitRedirect = 18 => "xmit_redirect",
    /// Sent back out of the interface it came in on (`XDP_TX`; `lb_tc`: `bpf_redirect` to it) after
    /// a `bpf_fib_lookup`.
    XmitTx = 19 => "xmit_tx",
    /// SNAT, IPIP or `lb_tc` packet whose next hop has no neighbour entry yet: the finished packet
    /// goes to the kernel, which resolves the neighbour and sends it (later packets take the fast
    /// path).
    PassFibNoNeigh = 20 => "pass_fib_no_neigh",
    /// SNAT, IPIP or `lb_tc` packet the fast path cannot send (no route, forwarding disabled, needs
    /// fragmenting, TTL expiring): the finished packet goes to the kernel, which routes it or
    /// answers with ICMP. A SNAT request the datapath can quote is answered by it instead when too
    /// big, expiring or unreachable (`icmp_too_big_sent`, `icmp_time_exceeded_sent`,
    /// `icmp_unreachable_sent`).
    PassFibFailed = 21 => "pass_fib_failed",
    /// DSR L2: the backend has no neighbour entry on the node. Dropped (the unchanged packet to the
    /// VIP must not reach the node's stack); the agent resolves backends' neighbours.
    DropDsrNoNeigh = 22 => "drop_dsr_no_neigh",
    /// DSR L2: no route to the backend (unreachable, blackhole, forwarding disabled): dropped.
    DropDsrNoRoute = 23 => "drop_dsr_no_route",
    /// DSR L2: the backend is behind a gateway, not on a segment shared with the node: dropped.
    DropDsrNotOnLink = 24 => "drop_dsr_not_on_link",
    /// DSR IPIP: the encapsulated packet exceeds the egress MTU and cannot be answered (`lb_xdp`:
    /// IPv4 without "don't fragment", a later fragment or an ICMP error; `lb_tc`: any): dropped.
    /// Give the links to backends 20 (IPv4) / 40 (IPv6) bytes of MTU headroom, or clamp the TCP
    /// MSS.
    DropEncapTooBig = 25 => "drop_encap_too_big",
    /// DSR IPIP: no headroom for the outer header (`bpf_xdp_adjust_head` failed; `lb_tc`:
    /// `bpf_skb_adjust_room` failed, e.g. on an skb already encapsulated): dropped.
    DropEncapFailed = 26 => "drop_encap_failed",
    /// `lb_decap`: outer IPv4 header removed.
    DecapOuterIpv4 = 27 => "decap_outer_ipv4",
    /// `lb_decap`: outer IPv6 header removed.
    DecapOuterIpv6 = 28 => "decap_outer_ipv6",
    /// `lb_decap`: not an IP-in-IP packet: passed untouched.
    DecapPassNotEncapsulated = 29 => "decap_pass_not_encapsulated",
    /// `lb_decap`: encapsulated, but the outer source is not a configured balancer or the outer
    /// destination not a configured local address: dropped.
    DecapDropUnknownEndpoint = 30 => "decap_drop_unknown_endpoint",
    /// An ICMP/ICMPv6 error about a balanced flow's reply (quoting VIP → client, sent to the VIP,
    /// e.g. fragmentation needed from a router on the client's path): sent to the flow's backend
    /// with the quote translated back to the packet the backend sent (DSR: as it is).
    IcmpErrorToBackend = 31 => "icmp_error_to_backend",
    /// An ICMP/ICMPv6 error about a client's packet on its way to a backend (quoting client →
    /// backend, or node → backend for SNAT, e.g. port unreachable from the backend): translated to
    /// the VIP's view and sent on to the client.
    IcmpErrorToClient = 32 => "icmp_error_to_client",
    /// An ICMP/ICMPv6 error whose quote is not a tracked flow (other traffic, a flow that has
    /// ended, a quote without ports, an encapsulated DSR packet): passed untouched.
    PassIcmpErrorUntracked = 33 => "pass_icmp_error_untracked",
    /// The first fragment of a balanced datagram (also counted by its forward or reply reason):
    /// its addresses are recorded for the datagram's later fragments.
    FragmentTracked = 34 => "fragment_tracked",
    /// A later fragment of a tracked datagram, given the addresses of its first fragment.
    ForwardFragment = 35 => "forward_fragment",
    /// `lb_tc_request` or `lb_tc_reply` (the workload-veth split, DNAT only) got a request of an
    /// SNAT or DSR service, or the reply of an SNAT flow: dropped. Such clients need an
    /// interface attached with `--iface` (`lb_tc` and `lb_xdp` forward every mode).
    DropTcModeUnsupported = 36 => "drop_tc_mode_unsupported",
    /// `lb_xdp`: a DSR IPIP packet too big for the link to its backend once encapsulated (IPv4
    /// with "don't fragment"): answered to the client with "fragmentation needed" / "packet too
    /// big" announcing the MTU that fits, instead of dropped.
    IcmpTooBigSent = 37 => "icmp_too_big_sent",
    /// A flow event (`lb_common::flow_events`, with `--flow-events`) found the `FLOW_EVENTS` ring
    /// buffer full: not reported (the packet went on as decided). The agent reads the ring buffer
    /// as soon as it has data; losses mean more new flows or drops than it keeps up with.
    FlowEventsLost = 38 => "flow_events_lost",
    /// `lb_tc_egress`: an ICMP/ICMPv6 error the node's own stack sent a client about its DNAT
    /// request, translated (quoting client → backend, e.g. "fragmentation needed" / "packet too
    /// big" for the link towards the backend): the quote now names the VIP the client's socket
    /// is connected to, so that its path MTU discovery works.
    IcmpNodeErrorToClient = 39 => "icmp_node_error_to_client",
    /// A SNAT request whose TTL / hop limit would expire at the node (1 or 0): answered to the
    /// client from the VIP with "time exceeded" (ICMPv6 "hop limit exceeded"), quoting the
    /// request as it came, instead of translated for the stack, whose answer would go to the SNAT
    /// address. Requests that cannot be quoted (IPv4 options; `lb_tc`: IPv6 extension headers, or
    /// less than 20 bytes after the IP header) are translated for the stack as before
    /// (`pass_fib_failed`).
    IcmpTimeExceededSent = 40 => "icmp_time_exceeded_sent",
    /// A SNAT request whose backend the FIB says cannot be reached (an unreachable, blackhole or
    /// prohibit route): answered to the client from the VIP with "destination unreachable", host
    /// unreachable (ICMPv6: address unreachable), quoting the request as it came, instead of
    /// translated for the stack, whose answer would go to the SNAT address (a blackhole's: none).
    /// Requests that cannot be quoted as for `icmp_time_exceeded_sent` go to the stack as before.
    IcmpUnreachableSent = 41 => "icmp_unreachable_sent",
}

impl Counter {
    /// Number of counters.
    pub const COUNT: u32 = Self::ALL.len() as u32;
    /// Slots of the `COUNTERS` map: more than there are counters, so that adding one keeps the
    /// map's definition and an upgraded agent adopts the pinned map (a hitless upgrade) instead of
    /// refusing it as an incompatible layout.
    pub const SLOTS: u32 = 64;
}

const _: () = assert!(
    Counter::COUNT <= Counter::SLOTS,
    "grow Counter::SLOTS (a layout change)"
);

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
