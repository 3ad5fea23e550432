//! Pinned datapath state, in process with real packets (BPF_PROG_TEST_RUN): a second load adopts
//! the first one's maps (connection tracking, backend ids, tables, the address filter) and balances
//! before any reconcile, and its first reconcile writes nothing; an incompatible layout is refused with both sides named, or replaced on request
//! (flushing connection tracking); uninstalling removes every pin.

use std::{net::SocketAddr, path::PathBuf};

use aya::maps::{Array, Map, MapData};
use lb_agent::{
    config::Config,
    datapath::{ApplyReport, Capacity, Datapath, LoadOptions, PinOptions},
    pins::{PinDir, MAP_LAYOUT_VERSION},
};
use lb_common::{protocol, service::ServiceKey};
use lb_tests::{
    agent::TestPins,
    frames::{frame, inspect, ACK, SYN},
    test_run::{run, XDP_PASS},
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

    // Another conntrack size is another map definition.
    let err = Datapath::load_with(&options(&pins, 8192, false))
        .err()
        .expect("refused");
    let message = format!("{err:#}");
    assert!(
        message.contains("map CONNTRACK_V4: pinned type 9, key 16 B")
            && message.contains("map CONNTRACK_V6: pinned type 9, key 40 B")
            && message.contains("4096 entries")
            && message.contains("8192 entries")
            && message.contains("--replace-incompatible-state"),
        "{message}"
    );

    // Another capacity (--max-services, --max-backends): the maps it sizes are other definitions.
    let err = Datapath::load_with(&LoadOptions {
        capacity: Capacity {
            services: 64,
            backends: 256,
        },
        ..options(&pins, 4096, false)
    })
    .err()
    .expect("refused");
    let message = format!("{err:#}");
    assert!(
        message.contains("map SERVICE_STATS: pinned type 6")
            && message.contains("64 entries")
            && message.contains("map BACKENDS: pinned type 2")
            && message.contains("257 entries")
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
