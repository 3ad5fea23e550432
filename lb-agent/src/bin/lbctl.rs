//! `lbctl`: inspect the datapath and change services.
//!
//! Reading goes to the pinned maps directly (`lb_agent::inspect`), with or without a running
//! agent. Changes go through the agent's gRPC API on its unix socket (`lb_agent::ctl`), so they are
//! validated, merged with the other sources and applied by the agent, which owns the maps.
//!
//! ```text
//! lbctl services              # VIP:port, protocol, mode, service id, Maglev table size
//! lbctl flows [--limit N]     # tracked flows: client -> VIP via backend, state, idle time
//! lbctl counters [--all]      # datapath counters summed over CPUs (non-zero ones by default)
//!
//! lbctl service add NAME VIP:PORT/PROTO [ADDR:PORT[=WEIGHT]...] [--mode M] [--hash H] [--table-size N]
//! lbctl service upsert FILE   # every service of a config-file `services:` list
//! lbctl service delete VIP:PORT/PROTO
//! lbctl backends set VIP:PORT/PROTO ADDR:PORT[=WEIGHT]...
//! lbctl backend weight VIP:PORT/PROTO ADDR:PORT WEIGHT    # 0 drains
//! lbctl policy set FILE       # the API's policy: YAML of the config file's `policy:` section
//! lbctl policy show | clear
//! lbctl state                 # the services defined through the API
//! lbctl events [--count N]    # the agent's events as they happen
//! ```

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_agent::{
    config::{ForwardingMode, HashFields},
    ctl::{self, BackendArg, ServiceArg, ServiceOptions},
    grpc::client::connect_unix,
    inspect::Pinned,
    pins::DEFAULT_BPFFS_DIR,
};

#[derive(Parser)]
#[command(about = "Inspect the lb datapath and change services through the agent")]
struct Args {
    /// The agent's pin directory (its --bpffs-dir), for the read-only commands.
    #[arg(long, default_value = DEFAULT_BPFFS_DIR, value_name = "DIR")]
    bpffs_dir: PathBuf,
    /// The agent's gRPC unix socket (its --grpc-socket), for the commands that change state.
    #[arg(long, default_value = "/run/lb/api.sock", value_name = "PATH")]
    socket: PathBuf,
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
    /// Create, replace or delete a service defined through the agent's API.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Replace the backends of a service defined through the API.
    #[command(subcommand)]
    Backends(BackendsCommand),
    /// Change one backend of a service defined through the API.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Set, show or clear the policy defined through the API.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The services defined through the API, and how many the agent applied from all sources.
    State,
    /// The agent's events (changes, reconciles, health, policy verdicts) as they happen.
    Events {
        /// Stop after this many.
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Create or replace a service.
    Add {
        name: String,
        /// VIP:PORT/PROTOCOL, e.g. 198.51.100.10:80/tcp or [2001:db8::10]:53/udp.
        service: ServiceArg,
        /// ADDRESS:PORT[=WEIGHT], weight 1 when absent.
        backends: Vec<BackendArg>,
        #[arg(long, value_enum, default_value_t = Mode::Dnat)]
        mode: Mode,
        #[arg(long, value_enum, default_value_t = Hash::FiveTuple)]
        hash: Hash,
        /// Maglev table size, a prime in 251..=131071 (default 16381).
        #[arg(long)]
        table_size: Option<u32>,
    },
    /// Create or replace every service of a file's `services:` list (the config file's format,
    /// health checks included).
    Upsert { file: PathBuf },
    /// Delete a service.
    Delete { service: ServiceArg },
}

#[derive(Subcommand)]
enum BackendsCommand {
    /// Replace the backends (and weights) of a service.
    Set {
        service: ServiceArg,
        backends: Vec<BackendArg>,
    },
}

#[derive(Subcommand)]
enum BackendCommand {
    /// Set one backend's weight; 0 drains it (no new flows, its connections continue).
    Weight {
        service: ServiceArg,
        backend: SocketAddr,
        weight: u32,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Set it from FILE: YAML of the config file's `policy:` section (its content), validated
    /// and merged with the file's and Kubernetes' policy as a config edit would be.
    Set { file: PathBuf },
    /// Print it (YAML; nothing when none).
    Show,
    /// Remove it.
    Clear,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Dnat,
    Snat,
    DsrL2,
    DsrIpip,
}

#[derive(Clone, Copy, ValueEnum)]
enum Hash {
    FiveTuple,
    SourceIp,
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
        command => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(change(&args.socket, command))?;
        }
    }
    Ok(())
}

/// The commands that go through the agent's API.
async fn change(socket: &std::path::Path, command: Command) -> Result<()> {
    let mut client = connect_unix(socket)
        .await
        .with_context(|| format!("the agent's API at {} (--socket)", socket.display()))?;
    let lines = match command {
        Command::Service(ServiceCommand::Add {
            name,
            service,
            backends,
            mode,
            hash,
            table_size,
        }) => {
            let options = ServiceOptions {
                name,
                mode: match mode {
                    Mode::Dnat => ForwardingMode::Dnat,
                    Mode::Snat => ForwardingMode::Snat,
                    Mode::DsrL2 => ForwardingMode::DsrL2,
                    Mode::DsrIpip => ForwardingMode::DsrIpip,
                },
                hash: match hash {
                    Hash::FiveTuple => HashFields::FiveTuple,
                    Hash::SourceIp => HashFields::SourceIp,
                },
                table_size,
            };
            vec![ctl::add_service(&mut client, service, options, &backends).await?]
        }
        Command::Service(ServiceCommand::Upsert { file }) => {
            let yaml = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            ctl::upsert_file(&mut client, &yaml).await?
        }
        Command::Service(ServiceCommand::Delete { service }) => {
            vec![ctl::delete_service(&mut client, service).await?]
        }
        Command::Backends(BackendsCommand::Set { service, backends }) => {
            vec![ctl::set_backends(&mut client, service, &backends).await?]
        }
        Command::Backend(BackendCommand::Weight {
            service,
            backend,
            weight,
        }) => vec![ctl::set_weight(&mut client, service, backend, weight).await?],
        Command::Policy(PolicyCommand::Set { file }) => {
            let yaml = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            vec![ctl::set_policy(&mut client, yaml).await?]
        }
        Command::Policy(PolicyCommand::Show) => {
            print!("{}", ctl::policy(&mut client).await?);
            Vec::new()
        }
        Command::Policy(PolicyCommand::Clear) => {
            vec![ctl::set_policy(&mut client, String::new()).await?]
        }
        Command::State => ctl::state(&mut client).await?,
        Command::Events { count } => {
            ctl::events(&mut client, count).await?;
            Vec::new()
        }
        Command::Services | Command::Flows { .. } | Command::Counters { .. } => {
            unreachable!("read from the maps")
        }
    };
    for line in lines {
        println!("{line}");
    }
    Ok(())
}
