//! Service, backend and Maglev map entries. Addresses are 16 bytes for both families (IPv4 in the
//! first 4 bytes, the rest zero) and, like ports, in network byte order as they appear in a packet.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Capacity of the datapath, in one place so an operator reads it at a glance.
pub mod limits {
    /// Entries in the `SERVICES` map (distinct (VIP, port, protocol) triples) as compiled in: the
    /// default of `--max-services`, which sizes it and the other maps indexed by service id at load.
    pub const DEFAULT_SERVICES: u32 = 16384;
    /// The most services `--max-services` accepts (ids are 32-bit; this bounds the memory a typo
    /// could ask for: two Maglev table slots and a per-CPU statistics entry per service).
    pub const SERVICES_LIMIT: u32 = 65_536;
    /// Backends one service may have.
    pub const MAX_BACKENDS_PER_SERVICE: u32 = 256;
    /// Entries in the `BACKENDS` array as compiled in: backends of all services together (ids
    /// `1..DEFAULT_BACKENDS`; id 0 is never used, so a zeroed slot means "no backend"). The default
    /// of `--max-backends` (plus one), which sizes it at load.
    pub const DEFAULT_BACKENDS: u32 = 131_072;
    /// `BACKENDS` entries `--max-backends` may ask for at most (ids `1..BACKENDS_LIMIT`).
    pub const BACKENDS_LIMIT: u32 = 1 << 20;
    /// Slots of the `MAGLEV_TABLES` array of maps as compiled in: two per service, one live, one
    /// being rebuilt.
    pub const MAGLEV_TABLE_SLOTS: u32 = 2 * DEFAULT_SERVICES;
    /// Default entries of each of the `CONNTRACK_V4`, `CONNTRACK_V6` and `NAT_REPLY` LRU maps
    /// (configurable at load time).
    pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;
}

/// Address family tags used in keys.
pub mod family {
    pub const IPV4: u8 = 4;
    pub const IPV6: u8 = 6;
}

/// An IPv4 or IPv6 address as 16 network-order bytes, read as four native `u32` words.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr(pub [u32; 4]);

impl Addr {
    pub const fn from_v4_word(word: u32) -> Self {
        Self([word, 0, 0, 0])
    }

    pub fn from_ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::from_v4_word(u32::from_ne_bytes(v4.octets())),
            IpAddr::V6(v6) => {
                let o = v6.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                Self([w(0), w(4), w(8), w(12)])
            }
        }
    }

    pub fn to_ip(self, family: u8) -> IpAddr {
        let b = |w: u32| w.to_ne_bytes();
        if family == family::IPV4 {
            IpAddr::V4(Ipv4Addr::from(b(self.0[0])))
        } else {
            let mut o = [0u8; 16];
            for (i, w) in self.0.iter().enumerate() {
                o[4 * i..4 * i + 4].copy_from_slice(&b(*w));
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
    }
}

pub fn family_of(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        family::IPV4
    } else {
        family::IPV6
    }
}

/// Key of the `SERVICES` map. `port` 0 is the "all ports" entry of a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: Addr,
    pub port: u16,
    pub protocol: u8,
    pub family: u8,
}

impl ServiceKey {
    pub fn new(vip: IpAddr, port: u16, protocol: u8) -> Self {
        Self {
            addr: Addr::from_ip(vip),
            port: port.to_be(),
            protocol,
            family: family_of(vip),
        }
    }

    pub fn vip(&self) -> IpAddr {
        self.addr.to_ip(self.family)
    }

    pub fn port_host(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// Forwarding modes (the `mode` field of [`ServiceInfo`]).
pub mod mode {
    /// Destination NAT: client address kept, replies translated back by the node.
    pub const DNAT: u8 = 0;
    /// Source and destination NAT (full NAT).
    pub const SNAT: u8 = 1;
    /// Direct server return by MAC rewrite on a shared L2 segment.
    pub const DSR_L2: u8 = 2;
    /// Direct server return through IP-in-IP / IPv6-in-IPv6 encapsulation.
    pub const DSR_IPIP: u8 = 3;
}

/// Service flags (the `flags` field of [`ServiceInfo`]).
pub mod service_flags {
    /// Hash the source address only (session affinity) instead of the 5-tuple.
    pub const HASH_SOURCE_IP: u8 = 1 << 0;
}

/// Value of the `SERVICES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Index of the service in the per-service statistics; unique, assigned by userspace.
    pub id: u32,
    /// Index in `MAGLEV_TABLES` of the live lookup table (`2 * id` or `2 * id + 1`).
    pub table_slot: u32,
    /// Entries in that table (a prime); 0 = no backend can take new flows.
    pub table_size: u32,
    pub mode: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// Entry of the `SERVICE_SLOTS` array, indexed by service id: the service's `SERVICES` key and
/// value, so that a tracked flow finds its service from the id in its conntrack entry (an array
/// read) instead of a hash lookup. All zero when the id is free.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceSlot {
    pub key: ServiceKey,
    pub info: ServiceInfo,
}

/// Flags of a [`Backend`].
pub mod backend_flags {
    /// The slot holds a backend (removed backends are zeroed, so conntrack entries that still
    /// name them pick a new backend).
    pub const ACTIVE: u8 = 1 << 0;
    /// New DNAT flows to this backend write a `NAT_REPLY` entry: its replies cannot be told apart
    /// by its address and port alone (see `conntrack::BackendReply`).
    pub const SHARED_REPLIES: u8 = 1 << 1;
    /// No service names the backend any more: it is kept only for the tracked flows that still
    /// use it, and goes when they end (the agent's `retired` module). For readers of the maps
    /// (`lbctl backends`); the datapath treats it as any active backend.
    pub const RETIRED: u8 = 1 << 2;
}

/// Entry of the `BACKENDS` array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: Addr,
    /// 0 = keep the client's destination port.
    pub port: u16,
    pub family: u8,
    pub flags: u8,
}

impl Backend {
    pub fn new(addr: IpAddr, port: u16) -> Self {
        Self {
            addr: Addr::from_ip(addr),
            port: port.to_be(),
            family: family_of(addr),
            flags: backend_flags::ACTIVE,
        }
    }

    pub fn ip(&self) -> IpAddr {
        self.addr.to_ip(self.family)
    }

    pub fn port_host(&self) -> u16 {
        u16::from_be(self.port)
    }

    /// The port a flow to `vip_port` reaches this backend on (both in network byte order): its
    /// own, or with port 0 the one the client chose.
    #[inline(always)]
    pub fn port_for(&self, vip_port: u16) -> u16 {
        if self.port == 0 {
            vip_port
        } else {
            self.port
        }
    }

    pub fn is_active(&self) -> bool {
        self.flags & backend_flags::ACTIVE != 0
    }

    pub fn has_shared_replies(&self) -> bool {
        self.flags & backend_flags::SHARED_REPLIES != 0
    }

    pub fn is_retired(&self) -> bool {
        self.flags & backend_flags::RETIRED != 0
    }
}

/// Per-service and per-backend traffic, summed over CPUs by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    pub packets: u64,
    pub bytes: u64,
    /// Flows that chose a backend through the Maglev table (conntrack misses).
    pub new_flows: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, made of integers, with explicit padding fields.
    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceInfo {}
    unsafe impl aya::Pod for ServiceSlot {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for TrafficStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hold_network_byte_order() {
        let key = ServiceKey::new("198.51.100.10".parse().unwrap(), 80, 6);
        assert_eq!(key.addr.0[0].to_ne_bytes(), [198, 51, 100, 10]);
        assert_eq!(&key.addr.0[1..], &[0, 0, 0]);
        assert_eq!(key.port.to_ne_bytes(), [0, 80]);
        assert_eq!(key.vip(), "198.51.100.10".parse::<IpAddr>().unwrap());
        assert_eq!(key.port_host(), 80);
    }

    #[test]
    fn ipv6_round_trips() {
        let ip: IpAddr = "2001:db8:100::10".parse().unwrap();
        let key = ServiceKey::new(ip, 443, 17);
        assert_eq!(key.family, family::IPV6);
        assert_eq!(key.addr.0[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(key.vip(), ip);
        assert_eq!(Backend::new(ip, 0).ip(), ip);
    }

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<ServiceKey>(), 20);
        assert_eq!(core::mem::size_of::<ServiceInfo>(), 16);
        assert_eq!(core::mem::size_of::<ServiceSlot>(), 36);
        assert_eq!(core::mem::size_of::<Backend>(), 20);
        assert_eq!(core::mem::size_of::<TrafficStats>(), 24);
    }
}
