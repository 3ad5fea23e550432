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
//! The policy maps are not pinned: they live as long as the agent, and a restarted agent writes
//! them anew. Identities are hashes of the label sets, so they come out the same unless two sets
//! collide: the allocator's table is not saved yet (`IdentityAllocator::save`).

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_common::policy::Verdict;
use tracing::info;

use super::{
    compile,
    datapath::{PolicyDatapath, PolicyEvent, PolicyLoadOptions},
    CompiledPolicy, IdentityAllocator, PolicyConfig,
};
use crate::metrics::PolicyVerdicts;

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
    datapath: Option<PolicyDatapath>,
    identities: IdentityAllocator,
    /// The desired policy and interface indexes of the rule set in force.
    applied: Option<(PolicyConfig, BTreeMap<String, u32>)>,
    /// The rule set in force before the last apply: events drained after a swap may name its rules.
    previous: CompiledPolicy,
    attached: BTreeSet<String>,
    verdicts: Vec<PolicyVerdicts>,
    budget: ReportBudget,
}

impl PolicyEnforcer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the datapath enforce `policy`. On error the previous rule set stays in force; the
    /// interfaces that could be attached are (the others are retried on the next call).
    pub fn reconcile(&mut self, policy: &PolicyConfig) -> Result<PolicyChange> {
        let mut change = PolicyChange::default();
        if self.datapath.is_none() {
            if *policy == PolicyConfig::default() {
                return Ok(change);
            }
            let datapath = PolicyDatapath::load(&PolicyLoadOptions::default())
                .context("loading the policy programs")?;
            info!("policy programs loaded");
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
            let compiled = compile(policy, &mut self.identities, &ifindex_of)
                .map_err(|e| anyhow::anyhow!("policy rejected: {e}"))?;
            if compiled != *datapath.live() {
                let before = datapath.live().clone();
                datapath.apply(&compiled)?;
                self.previous = before;
                change.applied = true;
            }
            self.applied = Some((policy.clone(), ifindexes.clone()));
        }

        for gone in self
            .attached
            .difference(&interfaces)
            .cloned()
            .collect::<Vec<_>>()
        {
            datapath.detach(&gone);
            self.attached.remove(&gone);
            change.detached.push(gone);
        }
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
