//! How each backend's DNAT replies find their VIP (`lb_common::conntrack::BackendReply`): from the
//! backend's address and port alone (`BACKEND_REPLY`, no per-flow entry: one LRU insert less per new
//! flow) while it serves a single DNAT frontend, from each flow's `NAT_REPLY` entry once several
//! frontends share it (or a SNAT one, or when a port is 0: the reply's ports then vary per flow).
//!
//! Sharing is sticky while the backend keeps its id: a tracked flow keeps its backend as long as
//! the backend exists, so flows of a frontend the backend has left, or of the frontend it served
//! alone before (they have no `NAT_REPLY` entry), may still send replies.

use lb_common::{
    conntrack::{backend_reply_flags, BackendReply},
    service::{backend_flags, mode, Backend, ServiceKey},
};

/// What the datapath holds for one backend's replies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyRoute {
    /// The frontend (VIP, port, protocol) the backend served alone when it got its id, if it did:
    /// the VIP of its `BACKEND_REPLY` entry, kept as the fallback once it is shared.
    pub alone: Option<ServiceKey>,
    /// Its new DNAT flows write `NAT_REPLY` entries (`backend_flags::SHARED_REPLIES`).
    pub shared: bool,
}

impl ReplyRoute {
    /// The route of `backend` serving `frontends` (its services' keys and modes, each once), after
    /// `previous` (`None`: the backend id is new).
    pub fn next(
        previous: Option<ReplyRoute>,
        backend: &Backend,
        frontends: &[(ServiceKey, u8)],
    ) -> Self {
        let single = match frontends {
            [(key, mode::DNAT)] if key.port != 0 && backend.port != 0 => Some(*key),
            _ => None,
        };
        match previous {
            None => Self {
                alone: single,
                shared: single.is_none(),
            },
            Some(previous) => Self {
                alone: previous.alone,
                shared: previous.shared || single.is_none() || single != previous.alone,
            },
        }
    }

    /// `backend` as the `BACKENDS` entry of this route.
    pub fn flagged(&self, mut backend: Backend) -> Backend {
        if self.shared {
            backend.flags |= backend_flags::SHARED_REPLIES;
        }
        backend
    }

    /// The `BACKEND_REPLY` entry of `backend` on this route, if it has one.
    pub fn entry(&self, backend: &Backend) -> Option<(ServiceKey, BackendReply)> {
        let frontend = self.alone?;
        let key = ServiceKey {
            addr: backend.addr,
            port: backend.port,
            protocol: frontend.protocol,
            family: backend.family,
        };
        let reply = BackendReply {
            vip: frontend.addr,
            vip_port: frontend.port,
            flags: if self.shared {
                backend_reply_flags::SHARED
            } else {
                0
            },
            _pad: 0,
        };
        Some((key, reply))
    }

    /// The route an adopted backend had, from its `BACKENDS` entry and its `BACKEND_REPLY` entry.
    pub fn adopted(backend: &Backend, entry: Option<(ServiceKey, BackendReply)>) -> Self {
        Self {
            alone: entry.map(|(key, reply)| ServiceKey {
                addr: reply.vip,
                port: reply.vip_port,
                protocol: key.protocol,
                family: key.family,
            }),
            shared: backend.has_shared_replies(),
        }
    }
}

#[cfg(test)]
mod tests {
    use lb_common::protocol;

    use super::*;

    fn vip(port: u16) -> ServiceKey {
        ServiceKey::new("198.51.100.1".parse().unwrap(), port, protocol::TCP)
    }

    fn backend(port: u16) -> Backend {
        Backend::new("203.0.113.1".parse().unwrap(), port)
    }

    #[test]
    fn a_single_dnat_frontend_is_served_alone() {
        let route = ReplyRoute::next(None, &backend(8080), &[(vip(80), mode::DNAT)]);
        assert_eq!(
            route,
            ReplyRoute {
                alone: Some(vip(80)),
                shared: false
            }
        );
        let (key, reply) = route.entry(&backend(8080)).unwrap();
        assert_eq!(
            (key.addr, key.port, key.protocol),
            (backend(8080).addr, 8080u16.to_be(), protocol::TCP)
        );
        assert_eq!(
            (reply.vip, reply.vip_port, reply.flags),
            (vip(80).addr, 80u16.to_be(), 0)
        );
        assert!(!route.flagged(backend(8080)).has_shared_replies());
        // Unchanged on the next apply.
        assert_eq!(
            ReplyRoute::next(Some(route), &backend(8080), &[(vip(80), mode::DNAT)]),
            route
        );
    }

    #[test]
    fn shared_snat_and_any_port_backends_need_flow_entries() {
        for (b, frontends) in [
            (8080, vec![(vip(80), mode::DNAT), (vip(81), mode::DNAT)]),
            (8080, vec![(vip(80), mode::SNAT)]),
            (0, vec![(vip(80), mode::DNAT)]),
            (8080, vec![(vip(0), mode::DNAT)]),
        ] {
            let route = ReplyRoute::next(None, &backend(b), &frontends);
            assert_eq!(
                route,
                ReplyRoute {
                    alone: None,
                    shared: true
                },
                "{frontends:?}"
            );
            assert!(route.entry(&backend(b)).is_none());
            assert!(route.flagged(backend(b)).has_shared_replies());
        }
    }

    #[test]
    fn sharing_is_sticky_and_keeps_the_first_frontend_as_fallback() {
        let alone = ReplyRoute::next(None, &backend(8080), &[(vip(80), mode::DNAT)]);
        let shared = ReplyRoute::next(
            Some(alone),
            &backend(8080),
            &[(vip(80), mode::DNAT), (vip(81), mode::DNAT)],
        );
        assert_eq!(
            shared,
            ReplyRoute {
                alone: Some(vip(80)),
                shared: true
            }
        );
        assert_eq!(
            shared.entry(&backend(8080)).unwrap().1.flags,
            backend_reply_flags::SHARED
        );
        // Back to one frontend: the other's flows may still be alive.
        assert_eq!(
            ReplyRoute::next(Some(shared), &backend(8080), &[(vip(80), mode::DNAT)]),
            shared
        );
        // Moved to another frontend: the first one's flows may still be alive.
        let moved = ReplyRoute::next(Some(alone), &backend(8080), &[(vip(81), mode::DNAT)]);
        assert_eq!(moved, shared);
        // Adopted from the maps as written.
        let b = shared.flagged(backend(8080));
        assert_eq!(ReplyRoute::adopted(&b, shared.entry(&b)), shared);
    }
}
