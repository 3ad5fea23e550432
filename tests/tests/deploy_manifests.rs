//! The deployment manifests in deploy/ are consistent with the agent: the role grants what the agent
//! watches (Services, EndpointSlices, Pods, Namespaces, NetworkPolicies: `lb_agent::k8s::source`),
//! the DaemonSet's arguments are accepted by `lb-agent run`, its gRPC socket and CNI state
//! directory are in host directories, the embedded config is valid, and the CNI plugin is installed
//! on the node and chained (the example conflist) on the agent's socket.

use std::path::{Path, PathBuf};

use lb_agent::cni::config::{NetConf, DEFAULT_AGENT_SOCKET};
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

    // The gRPC socket lives in a directory shared with the host, at the same path, so node-local
    // clients (lbctl, lb-cni run by the container runtime) reach it.
    let socket = arg_value(&args, "--grpc-socket");
    assert_eq!(host_path(daemonset, container, socket), Some(socket.into()));
    // The CNI registrations survive the pod (an update, a restart): kept on the host.
    let state_dir = arg_value(&args, "--state-dir");
    assert_eq!(
        host_path(daemonset, container, state_dir),
        Some(state_dir.into())
    );
}

#[test]
fn lb_cni_is_installed_on_the_node_and_finds_the_agent() {
    let docs = documents("daemonset.yaml");
    let daemonset = of_kind(&docs, "DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];

    // The image carries lb-cni; the init container copies it into the node's CNI bin directory.
    let containerfile = read("Containerfile");
    let copy = containerfile
        .lines()
        .find(|l| l.starts_with("COPY --from=build") && l.ends_with("/usr/local/bin/"))
        .expect("the COPY of the binaries");
    assert!(copy.contains("/release/lb-cni "), "{copy}");
    let install = pod["initContainers"]
        .as_sequence()
        .expect("initContainers")
        .iter()
        .find(|c| c["name"] == "install-lb-cni")
        .expect("the install-lb-cni init container");
    let script = install["command"]
        .as_sequence()
        .expect("command")
        .last()
        .and_then(Value::as_str)
        .expect("script");
    assert!(script.starts_with("cp /usr/local/bin/lb-cni "), "{script}");
    let installed = script
        .split_whitespace()
        .last()
        .expect("the installed path");
    assert_eq!(
        host_path(daemonset, install, installed),
        Some(PathBuf::from("/opt/cni/bin/lb-cni"))
    );

    // The example conflist chains lb-cni last, with a config lb-cni reads, on the agent's socket.
    let list: serde_json::Value = serde_json::from_str(&read("lb-cni.conflist")).unwrap();
    let plugins = list["plugins"].as_array().expect("plugins");
    let mut entry = plugins.last().expect("a plugin").clone();
    assert_eq!(
        entry["type"], "lb-cni",
        "lb-cni comes after the pod network"
    );
    entry["cniVersion"] = list["cniVersion"].clone();
    entry["name"] = list["name"].clone();
    let conf = NetConf::parse(entry.to_string().as_bytes()).expect("lb-cni reads its entry");
    let container = &pod["containers"][0];
    let args: Vec<String> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let socket = arg_value(&args, "--grpc-socket");
    assert_eq!(
        host_path(daemonset, container, socket),
        Some(conf.agent_socket())
    );
    assert_eq!(conf.agent_socket(), Path::new(DEFAULT_AGENT_SOCKET));
}

fn read(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The value of `--name=VALUE` in `args`.
fn arg_value<'a>(args: &'a [String], name: &str) -> &'a str {
    args.iter()
        .find_map(|a| a.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {name}=..."))
}

/// Where `path` inside `container` is on the node: under the volume mount with the longest
/// mount path containing it, when that volume is a hostPath; `None` otherwise.
fn host_path(daemonset: &Value, container: &Value, path: &str) -> Option<PathBuf> {
    let path = Path::new(path);
    let mount = container["volumeMounts"]
        .as_sequence()?
        .iter()
        .filter(|m| m["mountPath"].as_str().is_some_and(|p| path.starts_with(p)))
        .max_by_key(|m| m["mountPath"].as_str().map_or(0, str::len))?;
    let volume = daemonset["spec"]["template"]["spec"]["volumes"]
        .as_sequence()?
        .iter()
        .find(|v| v["name"] == mount["name"])?;
    let host = volume["hostPath"]["path"].as_str()?;
    let inside = path.strip_prefix(mount["mountPath"].as_str()?).ok()?;
    Some(Path::new(host).join(inside))
}
