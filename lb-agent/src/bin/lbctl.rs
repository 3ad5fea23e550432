//! `lbctl`: what the pinned datapath holds, read from its maps (`lb_agent::inspect`), with or
//! without a running agent. Read-only.
//!
//! ```text
//! lbctl services              # VIP:port, protocol, mode, service id, Maglev table size
//! lbctl flows [--limit N]     # tracked flows: client -> VIP via backend, state, idle time
//! lbctl counters [--all]      # datapath counters summed over CPUs (non-zero ones by default)
//! ```

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use lb_agent::{inspect::Pinned, pins::DEFAULT_BPFFS_DIR};

#[derive(Parser)]
#[command(about = "Inspect the pinned lb datapath (read-only)")]
struct Args {
    /// The agent's pin directory (its --bpffs-dir).
    #[arg(long, default_value = DEFAULT_BPFFS_DIR, value_name = "DIR")]
    bpffs_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Services: VIP:port (`*`: every port), protocol, mode, id, Maglev table size.
    Services,
    /// Tracked flows, both families: client -> VIP via the backend the entry names, its state
    /// and idle time.
    Flows {
        /// Show at most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Datapath counters summed over CPUs (drops and passes by reason, forwarded packets).
    Counters {
        /// Also those at zero.
        #[arg(long)]
        all: bool,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    let pinned = Pinned::new(&args.bpffs_dir);
    match args.command {
        Command::Services => {
            for service in pinned.services()? {
                println!("{service}");
            }
        }
        Command::Flows { limit } => {
            let flows = pinned.flows(limit)?;
            for flow in &flows {
                println!("{flow}");
            }
            eprintln!("{} flows", flows.len());
        }
        Command::Counters { all } => {
            for (counter, value) in pinned.counters()? {
                if all || value > 0 {
                    println!("{:<32} {value}", counter.name());
                }
            }
        }
    }
    Ok(())
}
