//! The deployment manifests in deploy/ are consistent with the agent: the role grants what the agent
//! watches (Services, EndpointSlices, Pods, Namespaces, NetworkPolicies: `lb_agent::k8s::source`),
//! the DaemonSet's arguments are accepted by `lb-agent run`, its gRPC socket is in a host
//! directory, and the embedded config is valid.

use std::path::Path;

use serde::Deserialize;
use serde_yaml_ng::Value;

fn documents(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{file}: {e}")))
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn cluster_role_grants_list_and_watch_on_everything_the_agent_watches() {
    let docs = documents("rbac.yaml");
    let role = of_kind(&docs, "ClusterRole");
    let rules = role["rules"].as_sequence().expect("rules");
    for (group, resource) in [
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "pods"),
        ("", "namespaces"),
        ("networking.k8s.io", "networkpolicies"),
    ] {
        let granted = rules.iter().any(|r| {
            let has = |field: &str, want: &str| {
                r[field]
                    .as_sequence()
                    .is_some_and(|s| s.iter().any(|v| v.as_str() == Some(want)))
            };
            has("apiGroups", group)
                && has("resources", resource)
                && has("verbs", "list")
                && has("verbs", "watch")
        });
        assert!(granted, "{group}/{resource} must be listable and watchable");
        let writes = rules.iter().any(|r| {
            r["verbs"].as_sequence().is_some_and(|s| {
                s.iter().any(|v| {
                    matches!(
                        v.as_str(),
                        Some("create" | "update" | "patch" | "delete" | "*")
                    )
                })
            })
        });
        assert!(!writes, "the agent only reads from the API server");
    }
    let binding = of_kind(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
}

#[test]
fn daemonset_arguments_and_config_are_accepted_by_the_agent() {
    let docs = documents("daemonset.yaml");
    let config = of_kind(&docs, "ConfigMap")["data"]["lb.yaml"]
        .as_str()
        .expect("lb.yaml");
    lb_agent::config::Config::from_yaml(config).expect("the ConfigMap's config is valid");

    let daemonset = of_kind(&docs, "DaemonSet");
    let container = &daemonset["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("$(NODE_NAME)", "node-1")
                .replace("$(NODE_IP)", "192.0.2.1")
        })
        .map(|a| a.replace("--config=/etc/lb/lb.yaml", "--config=/nonexistent/lb.yaml"))
        .collect();
    // Every argument parses; the run then stops at the (missing) config file, before the kernel.
    let output = std::process::Command::new(lb_tests::agent::agent_binary())
        .args(&args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid config /nonexistent/lb.yaml"),
        "arguments rejected: {stderr}"
    );
    assert_eq!(
        daemonset["spec"]["template"]["spec"]["hostNetwork"].as_bool(),
        Some(true)
    );
    let probe = container["readinessProbe"]["httpGet"]["path"].as_str();
    assert_eq!(probe, Some("/readyz"));

    // The gRPC socket lives in a directory shared with the host, so node-local clients reach it.
    let socket = args
        .iter()
        .find_map(|a| a.strip_prefix("--grpc-socket="))
        .expect("--grpc-socket");
    let dir = Path::new(socket).parent().unwrap();
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str().map(Path::new) == Some(dir))
        .unwrap_or_else(|| panic!("{} is not mounted", dir.display()));
    let volume = daemonset["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the socket directory's volume");
    assert_eq!(
        volume["hostPath"]["path"].as_str().map(Path::new),
        Some(dir)
    );
}
