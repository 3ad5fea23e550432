//! [`EventBus`]: what the agent tells `StreamEvents` subscribers — desired state changes, reconcile
//! results, health transitions, rejected config edits, policy deny and audit verdicts, flow events. A `tokio::sync::broadcast` channel: publishing
//! never blocks and never fails; a subscriber that falls more than the bus's capacity behind misses
//! the oldest events and is told how many (`EVENT_KIND_EVENTS_LOST`).

use std::{fmt, time::SystemTime};

use tokio::sync::broadcast;

use crate::{
    config::Config,
    health::{self, Target},
};

/// Default number of events a slow subscriber may fall behind before it misses some.
pub const DEFAULT_CAPACITY: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The desired state changed (config file, gRPC, Kubernetes).
    ServiceChanged,
    /// The datapath now matches the desired state.
    Reconciled,
    /// A reconcile failed; the datapath keeps its previous state.
    ReconcileFailed,
    /// A backend became healthy or unhealthy.
    HealthChanged,
    /// An invalid config file edit; the last good state stays.
    ConfigRejected,
    /// A policy deny or audit verdict (rate-limited, see `policy::enforcer`).
    PolicyVerdict,
    /// A load-balancing decision of the datapath: a new flow's backend, a drop before one was
    /// found, or a packet not forwarded to the chosen one (`crate::flow_events`, with flow events
    /// on).
    Flow,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// Human-readable description.
    pub text: String,
    /// The service's name, when the event is about one.
    pub service: Option<String>,
    /// The backend (`address:port`), when the event is about one.
    pub backend: Option<String>,
    pub at: SystemTime,
}

impl Event {
    pub fn new(kind: EventKind, text: impl Into<String>) -> Self {
        Self {
            kind,
            text: text.into(),
            service: None,
            backend: None,
            at: SystemTime::now(),
        }
    }

    /// The same event, about service `name`.
    pub fn with_service(mut self, name: impl Into<String>) -> Self {
        self.service = Some(name.into());
        self
    }

    /// The same event, about backend `backend` (e.g. a `SocketAddr`).
    pub fn with_backend(mut self, backend: impl fmt::Display) -> Self {
        self.backend = Some(backend.to_string());
        self
    }
}

/// The agent's event channel. Cloning shares it.
#[derive(Debug, Clone)]
pub struct EventBus {
    sender: broadcast::Sender<Event>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl EventBus {
    pub fn new(capacity: usize) -> Self {
        Self {
            sender: broadcast::Sender::new(capacity.max(1)),
        }
    }

    /// Sends `event` to every current subscriber; returns how many there are (0 is fine).
    pub fn publish(&self, event: Event) -> usize {
        self.sender.send(event).unwrap_or(0)
    }

    /// Events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }

    /// Current subscribers (open `StreamEvents` calls and other receivers).
    pub fn subscribers(&self) -> usize {
        self.sender.receiver_count()
    }
}

/// One [`EventKind::HealthChanged`] event per target whose `healthy` flag differs between two
/// health snapshots (targets only in `after` start healthy and are not reported; targets gone are
/// not either), about the service of `config` the target belongs to. Sorted by backend.
pub fn health_events(
    before: &health::Snapshot,
    after: &health::Snapshot,
    config: &Config,
) -> Vec<Event> {
    let mut events: Vec<(String, Event)> = after
        .iter()
        .filter_map(|(target, now)| {
            let was = before.get(target)?;
            if was.healthy == now.healthy {
                return None;
            }
            let text = if now.healthy {
                format!("{target}: healthy")
            } else {
                let reason = now.last_error.as_deref().unwrap_or("probes failed");
                format!("{target}: unhealthy ({reason})")
            };
            let mut event =
                Event::new(EventKind::HealthChanged, text).with_backend(target.socket_addr());
            if let Some(service) = service_of(target, config) {
                event = event.with_service(service);
            }
            Some((target.to_string(), event))
        })
        .collect();
    events.sort_by(|a, b| a.0.cmp(&b.0));
    events.into_iter().map(|(_, event)| event).collect()
}

/// The name of the first service of `config` that probes `target`.
fn service_of(target: &Target, config: &Config) -> Option<String> {
    config.services.iter().find_map(|service| {
        service
            .backends
            .iter()
            .any(|b| Target::for_backend(service, b).as_ref() == Some(target))
            .then(|| service.name.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_reaches_subscribers_and_never_fails() {
        let bus = EventBus::new(2);
        assert_eq!(bus.publish(Event::new(EventKind::Reconciled, "nobody")), 0);
        let mut rx = bus.subscribe();
        let event = Event::new(EventKind::HealthChanged, "down")
            .with_service("web")
            .with_backend("203.0.113.1:8080".parse::<std::net::SocketAddr>().unwrap());
        assert_eq!(bus.publish(event.clone()), 1);
        assert_eq!(rx.try_recv().unwrap(), event);
        // Falling behind loses the oldest events, with a count.
        for i in 0..3 {
            bus.publish(Event::new(EventKind::Reconciled, format!("{i}")));
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(1))
        ));
        assert_eq!(rx.try_recv().unwrap().text, "1");
    }

    #[test]
    fn health_events_report_flips_with_their_service() {
        let config = Config::from_yaml(
            "services:\n  - name: web\n    vip: 198.51.100.10\n    port: 80\n    protocol: tcp\n    \
             backends: [{address: 203.0.113.1, port: 8080}, {address: 203.0.113.2, port: 8080}]\n    \
             health_check: {type: tcp}\n",
        )
        .unwrap();
        let targets: Vec<Target> = {
            let mut t: Vec<Target> = health::targets(&config).into_iter().collect();
            t.sort_by_key(|t| t.socket_addr());
            t
        };
        let now = std::time::Instant::now();
        let before: health::Snapshot = targets
            .iter()
            .map(|t| (t.clone(), health::Health::new(now)))
            .collect();
        let mut after = before.clone();
        assert!(health_events(&before, &after, &config).is_empty());
        let down = after.get_mut(&targets[1]).unwrap();
        down.healthy = false;
        down.last_error = Some("connection refused".into());
        let events = health_events(&before, &after, &config);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::HealthChanged);
        assert_eq!(events[0].service.as_deref(), Some("web"));
        assert_eq!(events[0].backend.as_deref(), Some("203.0.113.2:8080"));
        assert_eq!(
            events[0].text,
            "tcp 203.0.113.2:8080: unhealthy (connection refused)"
        );
        let back = health_events(&after, &before, &config);
        assert_eq!(back[0].text, "tcp 203.0.113.2:8080: healthy");
    }
}
