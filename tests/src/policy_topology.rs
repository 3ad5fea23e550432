//! Three labelled workloads (frontend, db, other), each in its own namespace and linked by a veth
//! to a node namespace that routes between them: the topology of the policy end-to-end tests.
//! The node side of each veth (`wl-<name>`) is where the TC policy programs attach.

use std::net::IpAddr;

use anyhow::Result;

use crate::{
    netns::{self, Netns, TEST_PREFIX},
    topology::link,
};

/// (name, labels, IPv4, IPv6, node-side interface).
pub const WORKLOADS: [(&str, &str, &str, &str, &str); 3] = [
    (
        "frontend",
        "app: frontend",
        "192.0.2.2",
        "2001:db8:1::2",
        "wl-frontend",
    ),
    ("db", "app: db", "192.0.2.6", "2001:db8:2::2", "wl-db"),
    (
        "other",
        "app: other",
        "192.0.2.10",
        "2001:db8:3::2",
        "wl-other",
    ),
];

/// The interface the balancer's XDP program attaches to in the policy tests (the agent requires
/// one): an unused veth (no dummy devices on the test kernel).
pub const EXTERNAL: &str = "ext0";

/// Adds [`EXTERNAL`] to `node`, up; its peer stays down and unused.
pub fn add_external_interface(node: &Netns) -> Result<()> {
    node.ip_cmd(&format!(
        "link add {EXTERNAL} type veth peer name {EXTERNAL}p"
    ))?;
    node.ip_cmd(&format!("link set {EXTERNAL} up"))
}

pub struct PolicyTopology {
    pub workloads: Vec<Netns>,
    pub node: Netns,
}

impl PolicyTopology {
    pub fn new() -> Result<Self> {
        netns::remove_stale();
        let node = Netns::new(TEST_PREFIX, "pnode")?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let mut workloads = Vec::new();
        for (i, (name, _, v4, v6, iface)) in WORKLOADS.into_iter().enumerate() {
            let ns = Netns::new(TEST_PREFIX, name)?;
            link(&ns, "eth0", &node, iface)?;
            let gw4 = format!("192.0.2.{}", 4 * i + 1);
            let gw6 = format!("2001:db8:{}::1", i + 1);
            ns.ip_cmd(&format!("addr add {v4}/30 dev eth0"))?;
            ns.ip_cmd(&format!("addr add {v6}/64 dev eth0 nodad"))?;
            ns.ip_cmd("link set eth0 up")?;
            ns.ip_cmd(&format!("route add default via {gw4}"))?;
            ns.ip_cmd(&format!("-6 route add default via {gw6}"))?;
            node.ip_cmd(&format!("addr add {gw4}/30 dev {iface}"))?;
            node.ip_cmd(&format!("addr add {gw6}/64 dev {iface} nodad"))?;
            node.ip_cmd(&format!("link set {iface} up"))?;
            workloads.push(ns);
        }
        Ok(Self { workloads, node })
    }

    /// [`PolicyTopology::new`] with [`EXTERNAL`] on the node, for the agent to attach to.
    pub fn with_external_interface() -> Result<Self> {
        let topology = Self::new()?;
        add_external_interface(&topology.node)?;
        Ok(topology)
    }

    /// The namespace of workload `name`.
    pub fn ns(&self, name: &str) -> &Netns {
        let i = WORKLOADS.iter().position(|w| w.0 == name).unwrap();
        &self.workloads[i]
    }

    pub fn addr(name: &str, v6: bool) -> IpAddr {
        let w = WORKLOADS.iter().find(|w| w.0 == name).unwrap();
        (if v6 { w.3 } else { w.2 }).parse().unwrap()
    }

    /// The `policy:` section's namespaces and workloads (with their interfaces), without rules;
    /// the workloads named in `audited` get `enforcement: audit`.
    pub fn workloads_yaml(audited: &[&str]) -> String {
        let mut yaml = String::from("namespaces: [{name: default}]\nworkloads:\n");
        for (name, labels, v4, v6, iface) in WORKLOADS {
            let audit = if audited.contains(&name) {
                ", enforcement: audit"
            } else {
                ""
            };
            yaml += &format!(
                "  - {{name: {name}, namespace: default, labels: {{{labels}}}, addresses: [{v4}, \"{v6}\"], interface: {iface}{audit}}}\n"
            );
        }
        yaml
    }

    /// Interface indexes of the node-side veths.
    pub fn ifindexes(&self) -> Vec<(String, u32)> {
        self.node.run(|| {
            WORKLOADS
                .iter()
                .map(|w| {
                    let name = std::ffi::CString::new(w.4).unwrap();
                    // SAFETY: a valid C string.
                    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
                    assert_ne!(index, 0, "{} has no index", w.4);
                    (w.4.to_string(), index)
                })
                .collect()
        })
    }
}
