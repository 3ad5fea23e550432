//! Log records of the eBPF programs (aya-log) forwarded into the agent's log. The datapath logs only
//! rare events (a VIP packet it had to drop); records go through the `AYA_LOGS` ring buffer, which
//! is lossy when full, so a flood costs the datapath a failed reservation, never a stall.
//! aya-log emits them with the `log` crate, which `tracing-subscriber` forwards into `tracing`.

use anyhow::{Context, Result};
use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::{
    io::{unix::AsyncFd, Interest},
    task::JoinHandle,
};
use tracing::warn;

/// Takes the object's `AYA_LOGS` ring buffer and spawns a task that writes every record to the log
/// as soon as the ring buffer has data.
pub fn forward(ebpf: &mut Ebpf) -> Result<JoinHandle<()>> {
    let logger = EbpfLogger::init(ebpf).context("opening the eBPF log ring buffer (AYA_LOGS)")?;
    // SAFETY: the descriptor is the ring buffer map's, owned by `logger`, which the `AsyncFd` owns:
    // it stays open and the same for the `AsyncFd`'s whole life.
    let mut ring = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|err| anyhow::anyhow!("watching the eBPF log ring buffer: {err}"))?;
    Ok(tokio::spawn(async move {
        loop {
            match ring.readable_mut().await {
                Ok(mut ready) => {
                    ready.get_inner_mut().flush();
                    ready.clear_ready();
                }
                Err(err) => {
                    warn!("eBPF log forwarding stopped: {err}");
                    return;
                }
            }
        }
    }))
}
