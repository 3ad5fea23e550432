//! The test network: one client, one balancer node, N backends, each in its own namespace.
//!
//! ```text
//!  client ns              balancer ns                         backend ns i (1..=N)
//!  eth0 192.0.2.2/24 ──── to-client 192.0.2.1/24
//!       2001:db8:2::2/64            2001:db8:2::1/64
//!                         to-b<i> 203.0.113.<4i+1>/30 ─────── eth0 203.0.113.<4i+2>/30
//!                                 2001:db8:203:<i>::1/64              2001:db8:203:<i>::2/64
//! ```
//! The client's default route and every backend's default route go through the balancer, which
//! forwards between them. VIPs (198.51.100.0/24) are routed to the balancer by the client and answered
//! by nobody but the datapath.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{ensure, Context, Result};

use crate::netns::{self, Netns};

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const BALANCER_CLIENT_SIDE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The first VIP; tests may use any address in 198.51.100.0/24.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
pub const BALANCER_CLIENT_SIDE_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
/// The first IPv6 VIP; tests may use any address in 2001:db8:100::/64.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10);
/// Interface of the balancer that faces the client.
pub const BALANCER_CLIENT_IFACE: &str = "to-client";
/// Backend ports of [`Topology::dual_stack_services`].
pub const SERVICE_TCP_PORT: u16 = 8080;
pub const SERVICE_UDP_PORT: u16 = 5353;
/// Most backends a topology supports (their /30s must fit in 203.0.113.0/24).
pub const MAX_BACKENDS: usize = 62;

pub struct Backend {
    pub ns: Netns,
    pub addr: Ipv4Addr,
    pub addr6: Ipv6Addr,
    /// The balancer's interface towards this backend.
    pub balancer_iface: String,
}

pub struct Topology {
    pub client: Netns,
    pub balancer: Netns,
    pub backends: Vec<Backend>,
}

/// Address of backend `i` (1-based) and of the balancer on that link.
pub fn backend_addrs(i: usize) -> (Ipv4Addr, Ipv4Addr) {
    let base = (4 * i) as u8;
    (
        Ipv4Addr::new(203, 0, 113, base + 2),
        Ipv4Addr::new(203, 0, 113, base + 1),
    )
}

/// IPv6 address of backend `i` (1-based) and of the balancer on that link.
pub fn backend_addrs6(i: usize) -> (Ipv6Addr, Ipv6Addr) {
    let net = |host| Ipv6Addr::new(0x2001, 0xdb8, 0x203, i as u16, 0, 0, 0, host);
    (net(2), net(1))
}

impl Topology {
    /// Builds the network with `backends` backends. Namespaces use `prefix` (see [`netns`]) and are
    /// removed when the topology is dropped.
    pub fn new(prefix: &str, backends: usize) -> Result<Self> {
        ensure!(
            (1..=MAX_BACKENDS).contains(&backends),
            "1..={MAX_BACKENDS} backends"
        );
        netns::remove_stale();
        let client = Netns::new(prefix, "client")?;
        let balancer = Netns::new(prefix, "lb")?;
        balancer.sysctl("net.ipv4.ip_forward", "1")?;
        balancer.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        balancer.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        balancer.sysctl("net.ipv6.conf.all.forwarding", "1")?;

        link(&client, "eth0", &balancer, BALANCER_CLIENT_IFACE)?;
        client.ip_cmd(&format!("addr add {CLIENT_ADDR}/24 dev eth0"))?;
        client.ip_cmd(&format!("addr add {CLIENT_ADDR6}/64 dev eth0 nodad"))?;
        client.ip_cmd("link set eth0 up")?;
        client.ip_cmd(&format!(
            "route add default via {BALANCER_CLIENT_SIDE_ADDR}"
        ))?;
        client.ip_cmd(&format!(
            "-6 route add default via {BALANCER_CLIENT_SIDE_ADDR6}"
        ))?;
        let iface = BALANCER_CLIENT_IFACE;
        balancer.ip_cmd(&format!(
            "addr add {BALANCER_CLIENT_SIDE_ADDR}/24 dev {iface}"
        ))?;
        balancer.ip_cmd(&format!(
            "addr add {BALANCER_CLIENT_SIDE_ADDR6}/64 dev {iface} nodad"
        ))?;
        balancer.ip_cmd(&format!("link set {iface} up"))?;
        sender_checksums_in_software(&client)?;

        let mut list = Vec::with_capacity(backends);
        for i in 1..=backends {
            let ns = Netns::new(prefix, &format!("b{i}"))?;
            let ((addr, gateway), (addr6, gateway6)) = (backend_addrs(i), backend_addrs6(i));
            let balancer_iface = format!("to-b{i}");
            link(&ns, "eth0", &balancer, &balancer_iface)?;
            ns.ip_cmd(&format!("addr add {addr}/30 dev eth0"))?;
            ns.ip_cmd(&format!("addr add {addr6}/64 dev eth0 nodad"))?;
            ns.ip_cmd("link set eth0 up")?;
            ns.ip_cmd(&format!("route add default via {gateway}"))?;
            ns.ip_cmd(&format!("-6 route add default via {gateway6}"))?;
            balancer.ip_cmd(&format!("addr add {gateway}/30 dev {balancer_iface}"))?;
            balancer.ip_cmd(&format!(
                "addr add {gateway6}/64 dev {balancer_iface} nodad"
            ))?;
            balancer.ip_cmd(&format!("link set {balancer_iface} up"))?;
            sender_checksums_in_software(&ns)?;
            list.push(Backend {
                ns,
                addr,
                addr6,
                balancer_iface,
            });
        }
        Ok(Self {
            client,
            balancer,
            backends: list,
        })
    }

    /// Agent config: web (TCP 80 → [`SERVICE_TCP_PORT`]) and dns (UDP 53 → [`SERVICE_UDP_PORT`])
    /// on [`VIP`] and [`VIP6`], over the given backends (1-based indexes) of the matching family.
    pub fn dual_stack_services(&self, backends: &[usize]) -> String {
        let mut yaml = String::from("services:\n");
        for (name, vip, port, proto, v6, backend_port) in [
            ("web", IpAddr::from(VIP), 80, "tcp", false, SERVICE_TCP_PORT),
            ("dns", IpAddr::from(VIP), 53, "udp", false, SERVICE_UDP_PORT),
            (
                "web6",
                IpAddr::from(VIP6),
                80,
                "tcp",
                true,
                SERVICE_TCP_PORT,
            ),
            (
                "dns6",
                IpAddr::from(VIP6),
                53,
                "udp",
                true,
                SERVICE_UDP_PORT,
            ),
        ] {
            yaml += &format!(
                "  - name: {name}\n    vip: {vip}\n    port: {port}\n    protocol: {proto}\n    backends:\n"
            );
            for &i in backends {
                let b = &self.backends[i - 1];
                let addr: IpAddr = if v6 { b.addr6.into() } else { b.addr.into() };
                yaml += &format!("      - {{ address: \"{addr}\", port: {backend_port} }}\n");
            }
        }
        yaml
    }

    /// Every balancer interface the datapath must be attached to: the client side (VIP traffic)
    /// and each backend side (replies to translate back).
    pub fn balancer_interfaces(&self) -> Vec<String> {
        std::iter::once(BALANCER_CLIENT_IFACE.to_string())
            .chain(self.backends.iter().map(|b| b.balancer_iface.clone()))
            .collect()
    }

    /// As on veths in production: the client and the backends leave checksums (and segmentation)
    /// to the "hardware" again (the topology makes senders checksum in software, which XDP needs),
    /// and the balancer's interfaces finish them in software on the way out. For the TC datapath,
    /// which must handle partial checksums.
    pub fn offload_checksums_to_the_edges(&self) {
        let ethtool = |ns: &Netns, iface: &str, on_off: &str| {
            let out = ns
                .exec("ethtool", &["-K", iface, "tx", on_off])
                .expect("ethtool");
            assert!(
                out.status.success(),
                "ethtool -K {iface} tx {on_off}: {out:?}"
            );
        };
        ethtool(&self.client, "eth0", "on");
        for b in &self.backends {
            ethtool(&b.ns, "eth0", "on");
        }
        for iface in self.balancer_interfaces() {
            ethtool(&self.balancer, &iface, "off");
        }
    }
}

/// A veth pair with one end in each namespace.
pub fn link(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Result<()> {
    std::process::Command::new("ip")
        .args([
            "link",
            "add",
            a_name,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_name,
            "netns",
            b.name(),
        ])
        .output()
        .context("ip link add")
        .and_then(|o| {
            ensure!(
                o.status.success(),
                "veth {a_name}/{b_name}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            Ok(())
        })
}

/// veth hands packets over with checksums left for "hardware" to finish (CHECKSUM_PARTIAL); XDP sees
/// only the raw bytes and cannot tell. A real NIC delivers complete checksums, so the senders here
/// compute them in software, as a NIC's peer would.
fn sender_checksums_in_software(ns: &Netns) -> Result<()> {
    ns.exec("ethtool", &["-K", "eth0", "tx", "off"]).map(|_| ())
}
