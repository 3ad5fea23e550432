//! Datapath counters: one per-CPU `u64` slot per reason, so every pass, forward and drop is named.
//! Userspace sums the per-CPU values; the index of each slot is the enum discriminant.

/// What the datapath did with a packet, and why. Keep in sync with [`Counter::ALL`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Not IPv4 (the skeleton datapath balances IPv4 only): passed to the stack.
    PassNotIpv4 = 0,
    /// IPv4 with options, or a fragment: passed untouched, never mis-balanced.
    PassIpv4Unsupported = 1,
    /// Neither TCP nor UDP: passed.
    PassNotTcpUdp = 2,
    /// TCP/UDP that is neither to a VIP nor a backend reply: passed.
    PassNotService = 3,
    /// Sent to a VIP and rewritten towards a backend.
    ForwardToBackend = 4,
    /// A backend's reply rewritten back to the VIP (reverse NAT).
    ReplyFromBackend = 5,
    /// Sent to a VIP that has no backend: dropped.
    DropNoBackend = 6,
    /// Headers shorter than they claim: dropped.
    DropMalformed = 7,
}

impl Counter {
    pub const ALL: [Counter; 8] = [
        Counter::PassNotIpv4,
        Counter::PassIpv4Unsupported,
        Counter::PassNotTcpUdp,
        Counter::PassNotService,
        Counter::ForwardToBackend,
        Counter::ReplyFromBackend,
        Counter::DropNoBackend,
        Counter::DropMalformed,
    ];
    /// Number of slots in the counters map.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Stable snake_case name, used in logs, metrics and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::PassNotIpv4 => "pass_not_ipv4",
            Counter::PassIpv4Unsupported => "pass_ipv4_unsupported",
            Counter::PassNotTcpUdp => "pass_not_tcp_udp",
            Counter::PassNotService => "pass_not_service",
            Counter::ForwardToBackend => "forward_to_backend",
            Counter::ReplyFromBackend => "reply_from_backend",
            Counter::DropNoBackend => "drop_no_backend",
            Counter::DropMalformed => "drop_malformed",
        }
    }
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
