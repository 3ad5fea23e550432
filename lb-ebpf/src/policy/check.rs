//! One direction's check, in the lookup order of `lb_common::policy` (steps 1–5), on the live maps.

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    policy::{decide, identity, Decision, Direction, IpKeyV4, IpKeyV6, PolicyKey, Reason, Verdict},
    service::family,
};

use super::{
    maps::{ENDPOINTS_V4, ENDPOINTS_V6, IPCACHE_V4, IPCACHE_V6, POLICY, POLICY_STATE},
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
    // 4. Exact peer, world class, any peer; all three looked up.
    let lookup = |peer_id: u32| {
        let k = PolicyKey::lookup(
            epoch,
            dir,
            endpoint.identity,
            peer_id,
            key.protocol,
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
    // 5. Deny over allow over default deny; audit.
    Check {
        decision: decide(
            [exact.as_ref(), world.as_ref(), any.as_ref()],
            endpoint.flags,
        ),
        endpoint_identity: endpoint.identity,
        peer_identity,
        endpoint_flags: endpoint.flags,
        endpoint_ifindex: endpoint.ifindex,
        epoch,
    }
}
