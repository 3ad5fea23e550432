//! Service, backend and reverse-NAT map entries. All addresses and ports are network byte order.

use core::net::Ipv4Addr;

/// Capacity of the datapath, in one place so an operator reads it at a glance.
pub mod limits {
    /// Entries in the `SERVICES` map: distinct (VIP, port, protocol) triples.
    pub const MAX_SERVICES: u32 = 4096;
    /// Backends one service may have.
    pub const MAX_BACKENDS_PER_SERVICE: u32 = 256;
    /// Entries in the `BACKENDS` map (slots of all services together).
    pub const MAX_BACKEND_SLOTS: u32 = 65536;
}

/// Key of the `SERVICES` map: a virtual IP, port and protocol as they appear in a packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip: u32,
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

impl ServiceKey {
    pub fn new(vip: Ipv4Addr, port: u16, protocol: u8) -> Self {
        Self {
            vip: u32::from_ne_bytes(vip.octets()),
            port: port.to_be(),
            protocol,
            _pad: 0,
        }
    }

    pub fn vip_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.vip.to_ne_bytes())
    }

    pub fn port_host(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// Value of the `SERVICES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Index used in `BACKENDS` keys; assigned by userspace, unique per service.
    pub id: u32,
    /// Number of filled slots `0..backend_count` in `BACKENDS`; 0 means drop (no backend).
    pub backend_count: u32,
}

/// Key of the `BACKENDS` map: slot `slot` of service `service_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSlotKey {
    pub service_id: u32,
    pub slot: u32,
}

/// Value of the `BACKENDS` map: where a flow is sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

impl Backend {
    pub fn new(addr: Ipv4Addr, port: u16) -> Self {
        Self {
            addr: u32::from_ne_bytes(addr.octets()),
            port: port.to_be(),
            _pad: 0,
        }
    }

    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr.to_ne_bytes())
    }

    pub fn port_host(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// Key of the `REVERSE_NAT` map: a backend's source address, port and protocol on the reply path.
/// The value is the [`ServiceKey`] whose VIP and port replace them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReverseNatKey {
    pub backend_addr: u32,
    pub backend_port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

impl ReverseNatKey {
    pub fn new(backend: &Backend, protocol: u8) -> Self {
        Self {
            backend_addr: backend.addr,
            backend_port: backend.port,
            protocol,
            _pad: 0,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, made of integers, with explicit padding fields.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceInfo {}
    unsafe impl aya::Pod for BackendSlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for ReverseNatKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hold_network_byte_order() {
        let key = ServiceKey::new(Ipv4Addr::new(198, 51, 100, 10), 80, 6);
        // In memory the address and port bytes read exactly as on the wire.
        assert_eq!(key.vip.to_ne_bytes(), [198, 51, 100, 10]);
        assert_eq!(key.port.to_ne_bytes(), [0, 80]);
        assert_eq!(key.vip_addr(), Ipv4Addr::new(198, 51, 100, 10));
        assert_eq!(key.port_host(), 80);
    }

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<ServiceKey>(), 8);
        assert_eq!(core::mem::size_of::<ServiceInfo>(), 8);
        assert_eq!(core::mem::size_of::<BackendSlotKey>(), 8);
        assert_eq!(core::mem::size_of::<Backend>(), 8);
        assert_eq!(core::mem::size_of::<ReverseNatKey>(), 8);
    }
}
