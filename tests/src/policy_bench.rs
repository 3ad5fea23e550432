//! Per-packet cost of the TC policy check (`policy_to_endpoint`) through BPF_PROG_TEST_RUN, with
//! 10, 1000 and 100000 rules and 100000 ipcache entries, as a ratio to the `tc_pass` program
//! measured in the same run. The policy program does not rewrite packets, so one long `repeat` run
//! per figure is exact. Each figure's path is verified by its counter: every repeat must have been
//! an allow by a rule (exact peer identity, port): the endpoint and ipcache lookups, the conntrack
//! lookups, and the rule outcome, measured twice: from the `POLICY_DECISIONS` cache (the steady
//! state of a (peer, port) pair) and with the cache off (three `POLICY` trie walks, as the first
//! packet of a pair pays).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{ensure, Result};
use lb_agent::policy::{
    datapath::{PolicyDatapath, PolicyLoadOptions, TC_PASS_PROGRAM, TO_ENDPOINT_PROGRAM},
    CompiledPolicy,
};
use lb_common::policy::{
    identity, Direction, EndpointInfo, EntryKind, IpKeyV4, IpKeyV6, IpcacheEntry, PolicyEntry,
    PolicyKey, PortBlock, Reason, Verdict,
};
use serde_json::{json, Value};

use crate::{frames::frame, frames::SYN, test_run::tc_repeated_ns};

pub const RULE_COUNTS: [u32; 3] = [10, 1000, 100_000];
pub const IPCACHE_ENTRIES: u32 = 100_000;
const ENDPOINT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const ENDPOINT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const PORT: u16 = 80;

/// The i-th peer of the ipcache: 2001:db8:1::/48 host addresses.
fn peer_v6(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0)) + i as u128)
}

/// One local endpoint, `IPCACHE_ENTRIES` peers with their own identity each (IPv6), one IPv4 peer,
/// and `rules` allow entries (peer i, TCP, port 80) for the endpoint's ingress: the last rule's
/// peer sends the measured packets.
fn rule_set(rules: u32) -> (CompiledPolicy, IpAddr, IpAddr) {
    let mut c = CompiledPolicy::default();
    let endpoint_id = identity::WORKLOAD_MIN + IPCACHE_ENTRIES;
    let last = rules - 1;
    c.ipcache_v4.insert(
        IpKeyV4::prefix(0, Ipv4Addr::UNSPECIFIED, 0),
        IpcacheEntry {
            identity: identity::WORLD_IPV4,
        },
    );
    let peer4 = Ipv4Addr::new(198, 51, 100, 20);
    c.ipcache_v4.insert(
        IpKeyV4::prefix(0, peer4, 32),
        IpcacheEntry {
            identity: identity::WORKLOAD_MIN + last,
        },
    );
    c.ipcache_v6.insert(
        IpKeyV6::prefix(0, Ipv6Addr::UNSPECIFIED, 0),
        IpcacheEntry {
            identity: identity::WORLD_IPV6,
        },
    );
    for i in 0..IPCACHE_ENTRIES {
        c.ipcache_v6.insert(
            IpKeyV6::prefix(0, peer_v6(i), 128),
            IpcacheEntry {
                identity: identity::WORKLOAD_MIN + i,
            },
        );
    }
    let endpoint = EndpointInfo {
        identity: endpoint_id,
        ifindex: 0,
        flags: 0,
    };
    c.endpoints_v4
        .insert(IpKeyV4::exact(0, ENDPOINT_V4), endpoint);
    c.endpoints_v6
        .insert(IpKeyV6::exact(0, ENDPOINT_V6), endpoint);
    c.policy.insert(
        PolicyKey::endpoint_root(0, Direction::Ingress, endpoint_id),
        PolicyEntry::new(EntryKind::DefaultDeny, 1),
    );
    for j in 0..rules {
        c.policy.insert(
            PolicyKey::ports(
                0,
                Direction::Ingress,
                endpoint_id,
                identity::WORKLOAD_MIN + j,
                lb_common::protocol::TCP,
                PortBlock {
                    start: PORT,
                    prefix_bits: 16,
                },
            ),
            PolicyEntry::new(EntryKind::Allow, j + 2),
        );
    }
    (c, IpAddr::V4(peer4), IpAddr::V6(peer_v6(last)))
}

fn allowed_by_rule(datapath: &PolicyDatapath) -> Result<u64> {
    Ok(datapath
        .counters()?
        .into_iter()
        .find(|(v, r, _)| (*v, *r) == (Verdict::Allow, Reason::AllowedByRule))
        .map_or(0, |(_, _, n)| n))
}

/// ns per packet of `policy_to_endpoint` on `packet`, checking every repeat was allowed by a rule.
fn measure(
    datapath: &mut PolicyDatapath,
    packet: &[u8],
    repeat: u32,
    rules: u32,
    family: &str,
) -> Result<f64> {
    let before = allowed_by_rule(datapath)?;
    let ns = tc_repeated_ns(datapath.program(TO_ENDPOINT_PROGRAM)?, packet, repeat);
    ensure!(
        allowed_by_rule(datapath)? - before == repeat as u64,
        "{rules} rules, {family}: not every repeat was allowed by its rule"
    );
    Ok(ns)
}

/// Runs the benchmark, prints its table and returns its JSON rows.
pub fn run(repeat: u32) -> Result<Value> {
    let mut cached = PolicyDatapath::load(&PolicyLoadOptions::default())?;
    let mut uncached = PolicyDatapath::load(&PolicyLoadOptions {
        decision_cache: false,
        ..Default::default()
    })?;
    println!(
        "Policy check (TC, BPF_PROG_TEST_RUN, {repeat} repeats; {IPCACHE_ENTRIES} ipcache entries):"
    );
    println!(
        "  {:>8} {:>6} {:>10} {:>9} {:>12} {:>9} {:>10}",
        "rules", "family", "cached ns", "x tc_pass", "uncached ns", "x tc_pass", "tc_pass ns"
    );
    let mut rows = Vec::new();
    for rules in RULE_COUNTS {
        let (compiled, peer4, peer6) = rule_set(rules);
        cached.apply(&compiled)?;
        uncached.apply(&compiled)?;
        for (family, peer, local) in [
            ("ipv4", peer4, IpAddr::V4(ENDPOINT_V4)),
            ("ipv6", peer6, IpAddr::V6(ENDPOINT_V6)),
        ] {
            let packet = frame(
                SYN,
                SocketAddr::new(peer, 40000),
                SocketAddr::new(local, PORT),
                b"",
            );
            let pass_ns = tc_repeated_ns(cached.program(TC_PASS_PROGRAM)?, &packet, repeat);
            let cached_ns = measure(&mut cached, &packet, repeat, rules, family)?;
            let uncached_ns = measure(&mut uncached, &packet, repeat, rules, family)?;
            println!(
                "  {rules:>8} {family:>6} {cached_ns:>10.1} {:>9.2} {uncached_ns:>12.1} {:>9.2} {pass_ns:>10.1}",
                cached_ns / pass_ns,
                uncached_ns / pass_ns
            );
            rows.push(json!({
                "rules": rules,
                "ipcache_entries": IPCACHE_ENTRIES,
                "family": family,
                "cached_ns_per_packet": cached_ns,
                "uncached_ns_per_packet": uncached_ns,
                "tc_pass_ns": pass_ns,
                "cached_ratio_to_tc_pass": cached_ns / pass_ns,
                "uncached_ratio_to_tc_pass": uncached_ns / pass_ns,
            }));
        }
    }
    println!();
    Ok(Value::Array(rows))
}
