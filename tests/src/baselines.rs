//! What users run today, set up in the balancer namespace for comparison with lb: kube-proxy's
//! iptables mode (KUBE-SVC/KUBE-SEP chains with the `statistic` match), its nftables mode (`numgen
//! random mod N vmap`), and HAProxy in TCP mode. Also lb's own config for the same services, and the
//! checks that the balancer namespace holds no contender's state.
//!
//! The rules follow what kube-proxy writes for a ClusterIP service with a cluster CIDR configured
//! and a client inside it (so there is no masquerade of client traffic; backends see the client's
//! address, as they do with lb's DNAT mode). Services with `affinity` get kube-proxy's
//! `sessionAffinity: ClientIP` rules (`recent` match, or a dynamic set with a timeout in nftables
//! mode), HAProxy `balance source`, lb `hash: source-ip`. Only the nat rules are written: kube-proxy's
//! filter-table rules would only add cost to its modes.

use std::{fmt::Write as _, net::Ipv4Addr, path::Path, process::Command, time::Duration};

use anyhow::{bail, Result};

use crate::{
    loadgen,
    netns::Netns,
    procs::{self, Server},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One service on the VIP: `vip_port` → every backend's `backend_port`.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: &'static str,
    pub proto: Proto,
    pub vip_port: u16,
    pub backend_port: u16,
    /// Client-IP session affinity (needed by protocols with several connections per session,
    /// such as iperf3's control and data connections).
    pub affinity: bool,
}

/// The cluster CIDR given to "kube-proxy": the client subnet, so its traffic is not masqueraded.
pub const CLUSTER_CIDR: &str = "192.0.2.0/24";
/// kube-proxy's default affinity timeout (10800 s).
const AFFINITY_SECONDS: u32 = 10800;

/// `iptables-restore` input for the nat table, as kube-proxy's iptables mode writes it.
pub fn kube_proxy_iptables(vip: Ipv4Addr, services: &[Service], backends: &[Ipv4Addr]) -> String {
    let mut chains = vec![
        "KUBE-SERVICES".to_string(),
        "KUBE-NODEPORTS".to_string(),
        "KUBE-POSTROUTING".to_string(),
        "KUBE-MARK-MASQ".to_string(),
    ];
    let mut rules = String::new();
    let n = backends.len();
    for svc in services {
        let p = svc.proto.name();
        let svc_chain = format!("KUBE-SVC-{}", svc.name.to_uppercase());
        chains.push(svc_chain.clone());
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {vip}/32 -p {p} -m comment --comment \"bench/{0} cluster IP\" -m {p} --dport {1} -j {svc_chain}",
            svc.name, svc.vip_port
        );
        let _ = writeln!(
            rules,
            "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {vip}/32 -p {p} -m comment --comment \"bench/{0} cluster IP\" -m {p} --dport {1} -j KUBE-MARK-MASQ",
            svc.name, svc.vip_port
        );
        let sep = |i: usize| format!("KUBE-SEP-{}-{}", svc.name.to_uppercase(), i + 1);
        if svc.affinity {
            for (i, b) in backends.iter().enumerate() {
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"bench/{0} -> {b}:{1}\" -m recent --rcheck --seconds {AFFINITY_SECONDS} --reap --name {2} --mask 255.255.255.255 --rsource -j {2}",
                    svc.name, svc.backend_port, sep(i)
                );
            }
        }
        for (i, b) in backends.iter().enumerate() {
            // kube-proxy: endpoint i of n is taken with probability 1/(n-i); the last always.
            let statistic = if i + 1 < n {
                format!(
                    " -m statistic --mode random --probability {:.11}",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc_chain} -m comment --comment \"bench/{0} -> {b}:{1}\"{statistic} -j {2}",
                svc.name,
                svc.backend_port,
                sep(i)
            );
        }
        for (i, b) in backends.iter().enumerate() {
            let chain = sep(i);
            chains.push(chain.clone());
            let _ = writeln!(
                rules,
                "-A {chain} -s {b}/32 -m comment --comment \"bench/{0}\" -j KUBE-MARK-MASQ",
                svc.name
            );
            let recent = if svc.affinity {
                format!(" -m recent --set --name {chain} --mask 255.255.255.255 --rsource")
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {chain} -p {p} -m comment --comment \"bench/{0}\"{recent} -m {p} -j DNAT --to-destination {b}:{1}",
                svc.name, svc.backend_port
            );
        }
    }
    let mut out = String::from("*nat\n");
    for c in &chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out += "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
    out += "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
    out += "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n";
    out += "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n";
    out += "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n";
    out += "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n";
    out += "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n";
    out += &rules;
    out += "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";
    out += "COMMIT\n";
    out
}

/// The `nft -f` input for kube-proxy's nftables mode: a `service-ips` verdict map from
/// (VIP, protocol, port) to a service chain that picks an endpoint chain with
/// `numgen random mod N vmap`.
pub fn kube_proxy_nftables(vip: Ipv4Addr, services: &[Service], backends: &[Ipv4Addr]) -> String {
    // Declared before use: sets, endpoint chains, service chains, the map, then the hooks.
    let (mut sets, mut endpoints, mut service_chains) =
        (String::new(), String::new(), String::new());
    let mut elements = Vec::new();
    for svc in services {
        let p = svc.proto.name();
        let svc_chain = format!("service-{}", svc.name);
        elements.push(format!("{vip} . {p} . {} : goto {svc_chain}", svc.vip_port));
        let ep = |i: usize| format!("endpoint-{}-{}", svc.name, i + 1);
        let aff = |i: usize| format!("affinity-{}-{}", svc.name, i + 1);
        let _ = writeln!(service_chains, "  chain {svc_chain} {{");
        let _ = writeln!(
            service_chains,
            "    ip daddr {vip} {p} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            svc.vip_port
        );
        if svc.affinity {
            for i in 0..backends.len() {
                let _ = writeln!(service_chains, "    ip saddr @{} goto {}", aff(i), ep(i));
            }
        }
        let arms: Vec<String> = (0..backends.len())
            .map(|i| format!("{i} : goto {}", ep(i)))
            .collect();
        let _ = writeln!(
            service_chains,
            "    numgen random mod {} vmap {{ {} }}\n  }}",
            backends.len(),
            arms.join(", ")
        );
        for (i, b) in backends.iter().enumerate() {
            if svc.affinity {
                let _ = writeln!(
                    sets,
                    "  set {} {{\n    type ipv4_addr\n    flags dynamic,timeout\n    timeout {AFFINITY_SECONDS}s\n  }}",
                    aff(i)
                );
            }
            let _ = writeln!(endpoints, "  chain {} {{", ep(i));
            let _ = writeln!(endpoints, "    ip saddr {b} jump mark-for-masquerade");
            if svc.affinity {
                let _ = writeln!(endpoints, "    update @{} {{ ip saddr }}", aff(i));
            }
            let _ = writeln!(
                endpoints,
                "    meta l4proto {p} dnat to {b}:{}\n  }}",
                svc.backend_port
            );
        }
    }
    let mut t = String::from("table ip kube-proxy {\n  comment \"rules for kube-proxy\"\n");
    t += &sets;
    t += "  chain mark-for-masquerade {\n    mark set mark or 0x4000\n  }\n";
    t += "  chain masquerading {\n    meta mark & 0x4000 == 0 return\n    meta mark set meta mark ^ 0x4000\n    masquerade fully-random\n  }\n";
    t += &endpoints;
    t += &service_chains;
    let _ = writeln!(
        t,
        "  map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = {{ {} }}\n  }}",
        elements.join(", ")
    );
    t += "  chain services {\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }\n";
    t += "  chain nat-prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }\n";
    t += "  chain nat-output {\n    type nat hook output priority -100; policy accept;\n    jump services\n  }\n";
    t += "  chain nat-postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n    jump masquerading\n  }\n";
    t += "}\n";
    t
}

/// HAProxy in TCP mode on the VIP for the TCP services (UDP is not HAProxy's).
pub fn haproxy_config(vip: Ipv4Addr, services: &[Service], backends: &[Ipv4Addr]) -> String {
    let mut c = String::from(
        "global\n    maxconn 8000\n    nbthread 2\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\n",
    );
    for svc in services.iter().filter(|s| s.proto == Proto::Tcp) {
        let _ = writeln!(
            c,
            "frontend {0}\n    bind {vip}:{1}\n    default_backend {0}\n\nbackend {0}\n    balance {2}",
            svc.name,
            svc.vip_port,
            if svc.affinity { "source" } else { "roundrobin" }
        );
        for (i, b) in backends.iter().enumerate() {
            let _ = writeln!(c, "    server b{} {b}:{}", i + 1, svc.backend_port);
        }
        c.push('\n');
    }
    c
}

/// lb-agent's config for the same services (DNAT mode).
pub fn lb_config(vip: Ipv4Addr, services: &[Service], backends: &[Ipv4Addr]) -> String {
    let mut y = String::from("services:\n");
    for svc in services {
        let _ = writeln!(
            y,
            "  - name: {}\n    vip: {vip}\n    port: {}\n    protocol: {}\n    mode: dnat\n    hash: {}\n    backends:",
            svc.name,
            svc.vip_port,
            svc.proto.name(),
            if svc.affinity { "source-ip" } else { "five-tuple" }
        );
        for b in backends {
            let _ = writeln!(y, "      - {{ address: {b}, port: {} }}", svc.backend_port);
        }
    }
    y
}

const SHORT: Duration = Duration::from_secs(10);

fn ns_cmd(ns: &Netns, program: &str, args: &[&str]) -> Command {
    let mut cmd = ns.command(program);
    cmd.args(args);
    cmd
}

/// Loads an `iptables-restore` file into `ns` (added to what is there).
pub fn iptables_restore(ns: &Netns, rules_file: &Path) -> Result<()> {
    let mut cmd = ns.command("iptables-restore");
    cmd.arg("--noflush").arg(rules_file);
    procs::run_ok(cmd, SHORT).map(|_| ())
}

/// Loads an `nft -f` file into `ns`.
pub fn nft_load(ns: &Netns, rules_file: &Path) -> Result<()> {
    let mut cmd = ns.command("nft");
    cmd.arg("-f").arg(rules_file);
    procs::run_ok(cmd, SHORT).map(|_| ())
}

/// Packets that went through the iptables `KUBE-SERVICES` jump to `chain` (from the rule counters).
pub fn iptables_chain_packets(ns: &Netns, chain: &str) -> Result<u64> {
    let out = procs::run_ok(
        ns_cmd(
            ns,
            "iptables",
            &["-t", "nat", "-L", "KUBE-SERVICES", "-v", "-x", "-n"],
        ),
        SHORT,
    )?;
    Ok(out
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some(chain))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum())
}

/// Removes every netfilter rule and table in `ns` (nftables, and iptables of either backend), and
/// every conntrack entry, so the next contender starts from the same state.
pub fn netfilter_flush(ns: &Netns) -> Result<()> {
    let mut errors = Vec::new();
    if procs::have("nft") {
        if let Err(e) = procs::run_ok(ns_cmd(ns, "nft", &["flush", "ruleset"]), SHORT) {
            errors.push(format!("{e:#}"));
        }
    }
    if procs::have("iptables") {
        for args in [["-t", "nat", "-F"], ["-t", "nat", "-X"]] {
            if let Err(e) = procs::run_ok(ns_cmd(ns, "iptables", &args), SHORT) {
                errors.push(format!("{e:#}"));
            }
        }
        // `iptables -t nat -F` recreates iptables-nft's empty nat table: delete it again.
        if procs::have("nft") {
            let _ = procs::run_ok(ns_cmd(ns, "nft", &["flush", "ruleset"]), SHORT);
        }
    }
    if procs::have("conntrack") {
        // Exits 1 with "0 flow entries" when there are none: not an error.
        let _ = procs::run_bounded(ns_cmd(ns, "conntrack", &["-F"]), SHORT);
    }
    if !errors.is_empty() {
        bail!("flushing netfilter: {}", errors.join("; "));
    }
    Ok(())
}

/// Whatever in `ns` could still steer VIP traffic: netfilter rules, a VIP on an interface, an XDP
/// program. Empty when the namespace is clean.
pub fn leftover_state(ns: &Netns, vip: Ipv4Addr) -> Result<Vec<String>> {
    let mut found = Vec::new();
    if procs::have("nft") {
        let rules = procs::run_ok(ns_cmd(ns, "nft", &["list", "ruleset"]), SHORT)?;
        if !rules.trim().is_empty() {
            found.push(format!(
                "nftables ruleset not empty: {}",
                rules
                    .split_whitespace()
                    .take(12)
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
    }
    if procs::have("iptables-save") {
        let nat = procs::run_ok(ns_cmd(ns, "iptables-save", &["-t", "nat"]), SHORT)?;
        let n = nat.lines().filter(|l| l.starts_with("-A ")).count();
        if n > 0 {
            found.push(format!("{n} iptables nat rules"));
        }
    }
    let addrs = procs::run_ok(ns_cmd(ns, "ip", &["-4", "-o", "addr", "show"]), SHORT)?;
    if addrs.contains(&format!(" {vip}/")) {
        found.push(format!("{vip} is assigned to an interface"));
    }
    let links = procs::run_ok(ns_cmd(ns, "ip", &["-d", "-o", "link", "show"]), SHORT)?;
    for l in links.lines().filter(|l| l.contains("prog/xdp")) {
        found.push(format!(
            "XDP attached: {}",
            l.split(':').nth(1).unwrap_or("?").trim()
        ));
    }
    if procs::have("bpftool") {
        for iface in tc_ingress(ns)? {
            found.push(format!("TC attached: {iface}"));
        }
    }
    Ok(found)
}

/// Interfaces of `ns` with a TC ingress program (tcx or clsact), as `bpftool net show` lists them.
pub fn tc_ingress(ns: &Netns) -> Result<Vec<String>> {
    let out = procs::run_ok(ns_cmd(ns, "bpftool", &["net", "show"]), SHORT)?;
    Ok(out
        .lines()
        .filter(|l| l.contains("tcx/ingress") || l.contains("clsact/ingress"))
        .filter_map(|l| Some(l.split('(').next()?.trim().to_string()))
        .collect())
}

/// Interfaces of `ns` with an XDP program, and the mode (`xdp` = driver, `xdpgeneric`).
pub fn xdp_modes(ns: &Netns) -> Result<Vec<(String, String)>> {
    let links = procs::run_ok(ns_cmd(ns, "ip", &["-o", "link", "show"]), SHORT)?;
    Ok(links
        .lines()
        .filter_map(|l| {
            let name = l.split(':').nth(1)?.trim().split('@').next()?.to_string();
            let mode = l
                .split_whitespace()
                .find(|w| matches!(*w, "xdp" | "xdpgeneric" | "xdpdrv" | "xdpoffload"))?;
            Some((name, mode.to_string()))
        })
        .collect())
}

/// Ids of the XDP programs attached in `ns` (`prog/xdp id N` in `ip -d link`), without repeats.
pub fn xdp_prog_ids(ns: &Netns) -> Result<Vec<u32>> {
    let links = procs::run_ok(ns_cmd(ns, "ip", &["-d", "-o", "link", "show"]), SHORT)?;
    let mut ids: Vec<u32> = links
        .lines()
        .filter_map(|l| {
            let rest = l.split("prog/xdp id ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Total run time (ns) and run count of BPF programs `ids`, as the kernel accounts them while
/// `kernel.bpf_stats_enabled` is 1.
pub fn bpf_run_stats(ids: &[u32]) -> Result<(u64, u64)> {
    let (mut ns, mut cnt) = (0, 0);
    for id in ids {
        let mut cmd = Command::new("bpftool");
        cmd.args(["prog", "show", "id", &id.to_string(), "--json"]);
        let out = procs::run_ok(cmd, SHORT)?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        ns += v["run_time_ns"].as_u64().unwrap_or(0);
        cnt += v["run_cnt"].as_u64().unwrap_or(0);
    }
    Ok((ns, cnt))
}

/// Turns `kernel.bpf_stats_enabled` on and restores the previous value on drop. The setting is
/// machine-wide and costs every BPF program two clock reads per run: diagnostic runs only.
pub struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn enable() -> Result<Self> {
        let previous = std::fs::read_to_string(BPF_STATS)?.trim().to_string();
        std::fs::write(BPF_STATS, "1")?;
        Ok(Self { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.previous);
    }
}

/// HAProxy in `ns` with the VIP on the namespace's loopback; both undone on drop.
pub struct Haproxy {
    server: Server,
    ns_name: String,
    vip: Ipv4Addr,
}

impl Haproxy {
    pub fn start(
        ns: &Netns,
        vip: Ipv4Addr,
        services: &[Service],
        backends: &[Ipv4Addr],
        dir: &Path,
    ) -> Result<Self> {
        ns.ip_cmd(&format!("addr add {vip}/32 dev lo"))?;
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_config(vip, services, backends))?;
        let mut cmd = ns.command("haproxy");
        cmd.arg("-db").arg("-f").arg(&cfg);
        let server = Server::spawn("haproxy", cmd, &dir.join("haproxy.log"));
        let mut this = match server {
            Ok(server) => Self {
                server,
                ns_name: ns.name().to_string(),
                vip,
            },
            Err(e) => {
                let _ = ns.ip_cmd(&format!("addr del {vip}/32 dev lo"));
                return Err(e);
            }
        };
        for svc in services.iter().filter(|s| s.proto == Proto::Tcp) {
            loadgen::wait_listening(
                ns,
                vip.into(),
                svc.vip_port,
                Some(&mut this.server),
                Duration::from_secs(10),
            )?;
        }
        Ok(this)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.server.stop();
        let _ = Command::new("ip")
            .args(["-n", &self.ns_name, "addr", "del"])
            .arg(format!("{}/32", self.vip))
            .args(["dev", "lo"])
            .output();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> Vec<Service> {
        vec![
            Service {
                name: "web",
                proto: Proto::Tcp,
                vip_port: 80,
                backend_port: 8080,
                affinity: false,
            },
            Service {
                name: "bulk",
                proto: Proto::Tcp,
                vip_port: 5201,
                backend_port: 5201,
                affinity: true,
            },
        ]
    }

    fn backends() -> Vec<Ipv4Addr> {
        (1..=4)
            .map(|i| Ipv4Addr::new(203, 0, 113, 4 * i + 2))
            .collect()
    }

    #[test]
    fn iptables_probabilities_are_kube_proxys() {
        let rules = kube_proxy_iptables(Ipv4Addr::new(198, 51, 100, 10), &services(), &backends());
        assert!(rules.contains("--probability 0.25000000000 -j KUBE-SEP-WEB-1"));
        assert!(rules.contains("--probability 0.33333333333 -j KUBE-SEP-WEB-2"));
        assert!(rules.contains("--probability 0.50000000000 -j KUBE-SEP-WEB-3"));
        assert!(rules.contains("\" -j KUBE-SEP-WEB-4\n"));
        assert!(rules.contains("--rcheck --seconds 10800 --reap --name KUBE-SEP-BULK-1"));
        assert!(rules.contains("-j DNAT --to-destination 203.0.113.18:8080"));
        assert!(rules.starts_with("*nat\n") && rules.ends_with("COMMIT\n"));
    }

    #[test]
    fn nftables_uses_numgen_vmap() {
        let t = kube_proxy_nftables(Ipv4Addr::new(198, 51, 100, 10), &services(), &backends());
        assert!(t.contains("numgen random mod 4 vmap { 0 : goto endpoint-web-1, 1 : goto endpoint-web-2, 2 : goto endpoint-web-3, 3 : goto endpoint-web-4 }"));
        assert!(t.contains("198.51.100.10 . tcp . 80 : goto service-web"));
        assert!(t.contains("update @affinity-bulk-1 { ip saddr }"));
    }

    #[test]
    fn lb_config_parses() {
        let y = lb_config(Ipv4Addr::new(198, 51, 100, 10), &services(), &backends());
        let config = lb_agent::config::Config::from_yaml(&y).expect("valid lb config");
        assert_eq!(config.services.len(), 2);
    }
}
