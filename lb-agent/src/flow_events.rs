//! Flow events (`lb_common::flow_events`, `--flow-events` or the config's `flow_events`): the
//! datapath's new-flow backend choices, drops before a choice and packets not forwarded after one,
//! read from the `FLOW_EVENTS` ring buffer as soon as it has data and published on the
//! agent's event stream ([`EventKind::Flow`]: `lbctl events`, gRPC `StreamEvents`), with the
//! service's name from the applied config and the backend's address and id. Events are not logged
//! one by one (a busy node makes thousands per second); the datapath counts the ones a full ring
//! buffer lost (`flow_events_lost`). Whether the programs report them at all is [`switch`]'s to
//! say (the flag, the config file, or the gRPC API's `SetFlowEvents`).

pub mod saved;
pub mod switch;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use lb_common::{
    counters::Counter,
    flow_events::{choice, kind, FlowEvent},
};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::watch,
    task::JoinHandle,
};
use tracing::warn;

use crate::{
    config::Config,
    grpc::{AppliedView, Event, EventBus, EventKind},
    inspect::{mode_name, protocol_name},
    metrics::Metrics,
};

/// The event a ring buffer record holds; `None` for a record of another size.
pub fn decode(record: &[u8]) -> Option<FlowEvent> {
    (record.len() >= size_of::<FlowEvent>()).then(|| {
        // SAFETY: the datapath writes whole `FlowEvent`s (integers only); read unaligned.
        unsafe { std::ptr::read_unaligned(record.as_ptr() as *const FlowEvent) }
    })
}

/// The names of the services of an applied config by (VIP, port, protocol number), for looking up
/// the service of each event at once however many services there are.
#[derive(Debug, Default)]
pub struct ServiceNames(HashMap<(IpAddr, u16, u8), String>);

impl ServiceNames {
    pub fn of(applied: &Config) -> Self {
        Self(
            applied
                .services
                .iter()
                .map(|s| ((s.vip, s.port, s.protocol.number()), s.name.clone()))
                .collect(),
        )
    }

    /// The service that takes `vip` (its exact port first, then the VIP's all-ports service).
    fn of_vip(&self, vip: SocketAddr, protocol: u8) -> Option<&str> {
        let name = |port| self.0.get(&(vip.ip(), port, protocol));
        name(vip.port()).or_else(|| name(0)).map(String::as_str)
    }
}

/// `event` as the agent publishes it, about the service it names (by its VIP, port and protocol),
/// e.g.
/// `new flow tcp 192.0.2.2:40000 -> 198.51.100.10:80 service web (id 0) backend 203.0.113.11:8080
/// (id 1) dnat choice new`, `drop tcp 192.0.2.2:40001 -> 198.51.100.11:80 service empty (id 4)
/// dnat reason drop_no_backend` or `not forwarded tcp 192.0.2.2:40002 -> 198.51.100.12:80 service
/// l2 (id 5) backend 203.0.113.11:80 (id 2) dsr-l2 reason drop_dsr_no_neigh`.
pub fn describe(event: &FlowEvent, services: &ServiceNames) -> Event {
    let flow = &event.flow;
    let client = SocketAddr::new(flow.src.to_ip(flow.family), u16::from_be(flow.src_port));
    let vip = SocketAddr::new(flow.dst.to_ip(flow.family), u16::from_be(flow.dst_port));
    let protocol = protocol_name(flow.protocol);
    let service = services.of_vip(vip, flow.protocol);
    let head = format!(
        "{protocol} {client} -> {vip} service {} (id {}) ",
        service.unwrap_or("?"),
        event.service_id
    );
    let backend = SocketAddr::new(
        event.backend.to_ip(flow.family),
        u16::from_be(event.backend_port),
    );
    let reason = Counter::ALL
        .get(event.reason as usize)
        .map_or("unknown", |c| c.name());
    let mode = mode_name(event.mode);
    let mut out = match event.kind {
        kind::NEW_FLOW => Event::new(
            EventKind::Flow,
            format!(
                "new flow {head}backend {backend} (id {}) {mode} choice {}",
                event.backend_id,
                choice::name(event.choice)
            ),
        )
        .with_backend(backend),
        kind::NOT_FORWARDED => Event::new(
            EventKind::Flow,
            format!(
                "not forwarded {head}backend {backend} (id {}) {mode} reason {reason}",
                event.backend_id
            ),
        )
        .with_backend(backend),
        _ => Event::new(
            EventKind::Flow,
            format!("drop {head}{mode} reason {reason}"),
        ),
    };
    if let Some(name) = service {
        out = out.with_service(name);
    }
    out
}

/// Spawns the task that publishes every event of `ring` (the datapath's `FLOW_EVENTS`) on
/// `events`, naming services after the config last applied (`applied`), and counts them in
/// `metrics` (`lb_flow_events_total`).
pub fn forward(
    ring: RingBuf<MapData>,
    events: EventBus,
    mut applied: watch::Receiver<AppliedView>,
    metrics: Arc<Metrics>,
) -> Result<JoinHandle<()>> {
    // SAFETY: the descriptor is the ring buffer map's, owned by `ring`, which the `AsyncFd` owns:
    // it stays open and the same for the `AsyncFd`'s whole life.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|err| anyhow::anyhow!("watching the flow event ring buffer: {err}"))?;
    Ok(tokio::spawn(async move {
        let mut services = ServiceNames::of(&applied.borrow_and_update().config);
        loop {
            let mut ready = match ring.readable_mut().await {
                Ok(ready) => ready,
                Err(err) => {
                    warn!("flow event forwarding stopped: {err}");
                    return;
                }
            };
            if applied.has_changed().unwrap_or(false) {
                services = ServiceNames::of(&applied.borrow_and_update().config);
            }
            let ring = ready.get_inner_mut();
            while let Some(record) = ring.next() {
                if let Some(event) = decode(&record) {
                    metrics.flow_event_published(kind::name(event.kind));
                    events.publish(describe(&event, &services));
                }
            }
            ready.clear_ready();
        }
    }))
}

#[cfg(test)]
mod tests {
    use lb_common::{
        conntrack::FlowKey,
        protocol,
        service::{family, mode, Addr},
    };

    use super::*;

    fn ip(s: &str) -> Addr {
        Addr::from_ip(s.parse().unwrap())
    }

    fn event(kind: u8, vip: &str, port: u16) -> FlowEvent {
        FlowEvent {
            timestamp_ns: 1,
            flow: FlowKey {
                src: ip("192.0.2.2"),
                dst: ip(vip),
                src_port: 40000u16.to_be(),
                dst_port: port.to_be(),
                protocol: protocol::TCP,
                family: family::IPV4,
                _pad: [0; 2],
            },
            backend: ip("203.0.113.11"),
            service_id: 3,
            backend_id: 7,
            backend_port: 8080u16.to_be(),
            kind,
            mode: mode::SNAT,
            choice: choice::CONNTRACK_MISS,
            reason: Counter::DropSnatPortsExhausted as u8,
            _pad: [0; 2],
        }
    }

    #[test]
    fn events_name_the_service_the_backend_and_the_reason() {
        let applied = ServiceNames::of(
            &Config::from_yaml(
                "services:\n  - { name: web, vip: 198.51.100.10, port: 80, protocol: tcp }\n  \
             - { name: any, vip: 198.51.100.20, port: 0, protocol: tcp }\n",
            )
            .unwrap(),
        );
        let new = describe(&event(kind::NEW_FLOW, "198.51.100.10", 80), &applied);
        assert_eq!(new.kind, EventKind::Flow);
        assert_eq!(
            new.text,
            "new flow tcp 192.0.2.2:40000 -> 198.51.100.10:80 service web (id 3) backend \
             203.0.113.11:8080 (id 7) snat choice conntrack_miss"
        );
        assert_eq!(new.service.as_deref(), Some("web"));
        assert_eq!(new.backend.as_deref(), Some("203.0.113.11:8080"));

        let drop = describe(&event(kind::DROP, "198.51.100.20", 6379), &applied);
        assert_eq!(
            drop.text,
            "drop tcp 192.0.2.2:40000 -> 198.51.100.20:6379 service any (id 3) snat reason \
             drop_snat_ports_exhausted"
        );
        assert_eq!(drop.service.as_deref(), Some("any"));
        assert_eq!(drop.backend, None);

        let not_forwarded = describe(&event(kind::NOT_FORWARDED, "198.51.100.10", 80), &applied);
        assert_eq!(
            not_forwarded.text,
            "not forwarded tcp 192.0.2.2:40000 -> 198.51.100.10:80 service web (id 3) backend \
             203.0.113.11:8080 (id 7) snat reason drop_snat_ports_exhausted"
        );
        assert_eq!(not_forwarded.backend.as_deref(), Some("203.0.113.11:8080"));
        assert_eq!(kind::name(kind::NOT_FORWARDED), "not_forwarded");

        let unknown = describe(
            &event(kind::DROP, "198.51.100.30", 80),
            &ServiceNames::default(),
        );
        assert!(
            unknown.text.contains("service ? (id 3)"),
            "{}",
            unknown.text
        );
        let bytes: [u8; 80] = unsafe { std::mem::transmute(event(kind::DROP, "192.0.2.9", 1)) };
        assert_eq!(decode(&bytes), Some(event(kind::DROP, "192.0.2.9", 1)));
        assert_eq!(decode(&bytes[..79]), None);
    }
}
