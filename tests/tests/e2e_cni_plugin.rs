//! The CNI chained plugin `lb-cni` end to end, with the test as the container runtime: Debian's
//! reference plugins `ptp` (IPAM `host-local`) create each pod's veth and address, and `lb-cni`,
//! chained after them as in a conflist, registers the pod with the real `lb-agent run` of the
//! node namespace. The agent's policy (from its config file) names the pods' workloads by
//! namespace/name and labels only: their interfaces and addresses come from the plugin. What the
//! pods get is real TCP connections.
//!
//! Nothing outlives the test, also on failure: the veths go with the namespaces (the node's and
//! the pods'), host-local's leases with its temporary data directory, the agent with its process.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use lb_agent::endpoints::interface_exists;
use lb_tests::{
    agent::{lbctl_binary, AgentProcess, ConfigFile},
    cni::{chained_config, exec, lb_cni_binary, reference_plugin, Attachment},
    netns::{self, Netns, TEST_PREFIX},
    policy_topology::{add_external_interface, EXTERNAL},
    servers::{tcp_request, TcpCountingServer},
};
use serde_json::{json, Value};

const DB_PORT: u16 = 6379;
const NETWORK: &str = "lbt-pods";
const SUBNET: &str = "198.51.100.0/24";
const SUBNET6: &str = "2001:db8:cafe::/64";

/// db accepts TCP 6379 from frontend only; the workloads have no addresses and no interface:
/// `lb-cni` brings both.
const CONFIG: &str = "\
services: []
policy:
  namespaces: [{name: default}]
  workloads:
    - {name: frontend, namespace: default, labels: {app: frontend}}
    - {name: db, namespace: default, labels: {app: db}}
    - {name: other, namespace: default, labels: {app: other}}
  rules:
    - {name: db-from-frontend, endpoints: {match_labels: {app: db}}, direction: ingress,
       action: allow, peers: [{selector: {match_labels: {app: frontend}}}], ports: [{port: 6379}]}
";

/// The conflist: ptp with host-local, then lb-cni on the agent's socket.
fn conflist(data_dir: &Path, socket: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {
                "type": "ptp",
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET}], [{"subnet": SUBNET6}]],
                    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                    "dataDir": data_dir,
                }
            },
            {"type": "lb-cni", "agentSocket": socket}
        ]
    })
}

/// A pod: its namespace, its attachment and the chain's result once added.
struct Pod {
    name: &'static str,
    ns: Netns,
    attachment: Attachment,
}

impl Pod {
    fn new(name: &'static str) -> Self {
        let ns = Netns::new(TEST_PREFIX, name).expect("pod namespace");
        let container_id = format!("{}{}{name}", TEST_PREFIX, std::process::id());
        let attachment = Attachment::kubernetes_pod(&ns, &container_id, "default", name);
        Self {
            name,
            ns,
            attachment,
        }
    }
}

/// The runtime: runs the conflist's plugins in the node namespace.
struct Runtime<'a> {
    node: &'a Netns,
    list: Value,
}

impl Runtime<'_> {
    fn plugin(&self, index: usize) -> (std::path::PathBuf, &Value) {
        let entry = &self.list["plugins"][index];
        let path = match entry["type"].as_str() {
            Some("lb-cni") => lb_cni_binary(),
            Some(name) => reference_plugin(name),
            None => panic!("plugin without type"),
        };
        (path, entry)
    }

    fn run(
        &self,
        index: usize,
        command: &str,
        pod: &Pod,
        prev: Option<&Value>,
    ) -> lb_tests::cni::PluginOutput {
        let (path, entry) = self.plugin(index);
        let config = chained_config(&self.list, entry, prev);
        exec(self.node, &path, command, &pod.attachment, &config)
            .unwrap_or_else(|e| panic!("{command} {} for {}: {e:#}", path.display(), pod.name))
    }

    /// `GC` or `STATUS` through lb-cni, which came with cniVersion 1.1.0: Debian's ptp speaks up
    /// to 1.0.0, so lb-cni gets a 1.1.0 configuration of its own, with `valid` as
    /// `cni.dev/valid-attachments` (GC). The `CNI_*` variables of `pod` are set but not read.
    fn run_v1_1(&self, command: &str, pod: &Pod, valid: &[&Pod]) -> lb_tests::cni::PluginOutput {
        let (path, entry) = self.plugin(1);
        let mut config = chained_config(&self.list, entry, None);
        config["cniVersion"] = json!("1.1.0");
        config["cni.dev/valid-attachments"] = valid
            .iter()
            .map(|p| json!({"containerID": p.attachment.container_id, "ifname": p.attachment.ifname}))
            .collect();
        exec(self.node, &path, command, &pod.attachment, &config)
            .unwrap_or_else(|e| panic!("{command} {}: {e:#}", path.display()))
    }

    /// ADD through ptp only: the pod's veth and address, no registration yet.
    fn add_network(&self, pod: &Pod) -> Value {
        self.run(0, "ADD", pod, None)
            .result(&format!("ptp ADD {}", pod.name))
    }

    /// ADD through lb-cni with ptp's result; returns lb-cni's result.
    fn add_lb(&self, pod: &Pod, prev: &Value) -> Value {
        self.run(1, "ADD", pod, Some(prev))
            .result(&format!("lb-cni ADD {}", pod.name))
    }
}

/// The pod's addresses (IPv4, IPv6) and the host side of its veth, from a result.
fn addresses_and_veth(result: &Value) -> ([IpAddr; 2], String) {
    let addresses: Vec<IpAddr> = result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .map(|ip| {
            let cidr = ip["address"].as_str().expect("address");
            cidr.split('/').next().unwrap().parse().expect("an address")
        })
        .collect();
    let [v4, v6] = addresses[..] else {
        panic!("one address per family: {addresses:?}");
    };
    assert!(v4.is_ipv4() && v6.is_ipv6(), "{addresses:?}");
    let veth = result["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .find(|i| i.get("sandbox").is_none_or(|s| s.as_str() == Some("")))
        .and_then(|i| i["name"].as_str())
        .expect("host interface");
    ([v4, v6], veth.to_string())
}

fn connects(ns: &Netns, target: SocketAddr) -> bool {
    ns.run(move || TcpStream::connect_timeout(&target, Duration::from_millis(500)).is_ok())
}

/// Waits up to 10 s for `from → target` to connect (`true`) or not (`false`); returns the last.
fn reaches_becomes(from: &Netns, target: SocketAddr, wanted: bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = connects(from, target);
        if now == wanted || Instant::now() > deadline {
            return now;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn lbctl_endpoints(socket: &Path) -> Vec<String> {
    let output = Command::new(lbctl_binary())
        .arg("--socket")
        .arg(socket)
        .arg("endpoints")
        .output()
        .expect("run lbctl");
    assert!(
        output.status.success(),
        "lbctl endpoints: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn link_exists(node: &Netns, name: &str) -> bool {
    let name = name.to_string();
    node.run(move || interface_exists(&name))
}

#[test]
fn pods_added_through_ptp_and_lb_cni_get_their_policy_until_deleted() {
    netns::remove_stale();
    let node = Netns::new(TEST_PREFIX, "cninode").expect("node namespace");
    add_external_interface(&node).expect("the agent's interface");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("host-local");
    let socket = dir.path().join("api.sock");
    let state_dir = dir.path().join("state");

    let file = ConfigFile::new(CONFIG);
    let args = [
        "--grpc-socket",
        socket.to_str().unwrap(),
        "--state-dir",
        state_dir.to_str().unwrap(),
    ];
    let agent = AgentProcess::start_with(&node, file.path(), &[EXTERNAL.to_string()], &args)
        .expect("agent starts");
    let runtime = Runtime {
        node: &node,
        list: conflist(&data_dir, &socket),
    };

    let frontend = Pod::new("frontend");
    let other = Pod::new("other");

    // VERSION, as a runtime asks before using a plugin.
    let version = runtime
        .run(1, "VERSION", &frontend, None)
        .result("lb-cni VERSION");
    assert!(
        version["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0")),
        "{version}"
    );

    // frontend and other: the whole chain.
    let mut results = Vec::new();
    for pod in [&frontend, &other] {
        let ptp = runtime.add_network(pod);
        let result = runtime.add_lb(pod, &ptp);
        assert_eq!(result, ptp, "lb-cni passes ptp's result on unchanged");
        results.push(result);
    }

    // db: ptp only so far. Nothing enforces db's rules: other reaches it.
    let db = Pod::new("db");
    let db_network = runtime.add_network(&db);
    let (db_addresses, db_veth) = addresses_and_veth(&db_network);
    assert!(
        db_addresses[0].to_string().starts_with("198.51.100.")
            && db_addresses[1].to_string().starts_with("2001:db8:cafe:"),
        "{db_addresses:?}"
    );
    let leases = db_addresses.map(|a| data_dir.join(NETWORK).join(a.to_string()));
    for lease in &leases {
        assert!(lease.is_file(), "host-local leased {}", lease.display());
    }
    let targets = db_addresses.map(|a| SocketAddr::new(a, DB_PORT));
    let servers = db_addresses.map(|a| TcpCountingServer::start(&db.ns, a, DB_PORT, "db"));
    for target in targets {
        assert!(
            reaches_becomes(&other.ns, target, true),
            "other -> db {target} before lb-cni ADD"
        );
    }

    // lb-cni ADD for db: db's ingress rule is enforced on the veth ptp made, both families.
    let db_result = runtime.add_lb(&db, &db_network);
    assert_eq!(db_result, db_network);
    for (target, server) in targets.iter().zip(&servers) {
        assert!(
            !reaches_becomes(&other.ns, *target, false),
            "other -> db {target} refused once db is registered"
        );
        let served = server.connections();
        assert_eq!(
            tcp_request(&frontend.ns, *target, b"hello").expect("frontend -> db"),
            "db"
        );
        assert!(server.connections() > served, "db {target} served frontend");
    }

    // lbctl lists the three endpoints, db's with the veth and addresses from ptp, on its workload.
    let listed = lbctl_endpoints(&socket);
    assert_eq!(listed.len(), 3, "{listed:#?}");
    let db_line = format!(
        "{db_veth} {},{} pod=default/db container={}/eth0 network={NETWORK} policy: its workload",
        db_addresses[0], db_addresses[1], db.attachment.container_id
    );
    assert!(listed.contains(&db_line), "{db_line:?} in {listed:#?}");

    // CHECK, each plugin with the chain's cached result.
    for index in [0, 1] {
        let check = runtime.run(index, "CHECK", &db, Some(&db_result));
        assert!(check.success, "CHECK plugin {index}: {check:?}");
    }

    // DEL in reverse order: lb-cni releases db (other reaches it again), ptp removes the veth
    // and the lease. Twice: DEL is idempotent.
    for round in 0..2 {
        let del = runtime.run(1, "DEL", &db, Some(&db_result));
        assert!(del.success, "lb-cni DEL #{round}: {del:?}");
        if round == 0 {
            for target in targets {
                assert!(
                    reaches_becomes(&other.ns, target, true),
                    "other -> db {target} once db is released"
                );
            }
            assert_eq!(lbctl_endpoints(&socket).len(), 2);
        } else {
            assert!(del.stderr.contains("no such endpoint"), "{del:?}");
        }
        let del = runtime.run(0, "DEL", &db, Some(&db_result));
        assert!(del.success, "ptp DEL #{round}: {del:?}");
    }
    assert!(!link_exists(&node, &db_veth), "ptp DEL removed {db_veth}");
    for lease in &leases {
        assert!(!lease.exists(), "host-local released {}", lease.display());
    }
    let (code, msg) = runtime
        .run(1, "CHECK", &db, Some(&db_result))
        .error("CHECK after DEL");
    assert_eq!(code, 101, "{msg}");

    // CNI 1.1: STATUS says ready; GC releases what the runtime no longer lists (other), once.
    let status = runtime.run_v1_1("STATUS", &frontend, &[]);
    assert!(
        status.success && status.stdout.is_empty(),
        "STATUS: {status:?}"
    );
    for round in 0..2 {
        let gc = runtime.run_v1_1("GC", &frontend, &[&frontend]);
        assert!(gc.success, "GC #{round}: {gc:?}");
        let released = format!("released {}/eth0", other.attachment.container_id);
        assert_eq!(
            gc.stderr.contains(&released),
            round == 0,
            "GC #{round}: {gc:?}"
        );
        let listed = lbctl_endpoints(&socket);
        assert_eq!(listed.len(), 1, "{listed:#?}");
        assert!(listed[0].contains("pod=default/frontend"), "{listed:#?}");
    }

    // With the agent gone, DEL still succeeds (and ADD asks to try again later, STATUS says
    // not available).
    agent.stop().expect("agent stops");
    let (code, msg) = runtime
        .run_v1_1("STATUS", &frontend, &[])
        .error("STATUS without an agent");
    assert_eq!(code, 50, "{msg}");
    let del = runtime.run(1, "DEL", &frontend, Some(&results[0]));
    assert!(del.success, "lb-cni DEL without an agent: {del:?}");
    assert!(del.stderr.contains("not reachable"), "{del:?}");
    let (code, _) = runtime
        .run(1, "ADD", &db, Some(&db_network))
        .error("lb-cni ADD without an agent");
    assert_eq!(code, 11);
    for (pod, result) in [&frontend, &other].into_iter().zip(&results) {
        let del = runtime.run(0, "DEL", pod, Some(result));
        assert!(del.success, "ptp DEL {}: {del:?}", pod.name);
        assert!(!link_exists(&node, &addresses_and_veth(result).1));
    }
    let leases: Vec<_> = std::fs::read_dir(data_dir.join(NETWORK))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.parse::<IpAddr>().is_ok())
        .collect();
    assert!(leases.is_empty(), "leases left: {leases:?}");
}
