//! The CIDR deny list as the agent runs it: `policy.cidr_deny` of the merged desired state,
//! written into the `CIDR_DENY_V4` / `CIDR_DENY_V6` tries of the balancer's object (pinned with
//! it), so listed sources are dropped on the node's interfaces by `lb_xdp` before an skb exists,
//! or by `lb_tc` with `--attach tc`. Its log lines keep the name "XDP CIDR deny list" from when
//! only `lb_xdp` checked it.
//!
//! The check is compiled into `lb_xdp` only when it is enabled at load time (a read-only global:
//! without it the verifier removes the lookup, and the fast path pays nothing). The agent enables it
//! when the config file it starts with lists a prefix; an edit from an empty list to a non-empty
//! one (or back) reloads the programs with the check on (or off) into their pinned links, without a
//! restart (`Datapath::reload`), before the list is written. If that reload fails the list is
//! refused with an error saying so (the rest of the edit applies), and retried with the next
//! change.
//!
//! The list is reconciled against what the maps hold: read back once (a previous agent's pinned
//! entries included), then tracked. A write inserts the new list before removing what is no longer
//! listed, so a prefix in both lists is never absent; if it fails the next change starts from a
//! fresh read.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{lpm_trie::LpmTrie, Map},
    Ebpf,
};
use lb_common::policy::{IpKeyV4, IpKeyV6, Reason, Verdict};

use super::{
    datapath::{read_counters, write_cidr_deny},
    model::Cidr,
};

pub struct CidrDenyList {
    enabled: bool,
    /// What the maps hold, sorted; `None` until read (or after a failed write).
    held: Option<Vec<Cidr>>,
}

impl CidrDenyList {
    /// `enabled`: `lb_xdp` was loaded with the check (`Datapath::load_with_cidr_deny`).
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            held: None,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The programs now run with the check (`true`) or without it (`Datapath::reload`).
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// Makes the maps of the balancer's object hold exactly `cidrs`; `Ok(true)` if they changed.
    pub fn apply(&mut self, ebpf: &mut Ebpf, cidrs: &[Cidr]) -> Result<bool> {
        let held = match self.held.take() {
            Some(held) => held,
            None => read(ebpf)?,
        };
        let mut wanted = cidrs.to_vec();
        wanted.sort();
        if held == wanted {
            self.held = Some(held);
            return Ok(false);
        }
        if !self.enabled && !wanted.is_empty() {
            self.held = Some(held);
            bail!(
                "policy.cidr_deny: the XDP CIDR deny check is not loaded (reloading the programs \
                 with it failed, see above); the list is written once they are"
            );
        }
        write_cidr_deny(ebpf, &held, &wanted).context("writing the XDP CIDR deny list")?;
        self.held = Some(wanted);
        Ok(true)
    }
}

/// The prefixes the deny list holds, sorted.
pub fn read(ebpf: &Ebpf) -> Result<Vec<Cidr>> {
    let map =
        |name: &str| -> Result<&Map> { ebpf.map(name).with_context(|| format!("{name} missing")) };
    let mut out = Vec::new();
    for key in LpmTrie::<_, IpKeyV4, u32>::try_from(map("CIDR_DENY_V4")?)?.keys() {
        let key = key.context("reading CIDR_DENY_V4")?;
        let addr = Ipv4Addr::from(key.data().addr.to_ne_bytes());
        let len = key.prefix_len() - IpKeyV4::EPOCH_BITS;
        out.push(Cidr::masked(IpAddr::V4(addr), len as u8).map_err(anyhow::Error::msg)?);
    }
    for key in LpmTrie::<_, IpKeyV6, u32>::try_from(map("CIDR_DENY_V6")?)?.keys() {
        let key = key.context("reading CIDR_DENY_V6")?;
        let octets: Vec<u8> = key
            .data()
            .addr
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let octets: [u8; 16] = octets.try_into().expect("four words");
        let len = key.prefix_len() - IpKeyV6::EPOCH_BITS;
        out.push(
            Cidr::masked(IpAddr::V6(Ipv6Addr::from(octets)), len as u8)
                .map_err(anyhow::Error::msg)?,
        );
    }
    out.sort();
    Ok(out)
}

/// Packets `lb_xdp` dropped for their source so far (all CPUs).
pub fn drops(ebpf: &Ebpf) -> Result<u64> {
    Ok(read_counters(ebpf)?
        .into_iter()
        .filter(|(v, r, _)| (*v, *r) == (Verdict::Deny, Reason::CidrDeny))
        .map(|(.., n)| n)
        .sum())
}
