//! ICMP and ICMPv6 errors the datapath relates to balanced flows. An error quotes the start of the
//! packet that caused it (its IP header and at least 8 bytes of its L4 header, so the ports); the
//! quote names the flow, and the error is translated and sent to whichever side of the NAT holds that
//! flow's socket.

use crate::service::family;

/// IP protocol number of ICMP (IPv4).
pub const PROTOCOL_ICMP: u8 = 1;
/// Next-header number of ICMPv6.
pub const PROTOCOL_ICMPV6: u8 = 58;

/// Bytes from the start of an ICMP/ICMPv6 header to the quoted packet of an error.
pub const HEADER_LEN: usize = 8;
/// Offset of the checksum in an ICMP/ICMPv6 header.
pub const CHECKSUM_OFFSET: usize = 2;
/// Bytes of the quoted L4 header every error carries (RFC 792; ICMPv6 quotes far more).
pub const QUOTED_L4_LEN: usize = 8;

/// ICMP (IPv4) types.
pub mod v4 {
    pub const ECHO_REPLY: u8 = 0;
    pub const DESTINATION_UNREACHABLE: u8 = 3;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAMETER_PROBLEM: u8 = 12;
    /// Destination unreachable code: fragmentation needed and DF set (path MTU discovery).
    pub const CODE_FRAGMENTATION_NEEDED: u8 = 4;
    /// Destination unreachable code: port unreachable.
    pub const CODE_PORT_UNREACHABLE: u8 = 3;
}

/// ICMPv6 types.
pub mod v6 {
    pub const DESTINATION_UNREACHABLE: u8 = 1;
    pub const PACKET_TOO_BIG: u8 = 2;
    pub const TIME_EXCEEDED: u8 = 3;
    pub const PARAMETER_PROBLEM: u8 = 4;
    pub const ECHO_REQUEST: u8 = 128;
    pub const ECHO_REPLY: u8 = 129;
    /// Destination unreachable code: port unreachable.
    pub const CODE_PORT_UNREACHABLE: u8 = 4;
}

/// Whether `icmp_type` is an error that quotes the packet that caused it: destination unreachable
/// (including fragmentation needed), time exceeded, parameter problem, and ICMPv6 packet too big.
/// Everything else (echo, router and neighbour discovery, redirects...) is not about a flow.
#[inline(always)]
pub fn is_error(ip_family: u8, icmp_type: u8) -> bool {
    if ip_family == family::IPV4 {
        matches!(
            icmp_type,
            v4::DESTINATION_UNREACHABLE | v4::TIME_EXCEEDED | v4::PARAMETER_PROBLEM
        )
    } else {
        matches!(
            icmp_type,
            v6::DESTINATION_UNREACHABLE
                | v6::PACKET_TOO_BIG
                | v6::TIME_EXCEEDED
                | v6::PARAMETER_PROBLEM
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_told_from_everything_else() {
        for t in [3, 11, 12] {
            assert!(is_error(family::IPV4, t), "ICMP type {t}");
        }
        for t in [0, 5, 8, 9, 13] {
            assert!(!is_error(family::IPV4, t), "ICMP type {t}");
        }
        for t in [1, 2, 3, 4] {
            assert!(is_error(family::IPV6, t), "ICMPv6 type {t}");
        }
        // Echo, router/neighbour solicitation and advertisement, redirect.
        for t in [128, 129, 133, 134, 135, 136, 137] {
            assert!(!is_error(family::IPV6, t), "ICMPv6 type {t}");
        }
    }
}
