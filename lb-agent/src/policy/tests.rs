//! End-to-end policy tests: config (own rules or NetworkPolicy manifests) → compile → the maps →
//! the datapath's lookup sequence ([`Maps::check`]). Each case names the packet, the expected verdict,
//! reason and rule.
//!
//! Addresses: workloads use documentation ranges (192.0.2.0/24 local, 198.51.100.0/24 remote,
//! 2001:db8::/32); the NetworkPolicy examples keep the Kubernetes documentation's own CIDRs.

use std::{net::IpAddr, time::Instant};

use lb_common::policy::{identity, Direction, Reason, Verdict};

use super::{
    compile, identity::IdentityAllocator, k8s::NetworkPolicyManifest, k8s_examples::*,
    CompiledPolicy, Maps, Packet, PolicyConfig,
};

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const IN: Direction = Direction::Ingress;
const OUT: Direction = Direction::Egress;

/// Namespaces and workloads shared by the scenarios. `db` and `web` run on this node.
const CLUSTER: &str = "
host_addresses: [192.0.2.1, \"2001:db8::1\"]
namespaces:
  - {name: default}
  - {name: myproject-ns, labels: {project: myproject}}
  - {name: other}
  - {name: alice-ns, labels: {user: alice}}
  - {name: bob-ns, labels: {user: bob}}
workloads:
  - name: db
    namespace: default
    labels: {role: db}
    addresses: [192.0.2.10, \"2001:db8::10\"]
    interface: lxc-db
    ports: [{name: redis, port: 6379}]
  - name: web
    namespace: default
    labels: {role: web}
    addresses: [192.0.2.11]
    interface: lxc-web
  - {name: frontend, namespace: default, labels: {role: frontend}, addresses: [198.51.100.20, \"2001:db8::20\"],
     ports: [{name: http, port: 8080}]}
  - {name: frontend-other, namespace: other, labels: {role: frontend}, addresses: [198.51.100.21]}
  - {name: proj-pod, namespace: myproject-ns, labels: {app: x}, addresses: [198.51.100.22]}
  - {name: alice-client, namespace: alice-ns, labels: {role: client}, addresses: [198.51.100.30]}
  - {name: alice-server, namespace: alice-ns, labels: {role: server}, addresses: [198.51.100.31]}
  - {name: bob-client, namespace: bob-ns, labels: {role: client}, addresses: [198.51.100.32]}
  - {name: default-client, namespace: default, labels: {role: client}, addresses: [198.51.100.33]}
";

struct Scenario {
    compiled: CompiledPolicy,
    maps: Maps,
}

impl Scenario {
    /// `extra` is appended to [`CLUSTER`] (e.g. `rules:`); `policies` are NetworkPolicy manifests.
    fn new(extra: &str, policies: &[&str]) -> Self {
        let mut config: PolicyConfig = serde_yaml_ng::from_str(&format!("{CLUSTER}{extra}"))
            .unwrap_or_else(|e| panic!("config: {e}"));
        for p in policies {
            let manifest: NetworkPolicyManifest =
                serde_yaml_ng::from_str(p).unwrap_or_else(|e| panic!("manifest: {e}"));
            config.network_policies.push(manifest);
        }
        Self::from_config(&config)
    }

    fn from_config(config: &PolicyConfig) -> Self {
        let ifindex = |name: &str| name.strip_prefix("lxc-").map(|n| n.len() as u32);
        let compiled = compile(config, &mut IdentityAllocator::new(), &ifindex)
            .unwrap_or_else(|e| panic!("compile: {e}"));
        let maps = Maps::load(&compiled);
        Self { compiled, maps }
    }

    /// Checks one direction and compares verdict, reason and rule name ("" = none).
    #[track_caller]
    fn expect(
        &self,
        dir: Direction,
        (src, dst): (&str, &str),
        (protocol, dport): (u8, u16),
        want: (Verdict, Reason, &str),
    ) {
        let packet = Packet {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol,
            dport,
        };
        let check = self.maps.check(&packet, dir);
        let rule = self
            .compiled
            .rule(check.decision.rule_id)
            .map_or("", |r| r.name.as_str());
        assert_eq!(
            (check.verdict(), check.reason(), rule),
            want,
            "{} {src} -> {dst} proto {protocol} port {dport}: {}",
            dir.name(),
            self.compiled.explain(&check)
        );
    }

    #[track_caller]
    fn allowed(&self, dir: Direction, addrs: (&str, &str), port: (u8, u16), rule: &str) {
        self.expect(
            dir,
            addrs,
            port,
            (Verdict::Allow, Reason::AllowedByRule, rule),
        );
    }

    #[track_caller]
    fn denied(&self, dir: Direction, addrs: (&str, &str), port: (u8, u16), rule: &str) {
        self.expect(dir, addrs, port, (Verdict::Deny, Reason::DefaultDeny, rule));
    }

    #[track_caller]
    fn open(&self, dir: Direction, addrs: (&str, &str), port: (u8, u16)) {
        self.expect(dir, addrs, port, (Verdict::Allow, Reason::NotSelected, ""));
    }
}

const DB: &str = "192.0.2.10";
const DB6: &str = "2001:db8::10";
const WEB: &str = "192.0.2.11";
const FRONTEND: &str = "198.51.100.20";
const FRONTEND6: &str = "2001:db8::20";
const FRONTEND_OTHER: &str = "198.51.100.21";
const PROJ_POD: &str = "198.51.100.22";

/// The documentation's "namespaceSelector and podSelector" fragment, in a policy around `db`.
fn and_or_policy(from: &str) -> String {
    format!(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: and-or, namespace: default}}
spec:
  podSelector: {{matchLabels: {{role: db}}}}
  ingress:
  - from:
{from}"
    )
}

const AND_PEER: &str = "    - namespaceSelector:
        matchLabels:
          user: alice
      podSelector:
        matchLabels:
          role: client
";

const OR_PEERS: &str = "    - namespaceSelector:
        matchLabels:
          user: alice
    - podSelector:
        matchLabels:
          role: client
";

#[test]
fn k8s_test_network_policy() {
    let s = Scenario::new("", &[TEST_NETWORK_POLICY]);
    let allow = "k8s:default/test-network-policy:ingress[0]";
    let isolated = "k8s:default/test-network-policy:ingress";
    // From a role=frontend pod of the same namespace, TCP 6379 only.
    s.allowed(IN, (FRONTEND, DB), (TCP, 6379), allow);
    s.denied(IN, (FRONTEND, DB), (TCP, 6380), isolated);
    s.denied(IN, (FRONTEND, DB), (UDP, 6379), isolated);
    s.denied(IN, (FRONTEND, DB), (ICMP, 0), isolated);
    // role=frontend in another namespace is not selected by a bare podSelector.
    s.denied(IN, (FRONTEND_OTHER, DB), (TCP, 6379), isolated);
    // Any pod in a namespace labelled project=myproject.
    s.allowed(IN, (PROJ_POD, DB), (TCP, 6379), allow);
    // 172.17.0.0/16 except 172.17.1.0/24, boundaries included.
    for ip in ["172.17.0.0", "172.17.0.255", "172.17.2.0", "172.17.255.255"] {
        s.allowed(IN, (ip, DB), (TCP, 6379), allow);
    }
    for ip in ["172.17.1.0", "172.17.1.255", "172.16.255.255", "172.18.0.0"] {
        s.denied(IN, (ip, DB), (TCP, 6379), isolated);
    }
    // The host is not in any ipBlock.
    s.denied(IN, ("192.0.2.1", DB), (TCP, 6379), isolated);
    // IPv6: the pod selector holds for the frontend's IPv6 address; the IPv4 ipBlock opens no IPv6.
    s.allowed(IN, (FRONTEND6, DB6), (TCP, 6379), allow);
    s.denied(IN, ("2001:db8:ffff::1", DB6), (TCP, 6379), isolated);

    // Egress: 10.0.0.0/24 on TCP 5978 only.
    let egress = "k8s:default/test-network-policy:egress[0]";
    let egress_isolated = "k8s:default/test-network-policy:egress";
    s.allowed(OUT, (DB, "10.0.0.5"), (TCP, 5978), egress);
    s.denied(OUT, (DB, "10.0.0.5"), (TCP, 5979), egress_isolated);
    s.denied(OUT, (DB, "10.0.1.5"), (TCP, 5978), egress_isolated);
    s.denied(OUT, (DB, FRONTEND), (TCP, 80), egress_isolated);
    s.denied(OUT, (DB6, FRONTEND6), (TCP, 5978), egress_isolated);

    // `web` is not selected: open both ways.
    s.open(IN, (FRONTEND_OTHER, WEB), (TCP, 80));
    s.open(OUT, (WEB, "10.9.9.9"), (UDP, 53));
    // Remote pods are not enforced here.
    s.expect(
        IN,
        (DB, FRONTEND),
        (TCP, 80),
        (Verdict::Allow, Reason::NoLocalEndpoint, ""),
    );
}

#[test]
fn k8s_default_deny_and_allow_all() {
    let deny_in = Scenario::new("", &[DEFAULT_DENY_INGRESS]);
    let rule = "k8s:default/default-deny-ingress:ingress";
    for src in [FRONTEND, FRONTEND_OTHER, "203.0.113.9", "192.0.2.1", WEB] {
        deny_in.denied(IN, (src, DB), (TCP, 6379), rule);
        deny_in.denied(IN, (src, WEB), (UDP, 53), rule);
    }
    deny_in.open(OUT, (DB, "203.0.113.9"), (TCP, 443));

    let allow_in = Scenario::new("", &[ALLOW_ALL_INGRESS]);
    let rule = "k8s:default/allow-all-ingress:ingress[0]";
    for src in [
        FRONTEND,
        FRONTEND_OTHER,
        "203.0.113.9",
        "192.0.2.1",
        "2001:db8:ffff::1",
    ] {
        let dst = if src.contains(':') { DB6 } else { DB };
        allow_in.allowed(IN, (src, dst), (TCP, 6379), rule);
        allow_in.allowed(IN, (src, dst), (ICMP, 0), rule);
    }

    let deny_out = Scenario::new("", &[DEFAULT_DENY_EGRESS]);
    let rule = "k8s:default/default-deny-egress:egress";
    deny_out.denied(OUT, (DB, FRONTEND), (TCP, 80), rule);
    deny_out.denied(OUT, (WEB, "203.0.113.9"), (UDP, 53), rule);
    deny_out.open(IN, (FRONTEND, DB), (TCP, 6379));

    let allow_out = Scenario::new("", &[ALLOW_ALL_EGRESS]);
    let rule = "k8s:default/allow-all-egress:egress[0]";
    allow_out.allowed(OUT, (DB, FRONTEND), (TCP, 80), rule);
    allow_out.allowed(OUT, (DB6, "2001:db8:ffff::1"), (UDP, 53), rule);
    allow_out.open(IN, (FRONTEND, DB), (TCP, 6379));

    let deny_all = Scenario::new("", &[DEFAULT_DENY_ALL]);
    deny_all.denied(
        IN,
        (FRONTEND, DB),
        (TCP, 6379),
        "k8s:default/default-deny-all:ingress",
    );
    deny_all.denied(
        OUT,
        (DB, FRONTEND),
        (TCP, 80),
        "k8s:default/default-deny-all:egress",
    );

    // Policies add up: default deny plus allow-all allows.
    let both = Scenario::new("", &[DEFAULT_DENY_ALL, ALLOW_ALL_INGRESS]);
    both.allowed(
        IN,
        (FRONTEND, DB),
        (TCP, 6379),
        "k8s:default/allow-all-ingress:ingress[0]",
    );
    both.denied(
        OUT,
        (DB, FRONTEND),
        (TCP, 80),
        "k8s:default/default-deny-all:egress",
    );

    // The policies live in `default`: a pod elsewhere is not selected.
    let elsewhere = Scenario::new(
        "",
        &[&DEFAULT_DENY_ALL.replace("name: default-deny-all", "name: d\n  namespace: other")],
    );
    elsewhere.open(IN, (FRONTEND, DB), (TCP, 6379));
}

#[test]
fn k8s_end_port_range() {
    let s = Scenario::new("", &[MULTI_PORT_EGRESS]);
    let allow = "k8s:default/multi-port-egress:egress[0]";
    let isolated = "k8s:default/multi-port-egress:egress";
    for port in [32000, 32001, 32255, 32256, 32511, 32767, 32768] {
        s.allowed(OUT, (DB, "10.0.0.5"), (TCP, port), allow);
    }
    for port in [31999, 32769, 0, 65535] {
        s.denied(OUT, (DB, "10.0.0.5"), (TCP, port), isolated);
    }
    s.denied(OUT, (DB, "10.0.0.5"), (UDP, 32000), isolated);
    s.denied(OUT, (DB, "10.0.1.5"), (TCP, 32000), isolated);
}

#[test]
fn k8s_namespace_and_pod_selector_and_versus_or() {
    let alice_client = "198.51.100.30";
    let alice_server = "198.51.100.31";
    let bob_client = "198.51.100.32";
    let default_client = "198.51.100.33";
    let isolated = "k8s:default/and-or:ingress";
    let allow = "k8s:default/and-or:ingress[0]";

    // One peer with both selectors: role=client pods in user=alice namespaces.
    let and = Scenario::new("", &[&and_or_policy(AND_PEER)]);
    and.allowed(IN, (alice_client, DB), (TCP, 5432), allow);
    and.denied(IN, (alice_server, DB), (TCP, 5432), isolated);
    and.denied(IN, (bob_client, DB), (TCP, 5432), isolated);
    and.denied(IN, (default_client, DB), (TCP, 5432), isolated);

    // Two peers: any pod in user=alice namespaces, or role=client pods in the policy's namespace.
    let or = Scenario::new("", &[&and_or_policy(OR_PEERS)]);
    or.allowed(IN, (alice_client, DB), (TCP, 5432), allow);
    or.allowed(IN, (alice_server, DB), (TCP, 5432), allow);
    or.allowed(IN, (default_client, DB), (TCP, 5432), allow);
    or.denied(IN, (bob_client, DB), (TCP, 5432), isolated);
}

#[test]
fn k8s_namespace_by_name_and_named_ports() {
    // The documentation's "targeting a namespace by its name", plus named ports both ways.
    let policy = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: named, namespace: default}
spec:
  podSelector: {matchLabels: {role: db}}
  policyTypes: [Ingress, Egress]
  ingress:
  - ports: [{port: redis}]
  egress:
  - to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: 'myproject-ns'
  - ports: [{port: http}]
";
    let s = Scenario::new("", &[policy]);
    // Ingress on db's own port named redis (6379), from anyone.
    s.allowed(
        IN,
        ("203.0.113.9", DB),
        (TCP, 6379),
        "k8s:default/named:ingress[0]",
    );
    s.denied(
        IN,
        ("203.0.113.9", DB),
        (TCP, 6380),
        "k8s:default/named:ingress",
    );
    // Egress to the namespace named myproject-ns, any port.
    s.allowed(OUT, (DB, PROJ_POD), (UDP, 9), "k8s:default/named:egress[0]");
    // Egress to any pod's port named http: the frontend's 8080; not to non-pods.
    s.allowed(
        OUT,
        (DB, FRONTEND),
        (TCP, 8080),
        "k8s:default/named:egress[1]",
    );
    s.denied(
        OUT,
        (DB, FRONTEND_OTHER),
        (TCP, 8080),
        "k8s:default/named:egress",
    );
    s.denied(
        OUT,
        (DB, "203.0.113.9"),
        (TCP, 8080),
        "k8s:default/named:egress",
    );
}

// ---- Semantics of our own format. ----

#[test]
fn deny_wins_over_allow_whatever_the_specificity() {
    let s = Scenario::new(
        "
rules:
  - {name: allow-all, endpoints: {match_labels: {role: db}}, direction: ingress, action: allow,
     peers: [{entity: all}]}
  - {name: allow-frontend-23, endpoints: {match_labels: {role: db}}, direction: ingress, action: allow,
     peers: [{selector: {match_labels: {role: frontend}}}], ports: [{port: 23}]}
  - {name: deny-telnet, endpoints: {}, direction: ingress, action: deny,
     peers: [{entity: all}], ports: [{port: 23}]}
  - {name: deny-net-ssh, endpoints: {}, direction: ingress, action: deny,
     peers: [{cidr: 203.0.113.0/24}], ports: [{port: 16, end_port: 23}]}
  - {name: allow-net-ssh-exact, endpoints: {}, direction: ingress, action: allow,
     peers: [{cidr: 203.0.113.0/24}], ports: [{port: 22}]}
  - {name: deny-frontend, endpoints: {}, direction: ingress, action: deny,
     peers: [{selector: {match_labels: {role: frontend}}, namespaces: {}}]}
  - {name: allow-frontend-6379, endpoints: {}, direction: ingress, action: allow,
     peers: [{selector: {match_labels: {role: frontend}}, namespaces: {}}], ports: [{port: 6379}]}
",
        &[],
    );
    let deny = |rule| (Verdict::Deny, Reason::DeniedByRule, rule);
    // Wildcard-peer deny beats an exact-peer allow of the same port.
    s.expect(IN, (PROJ_POD, DB), (TCP, 23), deny("deny-telnet"));
    s.allowed(IN, (PROJ_POD, DB), (TCP, 24), "allow-all");
    // A port-range deny (one block, 16..=23) beats a single-port allow inside it (a longer prefix).
    s.expect(IN, ("203.0.113.7", DB), (TCP, 22), deny("deny-net-ssh"));
    s.expect(IN, ("203.0.113.7", DB), (TCP, 16), deny("deny-net-ssh"));
    s.allowed(IN, ("203.0.113.7", DB), (TCP, 15), "allow-all");
    s.allowed(IN, ("203.0.113.7", DB), (TCP, 24), "allow-all");
    // An all-ports deny of a peer beats its port allow (and the exact deny is reported).
    s.expect(IN, (FRONTEND, DB), (TCP, 6379), deny("deny-frontend"));
    s.expect(IN, (FRONTEND6, DB6), (UDP, 53), deny("deny-frontend"));
    s.expect(IN, (FRONTEND_OTHER, DB), (TCP, 23), deny("deny-frontend"));
    // Deny rules select too (default_deny: true): web is isolated; nothing allows it.
    s.expect(
        IN,
        (PROJ_POD, WEB),
        (TCP, 80),
        (Verdict::Deny, Reason::DefaultDeny, "deny-telnet"),
    );
    // No allow survives under a deny in the same trie.
    for (key, entry) in &s.compiled.policy {
        if entry.kind() == lb_common::policy::EntryKind::Allow {
            assert!(
                super::compile::tests_support::ancestors_have_no_deny(&s.compiled, key),
                "{key:?}"
            );
        }
    }
}

#[test]
fn deny_rule_without_default_deny_leaves_the_rest_open() {
    let s = Scenario::new(
        "
rules:
  - {name: no-world-ssh, endpoints: {}, direction: ingress, action: deny, default_deny: false,
     peers: [{entity: world}], ports: [{port: 22}]}
",
        &[],
    );
    s.expect(
        IN,
        ("203.0.113.7", DB),
        (TCP, 22),
        (Verdict::Deny, Reason::DeniedByRule, "no-world-ssh"),
    );
    s.open(IN, ("203.0.113.7", DB), (TCP, 80));
    s.open(IN, (FRONTEND, DB), (TCP, 22));
}

#[test]
fn port_ranges_match_exactly_on_every_port() {
    // Unaligned ranges, overlapping allow/deny, two protocols: every port of both protocols is
    // compared with the rules read naively.
    let s = Scenario::new(
        "
rules:
  - {name: r-allow, endpoints: {match_labels: {role: db}}, direction: egress, action: allow,
     peers: [{entity: all}], ports: [{port: 1000, end_port: 1999}, {protocol: udp, port: 53}]}
  - {name: r-deny, endpoints: {match_labels: {role: db}}, direction: egress, action: deny,
     peers: [{selector: {match_labels: {role: frontend}}}], ports: [{port: 1500, end_port: 1510}]}
  - {name: r-allow-inside-deny, endpoints: {match_labels: {role: db}}, direction: egress,
     action: allow, peers: [{selector: {match_labels: {role: frontend}}}], ports: [{port: 1505}]}
  - {name: r-odd, endpoints: {match_labels: {role: db}}, direction: egress, action: allow,
     peers: [{cidr: 203.0.113.0/24}], ports: [{protocol: udp, port: 3, end_port: 65534}]}
",
        &[],
    );
    let dst_world = "203.0.113.9";
    for protocol in [TCP, UDP] {
        for port in 0..=u16::MAX {
            for dst in [FRONTEND, dst_world] {
                // Deny first; then allows, the exact peer's (r-odd) reported before the wildcard's.
                let want = if dst == FRONTEND && protocol == TCP && (1500..=1510).contains(&port) {
                    (Verdict::Deny, Reason::DeniedByRule, "r-deny")
                } else if dst == dst_world && protocol == UDP && (3..=65534).contains(&port) {
                    (Verdict::Allow, Reason::AllowedByRule, "r-odd")
                } else if protocol == TCP && (1000..=1999).contains(&port)
                    || protocol == UDP && port == 53
                {
                    (Verdict::Allow, Reason::AllowedByRule, "r-allow")
                } else {
                    (Verdict::Deny, Reason::DefaultDeny, "r-allow")
                };
                s.expect(OUT, (DB, dst), (protocol, port), want);
            }
        }
    }
}

#[test]
fn cidrs_nest_exclude_and_never_match_workloads() {
    let s = Scenario::new(
        "
rules:
  - {name: wide, endpoints: {match_labels: {role: db}}, direction: egress, action: allow,
     peers: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]}
  - {name: narrow, endpoints: {match_labels: {role: db}}, direction: egress, action: allow,
     peers: [{cidr: 10.1.2.0/24}]}
  - {name: pods-range, endpoints: {match_labels: {role: db}}, direction: egress, action: allow,
     peers: [{cidr: 198.51.100.0/24}]}
  - {name: v4-world, endpoints: {match_labels: {role: db}}, direction: egress, action: allow,
     peers: [{cidr: 0.0.0.0/0}], ports: [{port: 443}]}
  - {name: v6-doc, endpoints: {match_labels: {role: db}}, direction: egress, action: allow,
     peers: [{cidr: \"2001:db8:aaaa::/48\", except: [\"2001:db8:aaaa:1::/64\"]}]}
",
        &[],
    );
    let isolated = "wide";
    s.allowed(OUT, (DB, "10.2.0.1"), (TCP, 80), "wide");
    s.allowed(OUT, (DB, "10.1.2.3"), (TCP, 80), "narrow");
    s.denied(OUT, (DB, "10.1.3.3"), (TCP, 80), isolated);
    // A CIDR rule never selects workload addresses inside it ...
    s.denied(OUT, (DB, FRONTEND), (TCP, 80), isolated);
    // ... but does select the rest of the range.
    s.allowed(OUT, (DB, "198.51.100.200"), (TCP, 80), "pods-range");
    // 0.0.0.0/0 holds every IPv4 CIDR identity, and world; not IPv6.
    s.allowed(OUT, (DB, "10.1.3.3"), (TCP, 443), "v4-world");
    s.allowed(OUT, (DB, "8.8.8.8"), (TCP, 443), "v4-world");
    s.denied(OUT, (DB6, "2001:db8:ffff::1"), (TCP, 443), isolated);
    s.allowed(OUT, (DB6, "2001:db8:aaaa:2::1"), (TCP, 443), "v6-doc");
    s.denied(OUT, (DB6, "2001:db8:aaaa:1::1"), (TCP, 443), isolated);
    // The ipcache names what each address resolved to.
    let check = s.maps.check(
        &Packet {
            src: DB.parse().unwrap(),
            dst: "10.1.2.3".parse().unwrap(),
            protocol: TCP,
            dport: 80,
        },
        OUT,
    );
    let explained = s.compiled.explain(&check);
    assert!(
        explained.contains("peer") && explained.contains("(cidr 10.1.2.0/24)"),
        "{explained}"
    );
}

#[test]
fn entities_world_host_init_unmanaged() {
    let s = Scenario::new(
        "
  - {name: booting, namespace: default, labels: {role: web}, addresses: [192.0.2.12], interface: lxc-b,
     status: init}
  - {name: legacy, namespace: default, labels: {role: legacy}, addresses: [192.0.2.40],
     interface: lxc-legacy, status: unmanaged}
rules:
  - {name: from-world, endpoints: {match_labels: {role: db}}, direction: ingress, action: allow,
     peers: [{entity: world}], ports: [{port: 443}]}
  - {name: from-host, endpoints: {match_labels: {role: db}}, direction: ingress, action: allow,
     peers: [{entity: host}]}
  - {name: from-init, endpoints: {match_labels: {role: db}}, direction: ingress, action: allow,
     peers: [{entity: init}], ports: [{protocol: udp, port: 53}]}
  - {name: from-unmanaged, endpoints: {match_labels: {role: db}}, direction: ingress, action: allow,
     peers: [{entity: unmanaged}], ports: [{port: 5432}]}
  - {name: a-cidr, endpoints: {match_labels: {role: web}}, direction: ingress, action: allow,
     peers: [{cidr: 203.0.113.0/24}]}
",
        &[],
    );
    // world includes CIDR identities (203.0.113.0/24 has one because of a-cidr) and IPv6.
    for src in ["203.0.113.7", "8.8.4.4"] {
        s.allowed(IN, (src, DB), (TCP, 443), "from-world");
    }
    s.allowed(IN, ("2001:db8:ffff::1", DB6), (TCP, 443), "from-world");
    s.denied(IN, (FRONTEND, DB), (TCP, 443), "from-world");
    s.allowed(IN, ("192.0.2.1", DB), (TCP, 10250), "from-host");
    s.allowed(IN, ("2001:db8::1", DB6), (TCP, 10250), "from-host");
    s.allowed(IN, ("192.0.2.40", DB), (TCP, 5432), "from-unmanaged");
    // The init endpoint: its traffic to db is allowed on DNS only ...
    s.allowed(IN, ("192.0.2.12", DB), (UDP, 53), "from-init");
    // ... and it is itself in default deny both ways, by no rule.
    s.expect(
        IN,
        (FRONTEND, "192.0.2.12"),
        (TCP, 80),
        (Verdict::Deny, Reason::DefaultDeny, ""),
    );
    s.expect(
        OUT,
        ("192.0.2.12", FRONTEND),
        (TCP, 80),
        (Verdict::Deny, Reason::DefaultDeny, ""),
    );
    // Unmanaged workloads are never enforced, even local ones.
    let check = s.maps.check(
        &Packet {
            src: FRONTEND.parse().unwrap(),
            dst: "192.0.2.40".parse().unwrap(),
            protocol: TCP,
            dport: 1,
        },
        IN,
    );
    assert_eq!(check.reason(), Reason::NoLocalEndpoint);
    assert_eq!(
        s.compiled
            .ipcache_v4
            .values()
            .filter(|e| e.identity == identity::INIT)
            .count(),
        1
    );
}

#[test]
fn audit_passes_would_be_denials_and_names_them() {
    let rules = "
rules:
  - {name: db-from-frontend, endpoints: {match_labels: {role: db}}, direction: ingress,
     action: allow, peers: [{selector: {match_labels: {role: frontend}}}], ports: [{port: 6379}]}
  - {name: no-telnet, endpoints: {}, direction: ingress, action: deny, peers: [{entity: all}],
     ports: [{port: 23}]}
";
    // Per endpoint: db audits, web enforces.
    let per_endpoint = Scenario::new(
        &format!(
            "{}{rules}",
            "  - {name: audited, namespace: default, labels: {role: db}, addresses: [192.0.2.13],
     interface: lxc-a, enforcement: audit}
"
        ),
        &[],
    );
    let audited = "192.0.2.13";
    per_endpoint.allowed(IN, (FRONTEND, audited), (TCP, 6379), "db-from-frontend");
    per_endpoint.expect(
        IN,
        (FRONTEND, audited),
        (TCP, 80),
        (Verdict::Audit, Reason::DefaultDeny, "db-from-frontend"),
    );
    per_endpoint.expect(
        IN,
        (FRONTEND, audited),
        (TCP, 23),
        (Verdict::Audit, Reason::DeniedByRule, "no-telnet"),
    );
    // The same identity without audit still drops.
    per_endpoint.denied(IN, (FRONTEND, DB), (TCP, 80), "db-from-frontend");

    // Global audit: every endpoint.
    let global = Scenario::new(&format!("audit: true\n{rules}"), &[]);
    global.expect(
        IN,
        (FRONTEND, DB),
        (TCP, 80),
        (Verdict::Audit, Reason::DefaultDeny, "db-from-frontend"),
    );
    global.expect(
        IN,
        (FRONTEND, WEB),
        (TCP, 23),
        (Verdict::Audit, Reason::DeniedByRule, "no-telnet"),
    );
    global.allowed(IN, (FRONTEND, DB), (TCP, 6379), "db-from-frontend");
    assert!(Verdict::Audit.passes());
}

#[test]
fn forward_checks_egress_then_ingress() {
    // db → web on this node: db's egress is open; web's ingress is isolated.
    let s = Scenario::new(
        "
rules:
  - {name: web-isolated, endpoints: {match_labels: {role: web}}, direction: ingress, action: allow,
     peers: []}
",
        &[],
    );
    let packet = Packet {
        src: DB.parse().unwrap(),
        dst: WEB.parse().unwrap(),
        protocol: TCP,
        dport: 80,
    };
    let checks = s.maps.forward(&packet);
    assert_eq!(checks.len(), 2);
    assert_eq!(checks[0].reason(), Reason::NotSelected);
    assert_eq!(
        (checks[1].verdict(), checks[1].reason()),
        (Verdict::Deny, Reason::DefaultDeny)
    );
}

#[test]
fn epoch_swap_is_atomic_and_leaves_no_default_allow_window() {
    let open = Scenario::new("", &[]);
    let closed = Scenario::new(
        "
  - {name: new-pod, namespace: default, labels: {role: db}, addresses: [192.0.2.20], interface: lxc-n}
",
        &[DEFAULT_DENY_ALL],
    );
    let mut maps = Maps::load(&open.compiled);
    let packet = |dst: &str| Packet {
        src: FRONTEND.parse().unwrap(),
        dst: dst.parse().unwrap(),
        protocol: TCP,
        dport: 6379,
    };
    let reason = |m: &Maps, dst| m.check(&packet(dst), IN).reason();
    assert_eq!(reason(&maps, DB), Reason::NotSelected);

    // Writing the next epoch changes nothing until the switch ...
    maps.write_epoch(&closed.compiled, 1);
    assert_eq!(reason(&maps, DB), Reason::NotSelected);
    // ... in particular the new endpoint does not exist yet, rather than existing without policy.
    assert_eq!(reason(&maps, "192.0.2.20"), Reason::NoLocalEndpoint);
    // One store switches every map at once.
    maps.switch_to(1);
    assert_eq!(reason(&maps, DB), Reason::DefaultDeny);
    assert_eq!(reason(&maps, "192.0.2.20"), Reason::DefaultDeny);
    maps.delete_epoch(0);
    assert_eq!(reason(&maps, DB), Reason::DefaultDeny);
    assert_eq!(maps.len(), Maps::load(&closed.compiled).len());
}

#[test]
fn compile_is_deterministic_and_identities_are_stable() {
    let config = |reverse: bool| {
        let mut c: PolicyConfig = serde_yaml_ng::from_str(CLUSTER).unwrap();
        for p in [TEST_NETWORK_POLICY, MULTI_PORT_EGRESS] {
            c.network_policies.push(serde_yaml_ng::from_str(p).unwrap());
        }
        if reverse {
            c.workloads.reverse();
        }
        c
    };
    let ifindex = |_: &str| Some(7);
    let one = compile(&config(false), &mut IdentityAllocator::new(), &ifindex).unwrap();
    let two = compile(&config(true), &mut IdentityAllocator::new(), &ifindex).unwrap();
    assert_eq!(one, two);

    // Labels written in another order give the same identity.
    let relabelled = CLUSTER.replace(
        "labels: {role: db}\n    addresses: [192.0.2.10",
        "labels: {tier: be, role: db}\n    addresses: [192.0.2.10",
    );
    let reordered = relabelled.replace("{tier: be, role: db}", "{role: db, tier: be}");
    let id_of_db = |yaml: &str| {
        let c: PolicyConfig = serde_yaml_ng::from_str(yaml).unwrap();
        let compiled = compile(&c, &mut IdentityAllocator::new(), &ifindex).unwrap();
        compiled.endpoints_v4[&lb_common::policy::IpKeyV4::exact(0, "192.0.2.10".parse().unwrap())]
            .identity
    };
    assert_eq!(id_of_db(&relabelled), id_of_db(&reordered));
    assert_ne!(id_of_db(&relabelled), id_of_db(CLUSTER));

    // The same allocator across compiles keeps identities and forgets unused ones.
    let mut alloc = IdentityAllocator::new();
    let first = compile(&config(false), &mut alloc, &ifindex).unwrap();
    let ids_before = alloc.snapshot();
    let again = compile(&config(false), &mut alloc, &ifindex).unwrap();
    assert_eq!(first, again);
    assert_eq!(alloc.snapshot(), ids_before);
    let mut fewer = config(false);
    fewer.network_policies.clear();
    compile(&fewer, &mut alloc, &ifindex).unwrap();
    assert!(
        alloc.len() < ids_before.identities.len(),
        "CIDR identities released"
    );
}

#[test]
fn verdicts_explain_themselves() {
    let s = Scenario::new("", &[TEST_NETWORK_POLICY]);
    let check = s.maps.check(
        &Packet {
            src: FRONTEND_OTHER.parse().unwrap(),
            dst: DB.parse().unwrap(),
            protocol: TCP,
            dport: 6379,
        },
        IN,
    );
    let text = s.compiled.explain(&check);
    assert!(
        text.starts_with(
            "ingress deny (default_deny) by k8s:default/test-network-policy:ingress; endpoint "
        ),
        "{text}"
    );
    assert!(
        text.contains("(default: role=db)") && text.contains("(other: role=frontend)"),
        "{text}"
    );
    let rule = s.compiled.rule(check.decision.rule_id).unwrap();
    assert_eq!(rule.source, "policy.network_policies[0]");
}

// ---- Scale, for the benchmark: `cargo test -p lb-agent --release scale -- --ignored --nocapture`.

/// A synthetic cluster: `remote` remote workloads over 1000 label sets, 20 local endpoints over 10
/// label sets, and `rules` rules: a third each of pod-selector, CIDR (/32 to /24) and port-range
/// (unaligned, up to 16 blocks) rules, every rule selecting one local label set.
fn synthetic(rules: usize, remote: usize) -> PolicyConfig {
    use std::fmt::Write;
    let mut y = String::from("workloads:\n");
    for i in 0..20 {
        let _ = writeln!(
            y,
            "  - {{name: l{i}, namespace: ns{}, labels: {{app: local{}}}, addresses: [192.0.2.{}], interface: lxc{i}}}",
            i % 2,
            i % 10,
            i + 10
        );
    }
    for i in 0..remote {
        let _ = writeln!(
            y,
            "  - {{name: r{i}, namespace: ns{}, labels: {{app: remote{}}}, addresses: [10.{}.{}.{}]}}",
            i % 2,
            i % 1000,
            i >> 16,
            (i >> 8) & 255,
            i & 255
        );
    }
    y.push_str("rules:\n");
    for i in 0..rules {
        let local = i % 10;
        let peer = match i % 3 {
            0 => format!(
                "{{selector: {{match_labels: {{app: remote{}}}}}, namespaces: {{}}}}",
                i % 1000
            ),
            1 => format!(
                "{{cidr: 100.{}.{}.0/{}}}",
                (i >> 8) & 255,
                i & 255,
                24 + (i % 9)
            ),
            _ => "{entity: world}".to_string(),
        };
        let ports = match i % 3 {
            2 => format!(
                "[{{port: {}, end_port: {}}}]",
                1000 + i % 50_000,
                1000 + i % 50_000 + 1000
            ),
            _ => format!("[{{port: {}}}]", 1 + i % 65_000),
        };
        let _ = writeln!(
            y,
            "  - {{name: r{i}, endpoints: {{match_labels: {{app: local{local}}}}}, direction: {}, action: {}, peers: [{peer}], ports: {ports}}}",
            if i % 2 == 0 { "ingress" } else { "egress" },
            if i % 50 == 49 { "deny" } else { "allow" },
        );
    }
    serde_yaml_ng::from_str(&y).unwrap()
}

#[test]
#[ignore = "scale numbers for the benchmark; run with --ignored --nocapture (release)"]
fn scale_entry_counts_and_compile_time() {
    for (rules, remote) in [(10, 100_000), (1000, 100_000), (100_000, 100_000)] {
        let config = synthetic(rules, remote);
        let start = Instant::now();
        let compiled = compile(&config, &mut IdentityAllocator::new(), &|_| Some(1)).unwrap();
        let elapsed = start.elapsed();
        eprintln!(
            "{rules:>6} rules, {remote} remote workloads: {} policy entries, {} ipcache v4 entries, \
             {} endpoints, {} identities; compiled in {:.2?}",
            compiled.policy.len(),
            compiled.ipcache_v4.len(),
            compiled.endpoints_v4.len(),
            compiled.identities.len(),
            elapsed
        );
        // Spot-check through the maps: a rule-0-style allow holds.
        let maps = Maps::load(&compiled);
        let check = maps.check(
            &Packet {
                src: "10.0.0.0".parse::<IpAddr>().unwrap(),
                dst: "192.0.2.10".parse().unwrap(),
                protocol: TCP,
                dport: 1,
            },
            IN,
        );
        assert_eq!(
            check.verdict(),
            Verdict::Allow,
            "{}",
            compiled.explain(&check)
        );
    }
}
