//! The agent's policy reconciler: keeps the kernel's policy datapath equal to the merged desired
//! policy, and turns what the datapath reports into metrics, log lines and events.
//!
//! - [`PolicyEnforcer::reconcile`]: on every change of the desired policy, loads the TC programs
//!   (once, when a policy first appears), compiles the rule set and applies it (only when it or the
//!   interfaces' indexes changed), then attaches the programs to every local workload interface the
//!   policy names and detaches them from interfaces it no longer names. The rule set is applied
//!   before a new interface is attached, so a workload never sees its programs without its rules.
//!   A compile or apply error leaves the last good rule set in force.
//! - [`PolicyEnforcer::drain`]: called every [`DRAIN_INTERVAL`]; reads the verdict counters
//!   (`lb_policy_verdicts_total`) and the ring buffer's deny and audit events, which become log
//!   lines and gRPC events, at most [`REPORTS_PER_SECOND`] per second (the rest are counted and
//!   summarised, the counters still count every packet).
//!
//! With a pin directory the policy datapath is pinned (see `super::datapath`): a restarted agent
//! adopts the maps and the rule set in force, writes nothing if the policy did not change, and puts
//! its programs into the pinned links of the interfaces the policy still names (the links of the
//! others are removed). Identities are hashes of the label sets; the few that a collision moved are
//! kept across a restart by taking, for each label set, the identity its addresses have in the
//! adopted ipcache ([`AdoptedIdentities`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_common::policy::{identity, IpKeyV4, IpKeyV6, Verdict};
use tracing::info;

use super::{
    compile,
    datapath::{PolicyDatapath, PolicyEvent, PolicyLoadOptions},
    model::{Cidr, WorkloadStatus},
    CompiledPolicy, IdentityAllocator, IdentityKey, PolicyConfig,
};
use crate::{datapath::PinOptions, metrics::PolicyVerdicts, pins::PinDir};

/// How often the agent drains the verdict ring buffer and reads the verdict counters.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(200);
/// Deny and audit verdicts logged and published per second; the rest are counted in a summary.
pub const REPORTS_PER_SECOND: u32 = 50;

/// What one reconcile changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PolicyChange {
    /// A new rule set is in force.
    pub applied: bool,
    pub attached: Vec<String>,
    pub detached: Vec<String>,
}

impl PolicyChange {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A deny or audit verdict, described for logs and the event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerdictReport {
    pub verdict: Verdict,
    pub text: String,
}

/// What one drain found.
#[derive(Debug, Default)]
pub struct Drained {
    /// Deny and audit verdicts to report (rate-limited).
    pub reports: Vec<VerdictReport>,
    /// Deny and audit verdicts left out by the rate limit since the last summary.
    pub suppressed: u64,
}

#[derive(Default)]
pub struct PolicyEnforcer {
    /// Pin the policy datapath here (under `policy/`) and adopt what is pinned.
    pins: Option<PinOptions>,
    datapath: Option<PolicyDatapath>,
    identities: IdentityAllocator,
    /// Identities found in adopted maps, not yet used (see [`AdoptedIdentities`]).
    adopted_identities: AdoptedIdentities,
    /// Interfaces whose pinned links an earlier agent left and this one has not dealt with yet.
    adopted_links: BTreeSet<String>,
    /// The desired policy and interface indexes of the rule set in force.
    applied: Option<(PolicyConfig, BTreeMap<String, u32>)>,
    /// The rule set in force before the last apply: events drained after a swap may name its rules.
    previous: CompiledPolicy,
    attached: BTreeSet<String>,
    verdicts: Vec<PolicyVerdicts>,
    budget: ReportBudget,
}

impl PolicyEnforcer {
    /// An enforcer that pins the policy datapath under `pins` and adopts what an earlier agent
    /// pinned there.
    pub fn with_pins(pins: Option<PinOptions>) -> Self {
        Self {
            pins,
            ..Self::default()
        }
    }

    /// Whether an earlier agent left policy programs attached, which enforce its rule set until
    /// this enforcer adopts them (at the first reconcile, even of an empty policy, so that links no
    /// longer wanted are removed).
    pub fn links_pinned(&self) -> bool {
        self.pins.as_ref().is_some_and(|p| {
            PinDir::new(&p.dir)
                .policy()
                .tc_linked_interfaces()
                .is_ok_and(|links| !links.is_empty())
        })
    }

    /// Makes the datapath enforce `policy`. On error the previous rule set stays in force; the
    /// interfaces that could be attached are (the others are retried on the next call).
    pub fn reconcile(&mut self, policy: &PolicyConfig) -> Result<PolicyChange> {
        let mut change = PolicyChange::default();
        if self.datapath.is_none() {
            if *policy == PolicyConfig::default() && !self.links_pinned() {
                return Ok(change);
            }
            let datapath = PolicyDatapath::load(&PolicyLoadOptions {
                pins: self.pins.clone(),
                ..Default::default()
            })
            .context("loading the policy programs")?;
            info!("policy programs loaded");
            if datapath.adopted() {
                self.adopted_identities = AdoptedIdentities::from_live(datapath.live());
                self.adopted_links = datapath.pinned_interfaces()?.into_iter().collect();
            }
            self.datapath = Some(datapath);
        }
        let datapath = self.datapath.as_mut().expect("loaded above");
        let interfaces: BTreeSet<String> = policy
            .workloads
            .iter()
            .filter_map(|w| w.interface.clone())
            .collect();
        let ifindexes: BTreeMap<String, u32> = interfaces
            .iter()
            .filter_map(|name| Some((name.clone(), ifindex(name)?)))
            .collect();
        let unchanged = self
            .applied
            .as_ref()
            .is_some_and(|(p, i)| p == policy && *i == ifindexes);
        if !unchanged {
            let ifindex_of = |name: &str| ifindexes.get(name).copied();
            self.adopted_identities
                .reserve(policy, &mut self.identities);
            let compiled = compile(policy, &mut self.identities, &ifindex_of)
                .map_err(|e| anyhow::anyhow!("policy rejected: {e}"))?;
            if !compiled.same_entries(datapath.live()) {
                let before = datapath.live().clone();
                datapath.apply(&compiled)?;
                self.previous = before;
                change.applied = true;
            } else if compiled != *datapath.live() {
                datapath.describe_live(&compiled);
            }
            self.applied = Some((policy.clone(), ifindexes.clone()));
        }

        for gone in self
            .attached
            .union(&self.adopted_links)
            .filter(|i| !interfaces.contains(*i))
            .cloned()
            .collect::<Vec<_>>()
        {
            datapath.detach(&gone);
            self.attached.remove(&gone);
            change.detached.push(gone);
        }
        self.adopted_links.clear();
        let mut failed = Vec::new();
        for name in interfaces
            .difference(&self.attached)
            .cloned()
            .collect::<Vec<_>>()
        {
            if !ifindexes.contains_key(&name) {
                failed.push(format!("{name}: no such interface"));
                continue;
            }
            match datapath.attach(&name) {
                Ok(()) => {
                    self.attached.insert(name.clone());
                    change.attached.push(name);
                }
                Err(e) => failed.push(format!("{e:#}")),
            }
        }
        if !failed.is_empty() {
            anyhow::bail!(
                "policy not enforced on some workload interfaces (retried on the next change): {}",
                failed.join("; ")
            );
        }
        Ok(change)
    }

    /// Workload interfaces named by the policy but not attached yet (e.g. not created yet).
    pub fn pending(&self) -> bool {
        self.applied.as_ref().is_some_and(|(policy, _)| {
            policy
                .workloads
                .iter()
                .filter_map(|w| w.interface.as_ref())
                .any(|name| !self.attached.contains(name))
        })
    }

    /// The last desired policy reconciled, to retry pending interfaces with.
    pub fn desired(&self) -> Option<PolicyConfig> {
        self.applied.as_ref().map(|(policy, _)| policy.clone())
    }

    /// Reads the verdict counters and takes the waiting verdict events.
    pub fn drain(&mut self) -> Result<Drained> {
        let Some(datapath) = self.datapath.as_mut() else {
            return Ok(Drained::default());
        };
        let events = datapath.drain_events();
        let mut drained = Drained::default();
        for event in events.iter().filter(|e| e.verdict != Verdict::Allow) {
            if self.budget.take() {
                let rules = if event.epoch == datapath.epoch() {
                    datapath.live()
                } else {
                    &self.previous
                };
                drained.reports.push(VerdictReport {
                    verdict: event.verdict,
                    text: describe(event, rules),
                });
            }
        }
        drained.suppressed = self.budget.summary();
        self.verdicts = datapath
            .counters()?
            .into_iter()
            .map(|(verdict, reason, packets)| PolicyVerdicts {
                verdict: verdict.name().into(),
                reason: reason.name().into(),
                packets,
            })
            .collect();
        Ok(drained)
    }

    /// Packets per verdict and reason, as of the last drain.
    pub fn verdicts(&self) -> &[PolicyVerdicts] {
        &self.verdicts
    }
}

/// The identities of an adopted rule set, by address and by CIDR, read from its ipcache: a label set
/// (or CIDR) the next policy names again takes the identity it had, if still free, instead of its
/// hash slot, so identities that a collision moved survive a restart too. Each hint is offered once,
/// at the first compile that names its address or CIDR; from then on the allocator keeps it.
#[derive(Debug, Default)]
struct AdoptedIdentities {
    by_address: BTreeMap<IpAddr, u32>,
    by_cidr: BTreeMap<Cidr, u32>,
}

impl AdoptedIdentities {
    fn from_live(live: &CompiledPolicy) -> Self {
        let mut this = Self::default();
        let v4 = live.ipcache_v4.iter().map(|(k, v)| {
            let addr = Ipv4Addr::from(k.data.addr.to_ne_bytes());
            (
                IpAddr::V4(addr),
                k.prefix_len - IpKeyV4::EPOCH_BITS,
                v.identity,
            )
        });
        let v6 = live.ipcache_v6.iter().map(|(k, v)| {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_exact_mut(4).zip(k.data.addr) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            (
                IpAddr::V6(Ipv6Addr::from(octets)),
                k.prefix_len - IpKeyV6::EPOCH_BITS,
                v.identity,
            )
        });
        for (addr, len, id) in v4.chain(v6) {
            let host = if addr.is_ipv4() { 32 } else { 128 };
            if (identity::WORKLOAD_MIN..=identity::WORKLOAD_MAX).contains(&id) && len == host {
                this.by_address.insert(addr, id);
            } else if identity::is_cidr(id) {
                if let Ok(cidr) = Cidr::masked(addr, len as u8) {
                    this.by_cidr.insert(cidr, id);
                }
            }
        }
        this
    }

    /// Gives the label sets and CIDRs of `policy` that `identities` does not know yet their
    /// adopted identity, where free, and forgets the hints it looked at.
    fn reserve(&mut self, policy: &PolicyConfig, identities: &mut IdentityAllocator) {
        if self.by_address.is_empty() && self.by_cidr.is_empty() {
            return;
        }
        for w in policy
            .workloads
            .iter()
            .filter(|w| w.status == WorkloadStatus::Ready)
        {
            let key = IdentityKey::workload(&w.namespace, &w.labels);
            for addr in &w.addresses {
                if let Some(id) = self.by_address.remove(addr) {
                    identities.reserve(&key, id);
                }
            }
        }
        let cidrs = policy.rules_with_paths().unwrap_or_default();
        for cidr in cidrs
            .iter()
            .flat_map(|(_, r)| &r.peers)
            .flat_map(|p| p.cidr.iter().chain(&p.except))
        {
            if let Some(id) = self.by_cidr.remove(cidr) {
                identities.reserve(&IdentityKey::Cidr(*cidr), id);
            }
        }
    }
}

/// One line per verdict: what, who, which rule.
fn describe(e: &PolicyEvent, rules: &CompiledPolicy) -> String {
    let addr = |a: Option<std::net::IpAddr>, port: u16| match a {
        Some(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        Some(ip) => format!("{ip}:{port}"),
        None => "?".into(),
    };
    let rule = rules
        .rule(e.rule_id)
        .map_or_else(|| "-".to_string(), |r| format!("{} ({})", r.name, r.source));
    format!(
        "policy {} {} {} -> {} proto {} reason {} rule {} endpoint {} peer {}",
        e.verdict.name(),
        e.direction.name(),
        addr(e.src, e.src_port),
        addr(e.dst, e.dst_port),
        e.protocol,
        e.reason.name(),
        rule,
        rules.identity_name(e.endpoint_identity),
        rules.identity_name(e.peer_identity),
    )
}

fn ifindex(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// At most [`REPORTS_PER_SECOND`] reports per one-second window; counts the rest.
struct ReportBudget {
    window: Instant,
    used: u32,
    suppressed: u64,
}

impl Default for ReportBudget {
    fn default() -> Self {
        Self {
            window: Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }
}

impl ReportBudget {
    fn take(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.used = 0;
        }
        if self.used < REPORTS_PER_SECOND {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Reports suppressed since the last summary; reported once their window is over.
    fn summary(&mut self) -> u64 {
        if self.suppressed > 0 && self.window.elapsed() >= Duration::from_secs(1) {
            std::mem::take(&mut self.suppressed)
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adopted_identities_are_kept_also_those_a_collision_moved() {
        let policy: PolicyConfig = serde_yaml_ng::from_str(
            "
namespaces: [{name: default}]
workloads:
  - {name: db, namespace: default, labels: {app: db}, addresses: [192.0.2.6, \"2001:db8:2::2\"], interface: wl-db}
  - {name: web, namespace: default, labels: {app: web}, addresses: [192.0.2.2]}
rules:
  - {name: db-in, endpoints: {match_labels: {app: db}}, direction: ingress, action: allow,
     peers: [{selector: {match_labels: {app: web}}}, {cidr: 198.51.100.0/24}]}
",
        )
        .unwrap();
        let db = IdentityKey::workload("default", &policy.workloads[0].labels);
        let cidr = IdentityKey::Cidr("198.51.100.0/24".parse().unwrap());
        let ifindex_of = |_: &str| Some(7);
        // The earlier agent's identities: db and the CIDR moved off their hash slots (as a
        // collision would move them).
        let mut earlier = IdentityAllocator::new();
        let canonical = IdentityAllocator::new().allocate_all([&db, &cidr]).unwrap();
        assert!(earlier.reserve(&db, canonical[&db] + 1));
        assert!(earlier.reserve(&cidr, canonical[&cidr] + 1));
        let live = compile(&policy, &mut earlier, &ifindex_of).unwrap();

        // A restarted agent given the adopted maps gets the same entries ...
        let mut adopted = AdoptedIdentities::from_live(&live);
        let mut restarted = IdentityAllocator::new();
        adopted.reserve(&policy, &mut restarted);
        let again = compile(&policy, &mut restarted, &ifindex_of).unwrap();
        assert!(again.same_entries(&live));
        assert_eq!(restarted.get(&db), Some(canonical[&db] + 1));
        assert_eq!(restarted.get(&cidr), Some(canonical[&cidr] + 1));
        // ... which it would not without them; the hints were used once.
        let fresh = compile(&policy, &mut IdentityAllocator::new(), &ifindex_of).unwrap();
        assert!(!fresh.same_entries(&live));
        assert!(adopted.by_address.is_empty() && adopted.by_cidr.is_empty());
    }

    #[test]
    fn report_budget_caps_a_window_and_counts_the_rest() {
        let mut budget = ReportBudget::default();
        let taken = (0..REPORTS_PER_SECOND + 7)
            .filter(|_| budget.take())
            .count();
        assert_eq!(taken, REPORTS_PER_SECOND as usize);
        assert_eq!(budget.summary(), 0, "summarised when the window is over");
        budget.window -= Duration::from_secs(1);
        assert_eq!(budget.summary(), 7);
        assert!(budget.take());
    }
}
