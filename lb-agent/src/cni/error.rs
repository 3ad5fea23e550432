//! The CNI error result: what a plugin prints on stdout, with a non-zero exit, when it fails.

use serde::Serialize;

/// Error codes of the CNI spec (1-99) and of this plugin (100 and up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    InvalidEnvironment = 4,
    Io = 5,
    DecodeFailure = 6,
    InvalidNetworkConfig = 7,
    /// The runtime may retry: the agent is not reachable yet (starting, restarting).
    TryAgainLater = 11,
    /// STATUS: the plugin cannot serve ADD (the agent does not answer).
    NotAvailable = 50,
    /// The agent refused the endpoint (the message says why and names the field).
    AgentRefused = 100,
    /// CHECK: the agent has no such registration, or another one.
    NotRegistered = 101,
    /// CHECK: registered, but left out of the policy (a conflict the agent logs).
    NotEnforced = 102,
    /// A bug: the plugin panicked (caught, so the runtime still gets a result).
    Internal = 199,
}

/// A failure, as the runtime reads it: `{cniVersion, code, msg, details}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON the plugin prints, in `cni_version` (the config's, when it could be read).
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Out<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Out {
            cni_version,
            code: self.code as u32,
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or_else(|_| format!("{{\"code\":{},\"msg\":\"lb-cni\"}}", self.code as u32))
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code as u32)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}
