//! The reference evaluator: the datapath's lookup sequence, step for step, on in-memory copies of the
//! maps. It is the specification of the eBPF side (each step names the map and the key it reads, as
//! listed in `lb_common::policy`) and the oracle of the tests: a verdict here is the verdict the
//! kernel gives for the same maps.
//!
//! [`Maps`] models the kernel maps, including the LPM tries (longest prefix over the key's bytes,
//! most significant bit first, as `BPF_MAP_TYPE_LPM_TRIE` compares) and the epoch switch, so the
//! writer's protocol (write the new epoch, switch, delete the old one) can be tested as well.

use std::{collections::HashMap, fmt, net::IpAddr};

use lb_common::policy::{
    decide, identity, Decision, Direction, EndpointInfo, IpKeyV4, IpKeyV6, IpcacheEntry, Lpm,
    PolicyEntry, PolicyKey, PolicyState, Reason, Verdict,
};

use super::compile::CompiledPolicy;

/// The fields of a packet policy looks at. `dport` is 0 for protocols without ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub dport: u16,
}

/// The outcome of one direction's check, with what a verdict event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    pub direction: Direction,
    pub decision: Decision,
    /// The local endpoint's identity; `None` if the enforced address is not a local endpoint.
    pub endpoint_identity: Option<u32>,
    pub peer_identity: Option<u32>,
}

impl Check {
    pub fn verdict(&self) -> Verdict {
        self.decision.verdict
    }

    pub fn reason(&self) -> Reason {
        self.decision.reason
    }
}

/// The policy maps of one node, as the kernel holds them.
#[derive(Debug, Clone, Default)]
pub struct Maps {
    state: PolicyState,
    ipcache_v4: LpmTrie<IpcacheEntry>,
    ipcache_v6: LpmTrie<IpcacheEntry>,
    endpoints_v4: HashMap<IpKeyV4, EndpointInfo>,
    endpoints_v6: HashMap<IpKeyV6, EndpointInfo>,
    policy: LpmTrie<PolicyEntry>,
}

impl Maps {
    /// Maps holding `compiled` as the live epoch 0.
    pub fn load(compiled: &CompiledPolicy) -> Self {
        let mut maps = Self::default();
        maps.write_epoch(compiled, 0);
        maps.switch_to(0);
        maps
    }

    pub fn epoch(&self) -> u8 {
        self.state.epoch as u8
    }

    /// Writes every entry of `compiled` under `epoch`, as the reconciler does before a switch.
    pub fn write_epoch(&mut self, compiled: &CompiledPolicy, epoch: u8) {
        for (k, v) in &compiled.ipcache_v4 {
            let k = Lpm {
                data: IpKeyV4 { epoch, ..k.data },
                ..*k
            };
            self.ipcache_v4.insert(k.prefix_len, &k.data.to_bytes(), *v);
        }
        for (k, v) in &compiled.ipcache_v6 {
            let k = Lpm {
                data: IpKeyV6 { epoch, ..k.data },
                ..*k
            };
            self.ipcache_v6.insert(k.prefix_len, &k.data.to_bytes(), *v);
        }
        for (k, v) in &compiled.endpoints_v4 {
            self.endpoints_v4.insert(IpKeyV4 { epoch, ..*k }, *v);
        }
        for (k, v) in &compiled.endpoints_v6 {
            self.endpoints_v6.insert(IpKeyV6 { epoch, ..*k }, *v);
        }
        for (k, v) in &compiled.policy {
            let k = Lpm {
                data: PolicyKey { epoch, ..k.data },
                ..*k
            };
            self.policy.insert(k.prefix_len, &k.data.to_bytes(), *v);
        }
    }

    /// The single store that makes an epoch live.
    pub fn switch_to(&mut self, epoch: u8) {
        self.state.epoch = epoch as u32;
    }

    /// Deletes every entry of `epoch` (after the switch away from it).
    pub fn delete_epoch(&mut self, epoch: u8) {
        // The epoch is the first byte of every key.
        self.ipcache_v4.retain(|bytes| bytes[0] != epoch);
        self.ipcache_v6.retain(|bytes| bytes[0] != epoch);
        self.endpoints_v4.retain(|k, _| k.epoch != epoch);
        self.endpoints_v6.retain(|k, _| k.epoch != epoch);
        self.policy.retain(|bytes| bytes[0] != epoch);
    }

    /// Entries in all maps (both epochs).
    pub fn len(&self) -> usize {
        self.ipcache_v4.len()
            + self.ipcache_v6.len()
            + self.endpoints_v4.len()
            + self.endpoints_v6.len()
            + self.policy.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One direction's check, exactly as the datapath performs it (steps of `lb_common::policy`).
    pub fn check(&self, packet: &Packet, dir: Direction) -> Check {
        // 1. The epoch, read once.
        let epoch = self.state.epoch as u8;
        let (local, peer) = match dir {
            Direction::Ingress => (packet.dst, packet.src),
            Direction::Egress => (packet.src, packet.dst),
        };
        // 2. The local endpoint.
        let endpoint = match local {
            IpAddr::V4(a) => self.endpoints_v4.get(&IpKeyV4::exact(epoch, a)),
            IpAddr::V6(a) => self.endpoints_v6.get(&IpKeyV6::exact(epoch, a)),
        };
        let Some(endpoint) = endpoint else {
            return Check {
                direction: dir,
                decision: Decision {
                    verdict: Verdict::Allow,
                    reason: Reason::NoLocalEndpoint,
                    rule_id: 0,
                },
                endpoint_identity: None,
                peer_identity: None,
            };
        };
        // 3. The peer's identity, longest prefix.
        let peer_entry = match peer {
            IpAddr::V4(a) => {
                let key = IpKeyV4::lookup(epoch, u32::from_ne_bytes(a.octets()));
                self.ipcache_v4.get(key.prefix_len, &key.data.to_bytes())
            }
            IpAddr::V6(a) => {
                let key = IpKeyV6::lookup(epoch, IpKeyV6::exact(epoch, a).addr);
                self.ipcache_v6.get(key.prefix_len, &key.data.to_bytes())
            }
        };
        let peer_identity = peer_entry.map_or(identity::WORLD, |e| e.identity);
        // 4. The exact peer, the world class (peers outside the cluster) and the wildcard peer,
        //    longest prefix each.
        let lookup = |peer: u32| {
            let key = PolicyKey::lookup(
                epoch,
                dir,
                endpoint.identity,
                peer,
                packet.protocol,
                packet.dport.to_be(),
            );
            self.policy.get(key.prefix_len, &key.data.to_bytes())
        };
        let exact = lookup(peer_identity);
        let world = identity::world_class(peer_identity).and_then(lookup);
        let any = lookup(identity::ANY);
        // 5. Deny over allow over default deny; audit.
        Check {
            direction: dir,
            decision: decide([exact, world, any], endpoint.flags),
            endpoint_identity: Some(endpoint.identity),
            peer_identity: Some(peer_identity),
        }
    }

    /// A packet crossing the node: egress of its source, then (if it passes) ingress of its
    /// destination. Returns the checks made; the last one decides.
    pub fn forward(&self, packet: &Packet) -> Vec<Check> {
        let egress = self.check(packet, Direction::Egress);
        if !egress.verdict().passes() {
            return vec![egress];
        }
        vec![egress, self.check(packet, Direction::Ingress)]
    }
}

impl CompiledPolicy {
    /// A verdict as a person reads it, e.g.
    /// `ingress deny (default_deny) by k8s:default/deny:ingress; endpoint 1234 (...), peer world-ipv4`.
    pub fn explain(&self, check: &Check) -> String {
        let d = check.decision;
        let rule = match self.rule(d.rule_id) {
            Some(r) => format!(" by {}", r.name),
            None => String::new(),
        };
        let who = match (check.endpoint_identity, check.peer_identity) {
            (Some(e), Some(p)) => format!(
                "; endpoint {}, peer {}",
                self.identity_name(e),
                self.identity_name(p)
            ),
            _ => String::new(),
        };
        format!(
            "{} {} ({}){rule}{who}",
            check.direction.name(),
            d.verdict.name(),
            d.reason.name()
        )
    }
}

/// A `BPF_MAP_TYPE_LPM_TRIE`: entries are (prefix length, key bytes); a lookup returns the entry with
/// the longest prefix whose bits equal the lookup key's.
#[derive(Clone)]
struct LpmTrie<V> {
    /// Indexed by prefix length; keys stored masked.
    by_len: Vec<HashMap<Vec<u8>, V>>,
}

impl<V> Default for LpmTrie<V> {
    fn default() -> Self {
        Self { by_len: Vec::new() }
    }
}

impl<V> fmt::Debug for LpmTrie<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LpmTrie({} entries)", self.len())
    }
}

impl<V> LpmTrie<V> {
    fn insert(&mut self, prefix_len: u32, bytes: &[u8], value: V) {
        let len = prefix_len as usize;
        assert!(len <= bytes.len() * 8, "prefix {len} longer than the key");
        // The kernel keeps host bits as given and returns them when iterating: userspace must clear
        // them, so the model refuses keys that do not.
        assert_eq!(
            mask(bytes, len),
            bytes,
            "key bits past prefix {len} must be zero"
        );
        if self.by_len.len() <= len {
            self.by_len.resize_with(len + 1, HashMap::new);
        }
        self.by_len[len].insert(bytes.to_vec(), value);
    }

    fn get(&self, prefix_len: u32, bytes: &[u8]) -> Option<&V> {
        let longest = (prefix_len as usize + 1).min(self.by_len.len());
        let mut masked = bytes.to_vec();
        (0..longest).rev().find_map(|len| {
            let level = &self.by_len[len];
            if level.is_empty() {
                return None;
            }
            mask_into(bytes, len, &mut masked);
            level.get(masked.as_slice())
        })
    }

    fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) {
        for level in &mut self.by_len {
            level.retain(|k, _| keep(k));
        }
    }

    fn len(&self) -> usize {
        self.by_len.iter().map(HashMap::len).sum()
    }
}

/// `bytes` with every bit from `bits` on cleared.
fn mask(bytes: &[u8], bits: usize) -> Vec<u8> {
    let mut out = bytes.to_vec();
    mask_into(bytes, bits, &mut out);
    out
}

fn mask_into(bytes: &[u8], bits: usize, out: &mut [u8]) {
    for (i, (o, b)) in out.iter_mut().zip(bytes).enumerate() {
        let keep = bits.saturating_sub(8 * i).min(8);
        *o = if keep == 0 {
            0
        } else {
            b & (0xffu8 << (8 - keep))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lpm_model_matches_longest_prefix() {
        let mut t = LpmTrie::default();
        t.insert(0, &[0, 0], "root");
        t.insert(8, &[0x0a, 0], "10/8");
        t.insert(12, &[0x0a, 0x10], "10.16/12");
        t.insert(16, &[0x0a, 0x11], "10.17/16");
        assert_eq!(t.get(16, &[0x0a, 0x11]), Some(&"10.17/16"));
        assert_eq!(t.get(16, &[0x0a, 0x1f]), Some(&"10.16/12"));
        assert_eq!(t.get(16, &[0x0a, 0x20]), Some(&"10/8"));
        assert_eq!(t.get(16, &[0x0b, 0x11]), Some(&"root"));
        // A shorter lookup prefix stops earlier, as in the kernel.
        assert_eq!(t.get(8, &[0x0a, 0x11]), Some(&"10/8"));
        assert_eq!(mask(&[0xff, 0xff, 0xff], 13), vec![0xff, 0xf8, 0]);
        assert_eq!(LpmTrie::<()>::default().get(16, &[0, 0]), None);
    }

    #[test]
    #[should_panic(expected = "must be zero")]
    fn lpm_model_refuses_unmasked_keys() {
        LpmTrie::default().insert(8, &[0x0a, 0x01], ());
    }
}
