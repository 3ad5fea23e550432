//! One direction's check, in the lookup order of `lb_common::policy` (steps 1–5), on the live maps.

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    policy::{
        decide, identity, with_endpoint_flags, CachedDecision, Decision, DecisionKey, Direction,
        IpKeyV4, IpKeyV6, PolicyKey, Reason, Verdict,
    },
    service::family,
};

use super::{
    maps::{
        ENDPOINTS_V4, ENDPOINTS_V6, IPCACHE_V4, IPCACHE_V6, POLICY, POLICY_DECISIONS, POLICY_STATE,
    },
    parse::Packet,
};

/// A decision with what a verdict event reports about it.
pub struct Check {
    pub decision: Decision,
    /// 0 when the enforced address is not a local endpoint.
    pub endpoint_identity: u32,
    pub peer_identity: u32,
    pub endpoint_flags: u32,
    /// Host-side interface of the endpoint (0: unknown).
    pub endpoint_ifindex: u32,
    pub epoch: u8,
}

/// Step 1: the live epoch, read once per packet.
#[inline(always)]
pub fn live_epoch() -> u8 {
    match POLICY_STATE.get(0) {
        // SAFETY: a valid map value; one aligned 4-byte load, as the agent writes it.
        Some(state) => unsafe { core::ptr::read_volatile(&state.epoch) as u8 },
        None => 0,
    }
}

#[inline(always)]
pub fn check(packet: &Packet, dir: Direction) -> Check {
    let epoch = live_epoch();
    let key = &packet.key;
    let (local, peer) = match dir {
        Direction::Ingress => (&key.dst, &key.src),
        Direction::Egress => (&key.src, &key.dst),
    };
    let v4 = key.family == family::IPV4;
    // 2. The local endpoint.
    // SAFETY: hash map values are copied out at once.
    let endpoint = unsafe {
        if v4 {
            ENDPOINTS_V4
                .get(&IpKeyV4::from_be(epoch, local.0[0]))
                .copied()
        } else {
            ENDPOINTS_V6
                .get(&IpKeyV6::from_words(epoch, local.0))
                .copied()
        }
    };
    let Some(endpoint) = endpoint else {
        return Check {
            decision: Decision {
                verdict: Verdict::Allow,
                reason: Reason::NoLocalEndpoint,
                rule_id: 0,
            },
            endpoint_identity: 0,
            peer_identity: 0,
            endpoint_flags: 0,
            endpoint_ifindex: 0,
            epoch,
        };
    };
    // 3. The peer's identity, longest prefix; a miss is world.
    let peer_entry = if v4 {
        let k = IpKeyV4::lookup(epoch, peer.0[0]);
        IPCACHE_V4.get(Key::new(k.prefix_len, k.data)).copied()
    } else {
        let k = IpKeyV6::lookup(epoch, peer.0);
        IPCACHE_V6.get(Key::new(k.prefix_len, k.data)).copied()
    };
    let peer_identity = peer_entry.map_or(identity::WORLD, |e| e.identity);
    // 4–5, from the cache of earlier outcomes, or the three lookups.
    let cache_key = DecisionKey {
        epoch,
        direction: dir as u8,
        protocol: key.protocol,
        _pad: 0,
        endpoint_identity: endpoint.identity,
        peer_identity,
        dport: packet.dport,
        _pad2: 0,
    };
    // SAFETY: copied out at once.
    let cached = if decision_cache_enabled() {
        unsafe { POLICY_DECISIONS.get(&cache_key) }.copied()
    } else {
        None
    };
    let decision = match cached.and_then(|c| Reason::from_u8(c.reason).map(|r| (r, c.rule_id))) {
        Some((reason, rule_id)) => with_endpoint_flags(reason, rule_id, endpoint.flags),
        None => {
            let decision = lookup_rules(epoch, dir, endpoint.identity, peer_identity, packet);
            if decision_cache_enabled() {
                let outcome = CachedDecision {
                    reason: decision.reason as u8,
                    _pad: [0; 3],
                    rule_id: decision.rule_id,
                };
                // A full LRU evicts its oldest entry; a failure only costs the next packet a walk.
                let _ = POLICY_DECISIONS.insert(&cache_key, &outcome, 0);
            }
            with_endpoint_flags(decision.reason, decision.rule_id, endpoint.flags)
        }
    };
    Check {
        decision,
        endpoint_identity: endpoint.identity,
        peer_identity,
        endpoint_flags: endpoint.flags,
        endpoint_ifindex: endpoint.ifindex,
        epoch,
    }
}

/// Set at load time (`EbpfLoader::set_global`): 0 turns the `POLICY_DECISIONS` cache off (for
/// measuring the lookups themselves).
#[unsafe(no_mangle)]
static POLICY_DECISION_CACHE: u32 = 1;

#[inline(always)]
fn decision_cache_enabled() -> bool {
    // SAFETY: a global of this program.
    unsafe { core::ptr::read_volatile(&POLICY_DECISION_CACHE) != 0 }
}

/// Step 4 and 5 without the endpoint's flags: exact peer, world class, any peer, all three looked up.
#[inline(always)]
fn lookup_rules(
    epoch: u8,
    dir: Direction,
    endpoint_identity: u32,
    peer_identity: u32,
    packet: &Packet,
) -> Decision {
    let lookup = |peer_id: u32| {
        let k = PolicyKey::lookup(
            epoch,
            dir,
            endpoint_identity,
            peer_id,
            packet.key.protocol,
            packet.dport,
        );
        POLICY.get(Key::new(k.prefix_len, k.data)).copied()
    };
    let exact = lookup(peer_identity);
    let world = match identity::world_class(peer_identity) {
        Some(world) => lookup(world),
        None => None,
    };
    let any = lookup(identity::ANY);
    decide([exact.as_ref(), world.as_ref(), any.as_ref()], 0)
}
