//! Pinned datapath state, in process with real packets (BPF_PROG_TEST_RUN): a second load adopts
//! the first one's maps (connection tracking, backend ids, tables, the address filter) and balances
//! before any reconcile, and its first reconcile writes nothing; maps of another size (conntrack,
//! capacity) are carried over into the new sizes; an incompatible layout is refused with both
//! sides named, or replaced on request (flushing connection tracking); uninstalling removes every
//! pin; a map new in this agent (`FLOW_EVENTS`) is created next to the adopted ones; a reload
//! with other load-time settings keeps flows and the address filter.

use std::{net::SocketAddr, path::PathBuf};

use aya::{
    maps::{Array, Map, MapData},
    programs::Xdp,
};
use aya_obj::programs::XdpAttachType;
use lb_agent::{
    config::Config,
    datapath::{ApplyReport, Capacity, Datapath, LoadOptions, PinOptions, ProgramSettings},
    pins::{PinDir, MAP_LAYOUT_VERSION},
};
use lb_common::{protocol, service::ServiceKey};
use lb_tests::{
    agent::TestPins,
    frames::{frame, inspect, ACK, SYN},
    test_run::{drain_flow_events, run, XDP_PASS},
};

const CONFIG: &str = "
services:
  - name: web
    vip: 198.51.100.10
    port: 80
    protocol: tcp
    maglev_table_size: 251
    backends:
      - { address: 203.0.113.11, port: 8080 }
      - { address: 203.0.113.12, port: 8080 }
      - { address: 203.0.113.13, port: 8080 }
  - name: web6
    vip: 2001:db8:100::10
    port: 443
    protocol: tcp
    mode: snat
    snat_address: 2001:db8:100::1
    maglev_table_size: 251
    backends:
      - { address: 2001:db8:203::11, port: 8443 }
";

const VIP: &str = "198.51.100.10:80";

fn options(pins: &TestPins, conntrack_entries: u32, replace: bool) -> LoadOptions {
    LoadOptions {
        conntrack_entries,
        conntrack_entries_v6: None,
        pins: Some(PinOptions {
            dir: pins.path().into(),
            replace_incompatible_state: replace,
        }),
        ..Default::default()
    }
}

fn load(pins: &TestPins) -> Datapath {
    Datapath::load_with(&options(pins, 4096, false)).expect("load pinned datapath")
}

/// Sends one TCP segment client → VIP; returns the backend it was rewritten to.
fn send(datapath: &mut Datapath, l4: lb_tests::frames::L4, client: SocketAddr) -> SocketAddr {
    let vip: SocketAddr = VIP.parse().unwrap();
    let (action, out) = run(datapath.xdp_program(), &frame(l4, client, vip, b"x"));
    assert_eq!(action, XDP_PASS);
    inspect(&out).dst
}

/// A first agent pins the datapath with `CONFIG` applied and one tracked flow from `client`, then
/// goes; returns the flow's backend.
fn pin_one_flow(pins: &TestPins, client: SocketAddr) -> SocketAddr {
    let mut first = load(pins);
    first.apply(&Config::from_yaml(CONFIG).unwrap()).unwrap();
    send(&mut first, SYN, client)
}

fn web_key() -> ServiceKey {
    let vip: SocketAddr = VIP.parse().unwrap();
    ServiceKey::new(vip.ip(), vip.port(), protocol::TCP)
}

#[test]
fn adoption_keeps_flows_backend_ids_and_tables() {
    let pins = TestPins::new();
    let config = Config::from_yaml(CONFIG).unwrap();
    let client: SocketAddr = "192.0.2.7:40000".parse().unwrap();

    let mut first = load(&pins);
    let err = Datapath::load_with(&options(&pins, 4096, false))
        .err()
        .expect("one datapath per pin directory");
    assert!(
        format!("{err:#}").contains("another lb-agent is using"),
        "{err:#}"
    );
    assert!(
        PinDir::new(pins.path()).remove_all().is_err(),
        "no uninstall under a running datapath"
    );
    first.apply(&config).unwrap();
    let backend = send(&mut first, SYN, client);
    let table = first.table_of(&web_key()).unwrap();
    assert_eq!(first.conntrack_entries().unwrap(), 1);
    drop(first);

    let mut second = load(&pins);
    // Before any reconcile: the address prefilter, a global the new load starts zeroed, holds the
    // pinned words (a zero filter would pass the flow untranslated, to the VIP).
    assert_ne!(
        second.address_filter_roles(web_key().vip()).unwrap(),
        0,
        "the pinned address filter is carried over"
    );
    assert_eq!(
        send(&mut second, ACK, client),
        backend,
        "balanced before any reconcile"
    );
    assert_eq!(second.conntrack_entries().unwrap(), 1, "conntrack survives");
    assert_eq!(second.table_of(&web_key()).unwrap(), table);
    assert_eq!(
        second.apply(&config).unwrap(),
        ApplyReport {
            services_examined: 2,
            ..ApplyReport::default()
        },
        "the first reconcile after adoption compares every service and writes nothing"
    );

    // Drain the flow's backend: new flows avoid it, the tracked flow stays on it, which only the
    // adopted conntrack entry can explain.
    let entry = format!("address: {}, port: {}", backend.ip(), backend.port());
    let drained = CONFIG.replace(&entry, &format!("{entry}, weight: 0"));
    assert_ne!(drained, CONFIG, "backend {backend} found in the config");
    let report = second.apply(&Config::from_yaml(&drained).unwrap()).unwrap();
    assert_eq!(report.backends_written, 0, "backend ids kept: {report:?}");
    assert_eq!(report.tables_swapped, 1, "{report:?}");
    assert_eq!(send(&mut second, ACK, client), backend);
    for port in 41000..41050 {
        let other: SocketAddr = format!("192.0.2.7:{port}").parse().unwrap();
        assert_ne!(
            send(&mut second, SYN, other),
            backend,
            "new flow to a drained backend"
        );
    }
}

fn set_layout_version(pins: &TestPins, version: u32) {
    let data = MapData::from_pin(pins.path().join("LAYOUT")).unwrap();
    let mut layout: Array<MapData, u32> =
        Array::try_from(Map::from_map_data(data).unwrap()).unwrap();
    layout.set(0, version, 0).unwrap();
}

#[test]
fn incompatible_state_is_refused_or_replaced() {
    let pins = TestPins::new();
    let config = Config::from_yaml(CONFIG).unwrap();
    let mut first = load(&pins);
    first.apply(&config).unwrap();
    send(&mut first, SYN, "192.0.2.7:40000".parse().unwrap());
    drop(first);

    // Another value size is another map definition (another agent's `Backend`, say).
    let path = pins.path().join("maps/BACKENDS");
    std::fs::remove_file(&path).unwrap();
    Array::<MapData, u64>::create(4096, 0)
        .unwrap()
        .pin(&path)
        .unwrap();
    let err = Datapath::load_with(&options(&pins, 4096, false))
        .err()
        .expect("refused");
    let message = format!("{err:#}");
    assert!(
        message.contains("map BACKENDS: pinned type 2, key 4 B, value 8 B")
            && message.contains("--replace-incompatible-state"),
        "{message}"
    );

    // Another layout version.
    set_layout_version(&pins, MAP_LAYOUT_VERSION + 1);
    let err = Datapath::load_with(&options(&pins, 4096, false))
        .err()
        .expect("refused");
    let message = format!("{err:#}");
    assert!(
        message.contains(&format!(
            "pinned map layout version {}, this agent uses version {MAP_LAYOUT_VERSION}",
            MAP_LAYOUT_VERSION + 1
        )) && message.contains("--replace-incompatible-state"),
        "{message}"
    );

    // The refusals changed nothing; replacing starts fresh (connection tracking flushed) with this
    // agent's layout, which the next load adopts.
    let mut replaced =
        Datapath::load_with(&options(&pins, 8192, true)).expect("replace incompatible state");
    assert_eq!(replaced.conntrack_entries().unwrap(), 0);
    assert_eq!(
        replaced.apply(&config).unwrap().services_written,
        2,
        "fresh maps"
    );
    drop(replaced);
    let adopted = Datapath::load_with(&options(&pins, 8192, false)).expect("adopt");
    assert!(adopted.table_of(&web_key()).is_some());
    drop(adopted);

    let dir: PathBuf = pins.path().into();
    assert!(PinDir::new(&dir).remove_all().unwrap() > 10);
    assert!(!dir.exists(), "{} removed", dir.display());
}

/// The pinned maps' number of entries, as the kernel reports it.
fn pinned_entries(pins: &TestPins, map: &str) -> u32 {
    aya::maps::MapInfo::from_pin(pins.path().join("maps").join(map))
        .unwrap()
        .max_entries()
}

/// An agent started with another `--conntrack-entries`, `--max-services` and `--max-backends` than
/// the pinned maps carries them over: tracked flows keep their backends (also a flow the previous
/// program started between the load and the attach), service and backend ids, tables and
/// statistics stay, and the pins name the new maps once `finish_resize` ran. Shrinking below what
/// is in use is refused and changes nothing.
#[test]
fn maps_of_another_size_are_carried_over() {
    let pins = TestPins::new();
    let config = Config::from_yaml(CONFIG).unwrap();
    let sized = |conntrack, services, backends| LoadOptions {
        capacity: Capacity { services, backends },
        ..options(&pins, conntrack, false)
    };
    let client: SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let late: SocketAddr = "192.0.2.8:40000".parse().unwrap();

    let mut first = Datapath::load_with(&sized(4096, 64, 256)).unwrap();
    first.apply(&config).unwrap();
    let backend = send(&mut first, SYN, client);
    let stats = first.service_stats(&web_key()).unwrap().unwrap();
    let table = first.table_of(&web_key()).unwrap();
    drop(first);
    // What the links still run until the new programs replace it.
    let mut previous = Xdp::from_pin(
        pins.path().join("programs/lb_xdp"),
        XdpAttachType::Interface,
    )
    .unwrap();

    let mut second = Datapath::load_with(&sized(8192, 128, 512)).expect("resized");
    assert_eq!(second.conntrack_entries().unwrap(), 1, "the tracked flow");
    assert_eq!(second.table_of(&web_key()).unwrap(), table);
    assert_eq!(
        second.service_stats(&web_key()).unwrap().unwrap(),
        stats,
        "statistics carried over"
    );
    // A flow the previous program starts before the new one is attached.
    let vip: SocketAddr = VIP.parse().unwrap();
    let (action, out) = run(&mut previous, &frame(SYN, late, vip, b"x"));
    assert_eq!(action, XDP_PASS);
    let late_backend = inspect(&out).dst;
    assert_eq!(
        second.conntrack_entries().unwrap(),
        1,
        "the late flow is in the pinned map only"
    );
    assert_eq!(
        pinned_entries(&pins, "CONNTRACK_V4"),
        4096,
        "pins unchanged until the finish"
    );
    second.finish_resize().unwrap();
    assert_eq!(second.conntrack_entries().unwrap(), 2, "the late flow too");
    for (map, entries) in [
        ("CONNTRACK_V4", 8192),
        ("CONNTRACK_V6", 8192),
        ("NAT_REPLY", 8192),
        ("SERVICES", 128),
        ("MAGLEV_TABLES", 256),
        ("BACKENDS", 513),
        ("BACKEND_STATS", 513),
    ] {
        assert_eq!(pinned_entries(&pins, map), entries, "{map}");
    }
    let report = second.apply(&config).unwrap();
    assert!(
        !report.wrote_anything(),
        "ids and tables carried over: nothing to write ({report:?})"
    );

    // Drain both flows' backends: new flows avoid them, the tracked flows stay on them, which only
    // the carried-over entries can explain.
    let mut drained = CONFIG.to_string();
    for b in [backend, late_backend] {
        let entry = format!("address: {}, port: {}", b.ip(), b.port());
        if !drained.contains(&format!("{entry}, weight: 0")) {
            drained = drained.replace(&entry, &format!("{entry}, weight: 0"));
        }
    }
    second.apply(&Config::from_yaml(&drained).unwrap()).unwrap();
    assert_eq!(send(&mut second, ACK, client), backend);
    assert_eq!(send(&mut second, ACK, late), late_backend);
    for port in 41000..41030 {
        let other: SocketAddr = format!("192.0.2.7:{port}").parse().unwrap();
        let chosen = send(&mut second, SYN, other);
        assert!(
            chosen != backend && chosen != late_backend,
            "new flow to a drained backend"
        );
    }
    drop(second);

    // One service for two in use (their tables' slots too): refused, nothing pinned changes.
    let err = Datapath::load_with(&sized(8192, 1, 512))
        .err()
        .expect("refused");
    let message = format!("{err:#}");
    assert!(
        message.contains("carrying MAGLEV_TABLES over from 256 to 2 entries")
            && message.contains("is in use, beyond the new size 2"),
        "{message}"
    );
    assert_eq!(pinned_entries(&pins, "SERVICE_SLOTS"), 128);
    let mut third = Datapath::load_with(&sized(8192, 128, 512)).expect("adopted as it was");
    assert_eq!(third.conntrack_entries().unwrap(), 32);
    assert_eq!(send(&mut third, ACK, client), backend);
}

/// `FRAGMENTS`, whose entries live for moments, pinned with another definition (an agent whose
/// `FragmentEntry` differs): recreated empty instead of refused, and pinned with this agent's
/// definition once the resize finishes; the tracked flow stays.
#[test]
fn a_transient_map_of_another_definition_is_recreated() {
    let pins = TestPins::new();
    let client: SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let backend = pin_one_flow(&pins, client);
    let path = pins.path().join("maps/FRAGMENTS");
    std::fs::remove_file(&path).unwrap();
    Array::<MapData, u64>::create(16, 0)
        .unwrap()
        .pin(&path)
        .unwrap();

    let mut second = load(&pins);
    assert_eq!(send(&mut second, ACK, client), backend, "the flow stays");
    assert_eq!(pinned_entries(&pins, "FRAGMENTS"), 16, "until the finish");
    second.finish_resize().unwrap();
    let pinned = aya::maps::MapInfo::from_pin(&path).unwrap();
    assert_eq!(
        (pinned.max_entries(), pinned.value_size()),
        (
            lb_common::fragments::limits::MAX_TRACKED_DATAGRAMS,
            std::mem::size_of::<lb_common::fragments::FragmentEntry>() as u32
        )
    );
}

/// Pins of an agent without flow events (no `FLOW_EVENTS` map) are adopted by one with them on:
/// the ring buffer is created next to the adopted maps, the tracked flow stays on its backend (a
/// conntrack hit, not reported) and a new flow is reported; the next agent, with flow events off,
/// adopts the pinned ring buffer too.
#[test]
fn flow_events_are_added_to_the_pins_of_an_agent_without_them() {
    let pins = TestPins::new();
    let client: SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let backend = pin_one_flow(&pins, client);
    let ring_pin = pins.path().join("maps/FLOW_EVENTS");
    std::fs::remove_file(&ring_pin).expect("FLOW_EVENTS pinned");

    let mut second = Datapath::load_with(&LoadOptions {
        flow_events: true,
        ..options(&pins, 4096, false)
    })
    .expect("adopts the pins of an agent without FLOW_EVENTS");
    assert!(ring_pin.exists(), "FLOW_EVENTS created and pinned");
    let mut ring = second.take_flow_events().unwrap();
    assert_eq!(send(&mut second, ACK, client), backend, "the flow stays");
    assert_eq!(drain_flow_events(&mut ring), []);
    let other: SocketAddr = "192.0.2.7:40001".parse().unwrap();
    let other_backend = send(&mut second, SYN, other);
    let events = drain_flow_events(&mut ring);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        events[0].backend,
        lb_common::service::Addr::from_ip(other_backend.ip())
    );
    drop((ring, second));

    let mut third = load(&pins);
    assert_eq!(send(&mut third, ACK, other), other_backend);
}

/// `Datapath::reload` in process: the programs loaded again with flow events on, on the pinned
/// maps, keep a tracked flow on its backend and the address filter's words (the new load's filter
/// starts zeroed: without the copy the VIP's packets would pass untranslated), report a new flow,
/// and the program pin names the new program; reloading with the same settings does nothing.
#[test]
fn a_reload_with_other_settings_keeps_flows_and_the_address_filter() {
    let pins = TestPins::new();
    let client: SocketAddr = "192.0.2.7:40100".parse().unwrap();
    let mut datapath = load(&pins);
    datapath.apply(&Config::from_yaml(CONFIG).unwrap()).unwrap();
    let backend = send(&mut datapath, SYN, client);
    let program_pin = PinDir::new(pins.path()).program("lb_xdp");
    let program_id = || {
        Xdp::from_pin(&program_pin, XdpAttachType::Interface)
            .unwrap()
            .info()
            .unwrap()
            .id()
    };
    let before = program_id();
    let settings = datapath.settings();
    assert!(!settings.flow_events);

    let on = ProgramSettings {
        flow_events: true,
        ..settings
    };
    assert!(datapath.reload(on).expect("reload"));
    assert!(
        !datapath.reload(on).expect("same settings"),
        "nothing to do"
    );
    assert_eq!(datapath.settings(), on);
    assert_ne!(program_id(), before, "the new program is pinned");
    assert_ne!(datapath.address_filter_roles(web_key().vip()).unwrap(), 0);
    let mut ring = datapath.take_flow_events().expect("FLOW_EVENTS");
    for _ in 0..3 {
        assert_eq!(
            send(&mut datapath, ACK, client),
            backend,
            "tracked flow kept"
        );
    }
    assert_eq!(drain_flow_events(&mut ring), [], "conntrack hits");
    send(&mut datapath, SYN, "192.0.2.7:40101".parse().unwrap());
    assert_eq!(
        drain_flow_events(&mut ring).len(),
        1,
        "the new flow reported"
    );
    assert_eq!(datapath.conntrack_entries().unwrap(), 2);
}
