//! The container runtime's side of CNI, for the tests: runs a plugin binary (the reference
//! plugins of Debian's `containernetworking-plugins` in [`REFERENCE_PLUGINS`], or `lb-cni`) in a
//! namespace with the `CNI_*` variables and a network configuration on stdin, as libcni does for
//! each plugin of a conflist, and hands back what it printed.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{agent::agent_binary, netns::Netns};

/// Where Debian's `containernetworking-plugins` puts the plugins (`CNI_PATH`).
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// Path of the `lb-cni` binary: next to [`agent_binary`] (cargo builds both into one directory).
pub fn lb_cni_binary() -> PathBuf {
    agent_binary().with_file_name("lb-cni")
}

/// A reference plugin, e.g. `ptp`; panics with the package to install when it is missing.
pub fn reference_plugin(name: &str) -> PathBuf {
    let path = Path::new(REFERENCE_PLUGINS).join(name);
    assert!(
        path.is_file(),
        "{} is missing: apt-get install containernetworking-plugins (cargo xtask test does)",
        path.display()
    );
    path
}

/// One pod's network attachment as the runtime knows it.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`: the pod's namespace.
    pub netns: PathBuf,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: String,
}

impl Attachment {
    /// `eth0` in `pod`, with the Kubernetes pod namespace and name in `CNI_ARGS` as the kubelet's
    /// runtime passes them.
    pub fn kubernetes_pod(pod: &Netns, container_id: &str, namespace: &str, name: &str) -> Self {
        Self {
            container_id: container_id.to_string(),
            netns: PathBuf::from(format!("/run/netns/{}", pod.name())),
            ifname: "eth0".into(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"),
        }
    }
}

/// What a plugin printed and how it exited.
#[derive(Debug, Clone)]
pub struct PluginOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl PluginOutput {
    /// The result (stdout as JSON); panics with the plugin's output if it failed.
    pub fn result(&self, what: &str) -> Value {
        assert!(self.success, "{what} failed: {self:?}");
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e}): {self:?}"))
    }

    /// The CNI error's `code` and `msg`; panics if the plugin succeeded or printed no error.
    pub fn error(&self, what: &str) -> (u64, String) {
        assert!(!self.success, "{what} succeeded: {self:?}");
        let json: Value = serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{what}: no CNI error JSON ({e}): {self:?}"));
        (
            json["code"].as_u64().expect("code"),
            json["msg"].as_str().expect("msg").to_string(),
        )
    }
}

/// Runs `plugin` for `command` (ADD, DEL, CHECK, VERSION) in `runtime_ns` (the node's namespace,
/// where the runtime runs plugins) with `config` on stdin.
pub fn exec(
    runtime_ns: &Netns,
    plugin: &Path,
    command: &str,
    attachment: &Attachment,
    config: &Value,
) -> Result<PluginOutput> {
    let mut cmd = runtime_ns.command(plugin.to_str().context("plugin path")?);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &attachment.container_id)
        .env("CNI_NETNS", &attachment.netns)
        .env("CNI_IFNAME", &attachment.ifname)
        .env("CNI_ARGS", &attachment.args)
        .env("CNI_PATH", REFERENCE_PLUGINS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {}", plugin.display()))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(config.to_string().as_bytes())
        .context("writing the network configuration")?;
    let output = child.wait_with_output().context("waiting for the plugin")?;
    Ok(PluginOutput {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// The configuration libcni hands a plugin of a conflist: the plugin's own entry with the list's
/// `cniVersion` and `name`, and the result of the plugins before it as `prevResult` (ADD: the
/// previous plugin's; DEL and CHECK: the cached result of the whole chain).
pub fn chained_config(list: &Value, plugin: &Value, prev_result: Option<&Value>) -> Value {
    let mut config = plugin.clone();
    config["cniVersion"] = list["cniVersion"].clone();
    config["name"] = list["name"].clone();
    if let Some(prev) = prev_result {
        config["prevResult"] = prev.clone();
    }
    config
}
