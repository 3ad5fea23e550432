//! The backend side of DSR IPIP: loads `lb_decap` (from the same object as the balancer) and
//! attaches it to a backend's interfaces, so that IP-in-IP / IPv6-in-IPv6 packets from the balancers
//! arrive as the inner packet to the VIP held on the backend's loopback.
//!
//! ```text
//! lb-agent decap --iface eth0 [--balancer 203.0.113.1]... [--local 203.0.113.6]...
//! ```
//! Without `--balancer`, encapsulated packets from any source are accepted; without `--local`, for
//! any destination. Listing both is the safe setting: it keeps anyone else from injecting packets to
//! the VIP through the decapsulator.

use std::net::IpAddr;

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, MapData},
    programs::{xdp::XdpLinkId, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::{
    counters::Counter,
    modes::decap::{role, EndpointKey},
    service::{family, family_of, Addr},
};
use tracing::{info, warn};

use crate::datapath::EBPF_OBJECT;

/// Name of the decapsulation program in the object.
pub const DECAP_PROGRAM: &str = "lb_decap";

/// Maps of the object that `lb_decap` does not use, shrunk to one entry so that a backend does not
/// pay for the balancer's conntrack and statistics.
const UNUSED_MAPS: [&str; 8] = [
    "CONNTRACK_V4",
    "CONNTRACK_V6",
    "NAT_REPLY",
    "BACKEND_REPLY",
    "BACKENDS",
    "SERVICE_STATS",
    "BACKEND_STATS",
    "SERVICE_MODES",
];

/// Which encapsulated packets to accept; an empty list accepts any address in that role.
#[derive(Debug, Clone, Default)]
pub struct DecapOptions {
    /// Outer source addresses: the balancers' node addresses.
    pub balancers: Vec<IpAddr>,
    /// Outer destination addresses: this backend's own addresses.
    pub local: Vec<IpAddr>,
}

/// A loaded decapsulation program. Dropping it detaches it from every interface.
pub struct Decap {
    ebpf: Ebpf,
    attached: Vec<(String, XdpLinkId)>,
}

impl Decap {
    /// Loads the program (the verifier runs here) and fills `DECAP_ENDPOINTS` from `options`.
    pub fn load(options: &DecapOptions) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        for map in UNUSED_MAPS {
            loader.map_max_entries(map, 1);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let program: &mut Xdp = ebpf
            .program_mut(DECAP_PROGRAM)
            .context("lb_decap missing from the object")?
            .try_into()?;
        program
            .load()
            .context("loading the decap program (verifier)")?;
        let mut endpoints: HashMap<&mut MapData, EndpointKey, u8> = HashMap::try_from(
            ebpf.map_mut("DECAP_ENDPOINTS")
                .context("DECAP_ENDPOINTS map")?,
        )?;
        for (addresses, endpoint_role) in [
            (&options.balancers, role::BALANCER),
            (&options.local, role::LOCAL),
        ] {
            let keys: Vec<EndpointKey> = if addresses.is_empty() {
                [family::IPV4, family::IPV6]
                    .into_iter()
                    .map(|f| endpoint_key(Addr::default(), f, endpoint_role))
                    .collect()
            } else {
                addresses
                    .iter()
                    .map(|a| endpoint_key(Addr::from_ip(*a), family_of(*a), endpoint_role))
                    .collect()
            };
            for key in keys {
                endpoints
                    .insert(key, 1, 0)
                    .context("writing DECAP_ENDPOINTS")?;
            }
        }
        Ok(Self {
            ebpf,
            attached: Vec::new(),
        })
    }

    /// The decapsulation program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(DECAP_PROGRAM)
            .expect("checked in load")
            .try_into()
            .expect("checked in load")
    }

    /// Attaches to `interface` (in the calling thread's network namespace): native mode where the
    /// driver supports it, generic mode otherwise.
    pub fn attach(&mut self, interface: &str) -> Result<()> {
        let program = self.program();
        let link = match program.attach(interface, XdpMode::Driver) {
            Ok(link) => link,
            Err(err) => {
                warn!(interface, error = %err, "native XDP unavailable, using generic (skb) mode");
                program
                    .attach(interface, XdpMode::Skb)
                    .with_context(|| format!("attaching lb_decap to {interface}"))?
            }
        };
        info!(interface, "lb_decap attached");
        self.attached.push((interface.to_string(), link));
        Ok(())
    }

    /// Detaches from every interface (also done on drop).
    pub fn detach_all(&mut self) {
        for (interface, link) in std::mem::take(&mut self.attached) {
            if let Err(err) = self.program().detach(link) {
                warn!(interface, error = %err, "lb_decap detach failed");
            }
        }
    }

    /// Sum over CPUs of every counter (only the decap reasons move here).
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        crate::datapath::read_counters(&self.ebpf)
    }
}

/// `lb-agent decap`: loads the program, attaches it to `interfaces` and keeps it there until SIGINT
/// or SIGTERM, then detaches and logs its counters.
pub async fn run(interfaces: &[String], options: &DecapOptions) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut decap = Decap::load(options)?;
    for interface in interfaces {
        decap.attach(interface)?;
    }
    info!(interfaces = ?interfaces, balancers = ?options.balancers, local = ?options.local, "decap ready");
    tokio::select! {
        _ = sigint.recv() => info!("SIGINT received"),
        _ = sigterm.recv() => info!("SIGTERM received"),
    }
    decap.detach_all();
    let counters: Vec<String> = decap
        .counters()?
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(c, n)| format!("{}={n}", c.name()))
        .collect();
    info!(counters = %counters.join(" "), "decap stopped");
    Ok(())
}

fn endpoint_key(addr: Addr, addr_family: u8, endpoint_role: u8) -> EndpointKey {
    EndpointKey {
        addr,
        family: addr_family,
        role: endpoint_role,
        _pad: [0; 2],
    }
}

impl Drop for Decap {
    fn drop(&mut self) {
        self.detach_all();
    }
}
