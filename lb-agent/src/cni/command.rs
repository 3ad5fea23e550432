//! The plugin's commands (`CNI_COMMAND`), per the CNI spec 1.0 for a chained plugin:
//!
//! - `ADD`: the pod's host-side interface and addresses from `prevResult`, registered with the
//!   agent (`RegisterEndpoint`), which attaches the workload programs and enforces the pod's
//!   policy before it answers; prints `prevResult` unchanged.
//! - `DEL`: `ReleaseEndpoint`. Idempotent, as the spec asks: nothing registered, or no agent
//!   (gone with the node's teardown, or restarting: a restarted agent forgets endpoints whose
//!   interface vanished), is a success, logged on stderr.
//! - `CHECK`: the agent holds this registration (same host interface and addresses as
//!   `prevResult`) and enforces it; an error otherwise.
//! - `GC` (cniVersion 1.1.0): releases this network's registrations whose attachment is not in
//!   `cni.dev/valid-attachments` (containers the runtime no longer has). Registrations of other
//!   networks, and those made without a network name, are left alone; the agent also forgets
//!   any endpoint whose interface is gone.
//! - `STATUS` (cniVersion 1.1.0): ready when the agent answers; error 50 when it does not (ADD
//!   would fail).
//! - `VERSION`: the supported versions.
//!
//! Every failure is a [`CniError`]; [`run`] turns it into the error JSON on stdout.

use std::{collections::BTreeSet, path::Path};

use super::{
    agent::{Agent, AgentError},
    config::{CniEnv, NetConf, PrevResult, SUPPORTED_VERSIONS},
    error::{CniError, ErrorCode},
};
use crate::{
    endpoints::{Endpoint, EndpointKey, Placement},
    grpc::ApiError,
};

/// The version of the results when the input names none this plugin reads.
const LATEST_VERSION: &str = "1.1.0";

/// What the plugin prints on stdout and whether it succeeded (exit 0) or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub success: bool,
}

/// Runs the command `var("CNI_COMMAND")` names with `stdin` (the network configuration);
/// `connect` makes the agent client for the socket the configuration names (only called by the
/// commands that need the agent).
pub fn run<A: Agent>(
    stdin: &[u8],
    var: impl Fn(&str) -> Option<String>,
    connect: impl FnOnce(&Path) -> A,
) -> Outcome {
    match execute(stdin, var, connect) {
        Ok(stdout) => Outcome {
            stdout,
            success: true,
        },
        Err(err) => Outcome {
            stdout: err.to_json(&result_version(stdin)),
            success: false,
        },
    }
}

fn execute<A: Agent>(
    stdin: &[u8],
    var: impl Fn(&str) -> Option<String>,
    connect: impl FnOnce(&Path) -> A,
) -> Result<String, CniError> {
    let env = CniEnv::read(var)?;
    if env.command == "VERSION" {
        return Ok(version(stdin));
    }
    let conf = NetConf::parse(stdin)?;
    let socket = conf.agent_socket();
    match env.command.as_str() {
        "ADD" => {
            env.require(true)?;
            add(&conf, &env, &mut connect(&socket), &socket)
        }
        "DEL" => {
            env.require(false)?;
            del(&env, &mut connect(&socket), &socket).map(|()| String::new())
        }
        "CHECK" => {
            command_exists_in(&conf, "CHECK", "0.4.0")?;
            env.require(true)?;
            check(&conf, &env, &mut connect(&socket), &socket).map(|()| String::new())
        }
        "GC" => {
            command_exists_in(&conf, "GC", "1.1.0")?;
            gc(&conf, &mut connect(&socket), &socket).map(|()| String::new())
        }
        "STATUS" => {
            command_exists_in(&conf, "STATUS", "1.1.0")?;
            status(&mut connect(&socket), &socket).map(|()| String::new())
        }
        other => Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"),
            "",
        )),
    }
}

/// `command` came with cniVersion `since`: an older configuration cannot ask for it.
fn command_exists_in(conf: &NetConf, command: &str, since: &str) -> Result<(), CniError> {
    if conf.version_at_least(since) {
        return Ok(());
    }
    Err(CniError::new(
        ErrorCode::IncompatibleVersion,
        format!("{command} is not part of cniVersion {}", conf.cni_version),
        format!("{command} exists from cniVersion {since} on"),
    ))
}

/// `{"cniVersion", "supportedVersions"}`, in the version stdin asks for when this plugin has it.
fn version(stdin: &[u8]) -> String {
    serde_json::json!({
        "cniVersion": result_version(stdin),
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

/// The `cniVersion` of stdin when it is one this plugin writes, else the latest: what results and
/// errors are written in. Read on its own, so that an error about the rest of stdin still has it.
fn result_version(stdin: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Version {
        #[serde(rename = "cniVersion")]
        cni_version: String,
    }
    serde_json::from_slice::<Version>(stdin)
        .ok()
        .map(|v| v.cni_version)
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_string())
}

fn add(
    conf: &NetConf,
    env: &CniEnv,
    agent: &mut impl Agent,
    socket: &Path,
) -> Result<String, CniError> {
    let (raw, prev) = conf.prev_result()?;
    let endpoint = endpoint(conf, env, &prev)?;
    agent
        .register(&endpoint)
        .map_err(|err| err.into_cni(socket, "registering the endpoint"))?;
    Ok(raw.get().to_string())
}

fn del(env: &CniEnv, agent: &mut impl Agent, socket: &Path) -> Result<(), CniError> {
    let key = (env.container_id.clone(), env.ifname.clone());
    let what = format!("DEL {}/{}", key.0, key.1);
    match agent.release(&key) {
        Ok(true) => Ok(()),
        Ok(false) => {
            eprintln!("lb-cni: {what}: the agent had no such endpoint; nothing to release");
            Ok(())
        }
        Err(AgentError::Unreachable(cause)) => {
            eprintln!(
                "lb-cni: {what}: the lb agent is not reachable at {} ({cause}); nothing to \
                 release (an agent that starts later forgets endpoints whose interface is gone)",
                socket.display()
            );
            Ok(())
        }
        Err(err) => Err(err.into_cni(socket, "releasing the endpoint")),
    }
}

fn check(
    conf: &NetConf,
    env: &CniEnv,
    agent: &mut impl Agent,
    socket: &Path,
) -> Result<(), CniError> {
    let (_, prev) = conf.prev_result()?;
    let mut expected = endpoint(conf, env, &prev)?;
    let registered = agent
        .endpoints()
        .map_err(|err| err.into_cni(socket, "listing the registered endpoints"))?;
    let Some((found, placement)) = registered.iter().find(|(e, _)| e.key() == expected.key())
    else {
        return Err(CniError::new(
            ErrorCode::NotRegistered,
            format!(
                "the lb agent has no endpoint {}/{}",
                expected.container_id, expected.interface_name
            ),
            "ADD did not run, failed, or was undone by DEL",
        ));
    };
    // Registered by a plugin that did not name the network: the rest must match.
    if found.network.is_empty() {
        expected.network.clear();
    }
    if *found != expected {
        return Err(CniError::new(
            ErrorCode::NotRegistered,
            format!(
                "the lb agent's endpoint {}/{} differs from prevResult",
                expected.container_id, expected.interface_name
            ),
            format!(
                "registered: pod {} on {} with {:?}; expected: pod {} on {} with {:?}",
                found.pod_name(),
                found.host_interface,
                found.addresses,
                expected.pod_name(),
                expected.host_interface,
                expected.addresses
            ),
        ));
    }
    if *placement == Some(Placement::NotPlaced) {
        return Err(CniError::new(
            ErrorCode::NotEnforced,
            format!(
                "the lb agent does not enforce a policy on endpoint {}/{} of pod {}",
                expected.container_id,
                expected.interface_name,
                expected.pod_name()
            ),
            "it conflicts with another workload's address or interface (see the agent's log)",
        ));
    }
    Ok(())
}

/// `GC`: releases the registrations of `conf`'s network that `cni.dev/valid-attachments` does
/// not list. Each is tried; the first failure is the answer (the runtime runs GC again later).
fn gc(conf: &NetConf, agent: &mut impl Agent, socket: &Path) -> Result<(), CniError> {
    let valid: BTreeSet<EndpointKey> = conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidNetworkConfig,
                "GC without cni.dev/valid-attachments",
                "the runtime lists the attachments it still has; without them every \
                 registration would look stale",
            )
        })?
        .iter()
        .map(|a| (a.container_id.clone(), a.ifname.clone()))
        .collect();
    let registered = agent
        .endpoints()
        .map_err(|err| err.into_cni(socket, "listing the registered endpoints"))?;
    let mut first_failure = None;
    for (endpoint, _) in registered {
        let key = endpoint.key();
        if endpoint.network != conf.name || valid.contains(&key) {
            continue;
        }
        match agent.release(&key) {
            Ok(_) => eprintln!(
                "lb-cni: GC: released {}/{} (pod {}, {}): the runtime no longer has it",
                key.0,
                key.1,
                endpoint.pod_name(),
                endpoint.host_interface
            ),
            Err(err) => {
                let what = format!("releasing the stale endpoint {}/{}", key.0, key.1);
                first_failure.get_or_insert(err.into_cni(socket, &what));
            }
        }
    }
    first_failure.map_or(Ok(()), Err)
}

/// `STATUS`: ready when the agent answers, which ADD needs.
fn status(agent: &mut impl Agent, socket: &Path) -> Result<(), CniError> {
    match agent.endpoints() {
        Ok(_) => Ok(()),
        Err(AgentError::Unreachable(cause)) => Err(CniError::new(
            ErrorCode::NotAvailable,
            format!(
                "the lb agent is not reachable at {} ({cause})",
                socket.display()
            ),
            "ADD fails until it answers (starting, restarting, or not running on this node)",
        )),
        Err(err) => Err(err.into_cni(socket, "asking the agent")),
    }
}

/// The endpoint ADD registers: the attachment from the environment, the pod's host interface and
/// addresses from `prevResult`, the network from the configuration. Checked here as the agent
/// would, so that a bad value is named by where it came from.
fn endpoint(conf: &NetConf, env: &CniEnv, prev: &PrevResult) -> Result<Endpoint, CniError> {
    let (namespace, pod) = env.workload();
    let endpoint = Endpoint {
        container_id: env.container_id.clone(),
        interface_name: env.ifname.clone(),
        namespace,
        pod,
        host_interface: prev.host_interface(is_bridge)?,
        addresses: prev.addresses(&env.ifname)?,
        network: conf.name.clone(),
    };
    endpoint.validate("endpoint").map_err(|err| {
        let ApiError::Invalid { field, message } = &err else {
            return CniError::new(ErrorCode::InvalidNetworkConfig, err.to_string(), "");
        };
        let field = field.strip_prefix("endpoint.").unwrap_or(field);
        let (code, source) = match field.split('[').next().unwrap_or(field) {
            "container_id" => (ErrorCode::InvalidEnvironment, "CNI_CONTAINERID"),
            "interface_name" => (ErrorCode::InvalidEnvironment, "CNI_IFNAME"),
            "pod_namespace" => (ErrorCode::InvalidEnvironment, "CNI_ARGS K8S_POD_NAMESPACE"),
            "pod_name" => (
                ErrorCode::InvalidEnvironment,
                "CNI_ARGS K8S_POD_NAME (or, without it, CNI_CONTAINERID)",
            ),
            "network" => (ErrorCode::InvalidNetworkConfig, "name"),
            "host_interface" => (
                ErrorCode::InvalidNetworkConfig,
                "prevResult's host interface",
            ),
            _ => (ErrorCode::InvalidNetworkConfig, "prevResult.ips"),
        };
        CniError::new(code, format!("{source}: {message}"), "")
    })?;
    Ok(endpoint)
}

/// Whether `name` is a bridge on this node (the bridge plugin lists its bridge, e.g. `cni0`, next
/// to the pod's veth in `prevResult`).
fn is_bridge(name: &str) -> bool {
    Path::new("/sys/class/net")
        .join(name)
        .join("bridge")
        .exists()
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::BTreeMap, rc::Rc};

    use tonic::Code;

    use super::*;
    use crate::endpoints::EndpointKey;

    /// The registrations of a [`FakeAgent`], shared by its clones.
    type Registrations = Rc<RefCell<BTreeMap<EndpointKey, (Endpoint, Option<Placement>)>>>;

    /// An agent in memory: registrations by key, or unreachable; `calls` records what was called.
    #[derive(Default, Clone)]
    struct FakeAgent {
        registered: Registrations,
        calls: Rc<RefCell<Vec<String>>>,
        unreachable: bool,
        refuse: bool,
    }

    impl FakeAgent {
        fn reach(&self, call: &str) -> Result<(), AgentError> {
            self.calls.borrow_mut().push(call.to_string());
            if self.unreachable {
                return Err(AgentError::Unreachable("connection refused".into()));
            }
            if self.refuse {
                return Err(AgentError::Answered(
                    Code::InvalidArgument,
                    "endpoint.host_interface: no interface veth0 on this node".into(),
                ));
            }
            Ok(())
        }
    }

    impl Agent for FakeAgent {
        fn register(&mut self, endpoint: &Endpoint) -> Result<bool, AgentError> {
            self.reach("register")?;
            let previous = self.registered.borrow_mut().insert(
                endpoint.key(),
                (endpoint.clone(), Some(Placement::SourceWorkload)),
            );
            Ok(previous.is_none())
        }

        fn release(&mut self, key: &EndpointKey) -> Result<bool, AgentError> {
            self.reach("release")?;
            Ok(self.registered.borrow_mut().remove(key).is_some())
        }

        fn endpoints(&mut self) -> Result<Vec<(Endpoint, Option<Placement>)>, AgentError> {
            self.reach("endpoints")?;
            Ok(self.registered.borrow().values().cloned().collect())
        }
    }

    const PREV: &str = r#"{"cniVersion":"1.0.0",
        "interfaces":[{"name":"veth6c1e1a3b","mac":"8a:1c:f1:2d:3e:4f"},
                      {"name":"eth0","mac":"c2:11:22:33:44:55","sandbox":"/run/netns/pod"}],
        "ips":[{"interface":1,"address":"198.51.100.7/24","gateway":"198.51.100.1"}],
        "dns":{}}"#;

    fn conf(version: &str, prev: Option<&str>) -> String {
        let prev = prev.map_or(String::new(), |p| format!(", \"prevResult\": {p}"));
        format!(
            r#"{{"cniVersion":"{version}","name":"pods","type":"lb-cni","agentSocket":"/run/t/api.sock"{prev}}}"#
        )
    }

    fn env(command: &str) -> impl Fn(&str) -> Option<String> {
        let vars: BTreeMap<&str, String> = [
            ("CNI_COMMAND", command.to_string()),
            ("CNI_CONTAINERID", "c0ffee".into()),
            ("CNI_NETNS", "/run/netns/pod".into()),
            ("CNI_IFNAME", "eth0".into()),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=api-1".into(),
            ),
        ]
        .into();
        move |name| vars.get(name).cloned()
    }

    /// Runs `command` with `stdin` against `agent`; also returns the socket it was asked for.
    fn run_with(command: &str, stdin: &str, agent: &FakeAgent) -> (Outcome, Option<String>) {
        let mut socket = None;
        let outcome = run(stdin.as_bytes(), env(command), |path| {
            socket = Some(path.display().to_string());
            agent.clone()
        });
        (outcome, socket)
    }

    fn error(outcome: &Outcome) -> (u64, String) {
        assert!(!outcome.success, "{outcome:?}");
        let json: serde_json::Value = serde_json::from_str(&outcome.stdout).unwrap();
        (
            json["code"].as_u64().unwrap(),
            json["msg"].as_str().unwrap().to_string(),
        )
    }

    #[test]
    fn add_registers_the_pod_and_prints_prev_result_unchanged() {
        let agent = FakeAgent::default();
        let (outcome, socket) = run_with("ADD", &conf("1.0.0", Some(PREV)), &agent);
        assert!(outcome.success, "{outcome:?}");
        assert_eq!(outcome.stdout, PREV);
        assert_eq!(socket.as_deref(), Some("/run/t/api.sock"));
        let registered = agent.registered.borrow();
        let (endpoint, _) = registered.values().next().unwrap();
        assert_eq!(
            endpoint,
            &Endpoint {
                container_id: "c0ffee".into(),
                interface_name: "eth0".into(),
                namespace: "prod".into(),
                pod: "api-1".into(),
                host_interface: "veth6c1e1a3b".into(),
                addresses: vec!["198.51.100.7".parse().unwrap()],
                network: "pods".into(),
            }
        );
    }

    #[test]
    fn check_passes_for_the_registration_and_fails_without_it() {
        let agent = FakeAgent::default();
        let stdin = conf("1.0.0", Some(PREV));
        assert!(run_with("ADD", &stdin, &agent).0.success);
        let (outcome, _) = run_with("CHECK", &stdin, &agent);
        assert_eq!(
            outcome,
            Outcome {
                stdout: String::new(),
                success: true
            }
        );

        // Another address than the registered one.
        let moved = PREV.replace("198.51.100.7", "198.51.100.8");
        let (code, msg) = error(&run_with("CHECK", &conf("1.0.0", Some(&moved)), &agent).0);
        assert_eq!(
            (code, msg.as_str()),
            (
                101,
                "the lb agent's endpoint c0ffee/eth0 differs from prevResult"
            )
        );
        // Left out of the policy.
        for (_, placement) in agent.registered.borrow_mut().values_mut() {
            *placement = Some(Placement::NotPlaced);
        }
        assert_eq!(error(&run_with("CHECK", &stdin, &agent).0).0, 102);

        assert!(run_with("DEL", &stdin, &agent).0.success);
        let (code, msg) = error(&run_with("CHECK", &stdin, &agent).0);
        assert_eq!(
            (code, msg.as_str()),
            (101, "the lb agent has no endpoint c0ffee/eth0")
        );
        // CHECK came with 0.4.0.
        let (code, _) = error(&run_with("CHECK", &conf("0.3.1", Some(PREV)), &agent).0);
        assert_eq!(code, 1);
    }

    #[test]
    fn del_succeeds_when_nothing_or_no_agent_is_there() {
        let agent = FakeAgent::default();
        let stdin = conf("1.0.0", Some(PREV));
        assert!(run_with("ADD", &stdin, &agent).0.success);
        for _ in 0..2 {
            let (outcome, _) = run_with("DEL", &stdin, &agent);
            assert_eq!(outcome.stdout, "");
            assert!(outcome.success);
        }
        assert!(agent.registered.borrow().is_empty());
        // DEL needs no prevResult; no agent is a success too.
        let gone = FakeAgent {
            unreachable: true,
            ..Default::default()
        };
        let (outcome, _) = run_with("DEL", &conf("1.0.0", None), &gone);
        assert!(outcome.success, "{outcome:?}");
        assert_eq!(*gone.calls.borrow(), ["release"]);
        // But ADD then asks the runtime to try again later.
        let (code, msg) = error(&run_with("ADD", &stdin, &gone).0);
        assert_eq!(code, 11);
        assert!(msg.contains("not reachable at /run/t/api.sock"), "{msg}");
    }

    #[test]
    fn a_refusal_is_an_error_with_the_agents_message() {
        let refusing = FakeAgent {
            refuse: true,
            ..Default::default()
        };
        let outcome = run_with("ADD", &conf("0.4.0", Some(PREV)), &refusing).0;
        let json: serde_json::Value = serde_json::from_str(&outcome.stdout).unwrap();
        assert_eq!(
            json["cniVersion"], "0.4.0",
            "errors in the config's version"
        );
        assert_eq!(json["code"], 100);
        assert_eq!(
            json["details"],
            "endpoint.host_interface: no interface veth0 on this node"
        );
    }

    #[test]
    fn version_and_bad_input_need_no_agent() {
        let agent = FakeAgent::default();
        let (outcome, socket) = run_with("VERSION", r#"{"cniVersion":"0.4.0"}"#, &agent);
        assert!(outcome.success);
        let json: serde_json::Value = serde_json::from_str(&outcome.stdout).unwrap();
        assert_eq!(json["cniVersion"], "0.4.0");
        assert_eq!(
            json["supportedVersions"],
            serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        // VERSION with empty stdin answers in the latest version.
        let (outcome, _) = run_with("VERSION", "", &agent);
        assert!(outcome.stdout.starts_with(r#"{"cniVersion":"1.1.0""#));

        let cases: [(&str, String, u64, &str); 9] = [
            (
                "ADD",
                "{".into(),
                6,
                "cannot read the network configuration on stdin",
            ),
            (
                "ADD",
                conf("0.2.0", Some(PREV)),
                1,
                "cniVersion \"0.2.0\" is not supported",
            ),
            ("ADD", conf("1.0.0", None), 7, "prevResult is missing"),
            (
                "ADD",
                conf(
                    "1.0.0",
                    Some(r#"{"interfaces":[{"name":"eth0","sandbox":"/x"}]}"#),
                ),
                7,
                "prevResult names no host-side interface",
            ),
            (
                "FROB",
                conf("1.0.0", None),
                4,
                "CNI_COMMAND \"FROB\" is not one of",
            ),
            // GC and STATUS came with 1.1.0.
            (
                "GC",
                conf("1.0.0", None),
                1,
                "GC is not part of cniVersion 1.0.0",
            ),
            (
                "STATUS",
                conf("0.4.0", None),
                1,
                "STATUS is not part of cniVersion 0.4.0",
            ),
            (
                "GC",
                conf("1.1.0", None),
                7,
                "GC without cni.dev/valid-attachments",
            ),
            (
                "ADD",
                conf(
                    "1.0.0",
                    Some(&PREV.replace("veth6c1e1a3b", "veth-name-too-long")),
                ),
                7,
                "prevResult's host interface: \"veth-name-too-long\" is not an interface name",
            ),
        ];
        for (command, stdin, code, msg) in cases {
            let (outcome, _) = run_with(command, &stdin, &agent);
            let (got_code, got_msg) = error(&outcome);
            assert_eq!(got_code, code, "{command} {stdin}: {got_msg}");
            assert!(got_msg.starts_with(msg), "{command} {stdin}: {got_msg}");
        }
        assert!(agent.calls.borrow().is_empty(), "{:?}", agent.calls);
        assert!(socket.is_none());
    }

    #[test]
    fn without_kubernetes_args_the_pod_is_named_after_its_container() {
        let agent = FakeAgent::default();
        let vars = env("ADD");
        let outcome = run(
            conf("1.0.0", Some(PREV)).as_bytes(),
            |name| (name != "CNI_ARGS").then(|| vars(name)).flatten(),
            |_| agent.clone(),
        );
        assert!(outcome.success, "{outcome:?}");
        let registered = agent.registered.borrow();
        let (endpoint, _) = registered.values().next().unwrap();
        assert_eq!(endpoint.pod_name(), "default/c0ffee");
    }

    /// A registration of `container_id`/eth0 on `network`.
    fn registration(
        container_id: &str,
        network: &str,
    ) -> (EndpointKey, (Endpoint, Option<Placement>)) {
        let endpoint = Endpoint {
            container_id: container_id.into(),
            interface_name: "eth0".into(),
            namespace: "prod".into(),
            pod: container_id.into(),
            host_interface: format!("veth{container_id}"),
            addresses: vec!["198.51.100.7".parse().unwrap()],
            network: network.into(),
        };
        (endpoint.key(), (endpoint, Some(Placement::SourceWorkload)))
    }

    #[test]
    fn gc_releases_only_this_networks_attachments_the_runtime_no_longer_has() {
        let agent = FakeAgent::default();
        agent.registered.borrow_mut().extend([
            registration("live", "pods"),
            registration("gone", "pods"),
            registration("gone2", "pods"),
            registration("elsewhere", "other"),
            registration("unnamed", ""),
        ]);
        let stdin = r#"{"cniVersion":"1.1.0","name":"pods","type":"lb-cni",
            "agentSocket":"/run/t/api.sock",
            "cni.dev/valid-attachments":[{"containerID":"live","ifname":"eth0"},
                                         {"containerID":"elsewhere","ifname":"eth0"}]}"#;
        let (outcome, _) = run_with("GC", stdin, &agent);
        assert_eq!(
            outcome,
            Outcome {
                stdout: String::new(),
                success: true
            }
        );
        let left: Vec<String> = agent
            .registered
            .borrow()
            .keys()
            .map(|k| k.0.clone())
            .collect();
        assert_eq!(left, ["elsewhere", "live", "unnamed"]);
        assert_eq!(*agent.calls.borrow(), ["endpoints", "release", "release"]);
        // Nothing stale: nothing released; no agent: the runtime tries again later.
        assert!(run_with("GC", stdin, &agent).0.success);
        assert_eq!(agent.calls.borrow().len(), 4);
        let gone = FakeAgent {
            unreachable: true,
            ..Default::default()
        };
        assert_eq!(error(&run_with("GC", stdin, &gone).0).0, 11);
    }

    #[test]
    fn status_is_ready_only_while_the_agent_answers() {
        let stdin = conf("1.1.0", None);
        let (outcome, socket) = run_with("STATUS", &stdin, &FakeAgent::default());
        assert!(outcome.success && outcome.stdout.is_empty(), "{outcome:?}");
        assert_eq!(socket.as_deref(), Some("/run/t/api.sock"));
        let gone = FakeAgent {
            unreachable: true,
            ..Default::default()
        };
        let (code, msg) = error(&run_with("STATUS", &stdin, &gone).0);
        assert_eq!(code, 50);
        assert!(msg.contains("not reachable at /run/t/api.sock"), "{msg}");
    }
}
