//! `lb-cni`: the CNI chained plugin that registers a pod's endpoint with the node's lb agent
//! (`lb_agent::cni`). The container runtime runs it with `CNI_COMMAND` and the other `CNI_*`
//! variables set and the network configuration on stdin; it prints the result (or a CNI error)
//! on stdout and logs on stderr.
//!
//! ```json
//! {"cniVersion": "1.0.0", "name": "pods", "plugins": [
//!   {"type": "ptp", "ipam": {"type": "host-local", "subnet": "198.51.100.0/24"}},
//!   {"type": "lb-cni", "agentSocket": "/run/lb/api.sock"}
//! ]}
//! ```

use std::{
    io::{Read, Write},
    panic::{self, AssertUnwindSafe},
    process::ExitCode,
};

use lb_agent::cni::{
    agent::GrpcAgent,
    command::{self, Outcome},
    error::{CniError, ErrorCode},
};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => panic::catch_unwind(AssertUnwindSafe(|| {
            command::run(&stdin, |name| std::env::var(name).ok(), GrpcAgent::new)
        }))
        .unwrap_or_else(|_| failure(ErrorCode::Internal, "lb-cni panicked (a bug)", "")),
        Err(err) => failure(ErrorCode::Io, "cannot read stdin", &err.to_string()),
    };
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(outcome.stdout.as_bytes())
        .and_then(|()| stdout.flush());
    if outcome.success && written.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn failure(code: ErrorCode, msg: &str, details: &str) -> Outcome {
    Outcome {
        stdout: CniError::new(code, msg, details).to_json("1.0.0"),
        success: false,
    }
}
