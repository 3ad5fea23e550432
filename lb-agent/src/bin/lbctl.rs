//! `lbctl`: inspect the datapath and change services.
//!
//! Reading goes to the pinned maps directly (`lb_agent::inspect`), with or without a running
//! agent: on the node only. Changes go through the agent's gRPC API (`lb_agent::ctl`), so they are
//! validated, merged with the other sources and applied by the agent, which owns the maps: on its
//! unix socket (`--socket`, the default), or from elsewhere on its TCP listener with mutual TLS
//! (`--endpoint https://HOST:PORT --tls-cert FILE --tls-key FILE --tls-ca FILE`), where the
//! commands that read the maps are refused rather than answered from the local node's maps.
//!
//! ```text
//! lbctl services              # VIP:port, protocol, mode, service id, Maglev table size
//! lbctl backends              # address:port, id, active|drained|retired, services, live flows
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
//! lbctl state                 # the API's services, what is applied (or adopted), retired backends
//! lbctl events [--count N]    # the agent's events as they happen
//! lbctl endpoints             # pods' endpoints the CNI plugin registered: interface, addresses, pod
//! lbctl flow-events on | off | reset | status   # switch flow events at runtime (hitless reload)
//! ```

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_agent::{
    config::{ForwardingMode, HashFields},
    ctl::{self, BackendArg, ServiceArg, ServiceOptions},
    grpc::{
        client::{connect_tls, connect_unix, parse_endpoint, tls_failure, ClientTls, TlsFailure},
        pb::load_balancer_client::LoadBalancerClient,
    },
    inspect::Pinned,
    pins::DEFAULT_BPFFS_DIR,
};
use tonic::transport::{Channel, Uri};

#[derive(Parser)]
#[command(about = "Inspect the lb datapath and change services through the agent")]
struct Args {
    /// The agent's pin directory (its --bpffs-dir), for the read-only commands.
    #[arg(long, default_value = DEFAULT_BPFFS_DIR, value_name = "DIR")]
    bpffs_dir: PathBuf,
    /// The agent's gRPC unix socket (its --grpc-socket), for the commands that go through the API.
    #[arg(long, default_value = "/run/lb/api.sock", value_name = "PATH")]
    socket: PathBuf,
    /// The agent's API on TCP with TLS (its --grpc-tcp) instead of the socket, e.g.
    /// https://192.0.2.1:50051; needs --tls-cert, --tls-key and --tls-ca.
    #[arg(
        long,
        value_name = "URL",
        value_parser = |text: &str| match parse_endpoint(text) {
            Ok(_) => Ok(text.to_string()),
            Err(err) => Err(format!("{err:#}")),
        },
        conflicts_with = "socket",
        requires_all = ["tls_cert", "tls_key", "tls_ca"],
    )]
    endpoint: Option<String>,
    /// The client certificate (PEM) presented to the agent: signed by its --grpc-tls-client-ca.
    #[arg(long, value_name = "FILE", requires = "endpoint")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "endpoint")]
    tls_key: Option<PathBuf>,
    /// The CA certificate(s) (PEM) the agent's certificate (its --grpc-tls-cert) must chain to.
    #[arg(long, value_name = "FILE", requires = "endpoint")]
    tls_ca: Option<PathBuf>,
    /// The name the agent's certificate must carry, when it is not the endpoint's host (e.g.
    /// connecting by IP address to a certificate that names only DNS names).
    #[arg(long, value_name = "NAME", requires = "endpoint")]
    tls_server_name: Option<String>,
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
    /// Without a subcommand: every backend the datapath holds, from its maps: address:port, id,
    /// state (active: a service's table names it; drained: only its tracked flows reach it;
    /// retired: no service names it any more, kept while its flows live), how many services'
    /// tables name it and how many live tracked flows.
    Backends {
        #[command(subcommand)]
        command: Option<BackendsCommand>,
    },
    /// Change one backend of a service defined through the API.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Set, show or clear the policy defined through the API.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The services defined through the API, how many the agent applied from all sources, and
    /// the retired backends it keeps for their tracked flows.
    State,
    /// The agent's events (changes, reconciles, health, policy verdicts, and flow events while
    /// they are on) as they happen.
    Events {
        /// Stop after this many.
        #[arg(long)]
        count: Option<usize>,
    },
    /// The pods' endpoints the CNI plugin (lb-cni) registered with the agent: host interface,
    /// addresses, pod, container id/interface, and whether the agent enforces a policy there.
    Endpoints,
    /// Switch the datapath's flow events at runtime (a hitless reload of the programs), or show
    /// the switch. The API's setting overrides the config file's `flow_events` and the agent's
    /// --flow-events until `reset`, or until the file's `flow_events` changes.
    FlowEvents {
        #[arg(value_enum)]
        action: FlowEventsAction,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum FlowEventsAction {
    /// Report flow events (`lbctl events` shows them).
    On,
    Off,
    /// Drop the API's setting: the config file's `flow_events`, else --flow-events, decides.
    Reset,
    /// Whether they are on, which setting decides, and each source's setting.
    Status,
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
    /// Replace the backends (and weights) of a service defined through the API.
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

/// Where the commands that go through the API reach it.
enum Api {
    Unix(PathBuf),
    /// The endpoint as given, and parsed.
    Tls(String, Uri, ClientTls),
}

impl Api {
    fn from_args(args: &Args) -> Result<Self> {
        let (Some(endpoint), Some(cert), Some(key), Some(ca)) =
            (&args.endpoint, &args.tls_cert, &args.tls_key, &args.tls_ca)
        else {
            return Ok(Self::Unix(args.socket.clone())); // clap requires all four together
        };
        let tls = ClientTls::from_files(cert, key, ca, args.tls_server_name.clone())?;
        Ok(Self::Tls(endpoint.clone(), parse_endpoint(endpoint)?, tls))
    }

    /// Adds what a failure over TLS says about the certificates, and which option to check.
    fn explain(&self, err: anyhow::Error) -> anyhow::Error {
        let Self::Tls(endpoint, ..) = self else {
            return err;
        };
        let hint = match err.chain().find_map(tls_failure) {
            Some(TlsFailure::AgentCertificate(_)) => format!(
                "the agent at {endpoint} presented a certificate this client does not accept: \
                 --tls-ca must hold the CA that signed the agent's --grpc-tls-cert, and that \
                 certificate must name the endpoint's host or --tls-server-name"
            ),
            Some(TlsFailure::AlertReceived(alert)) => format!(
                "the agent at {endpoint} refused the client certificate (--tls-cert) with TLS \
                 alert {alert}: it must be signed by the CA of the agent's --grpc-tls-client-ca"
            ),
            // TLS 1.3: the agent checks the client certificate after the handshake, and its alert
            // can be lost when it closes the connection under our first request.
            None if err.chain().any(|cause| cause.is::<ctl::ConnectionFailed>()) => format!(
                "the agent at {endpoint} closed the connection before answering: if it is \
                 running, it refused the client certificate (--tls-cert), which must be signed by \
                 the CA of its --grpc-tls-client-ca"
            ),
            None => return err,
        };
        err.context(hint)
    }

    async fn connect(&self) -> Result<LoadBalancerClient<Channel>> {
        match self {
            Self::Unix(socket) => connect_unix(socket)
                .await
                .with_context(|| format!("the agent's API at {} (--socket)", socket.display())),
            Self::Tls(endpoint, uri, tls) => connect_tls(uri, tls)
                .await
                .with_context(|| format!("the agent's API at {endpoint} (--endpoint)")),
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(endpoint) = &args.endpoint {
        let local = match args.command {
            Command::Services => Some("services"),
            Command::Backends { command: None } => Some("backends"),
            Command::Flows { .. } => Some("flows"),
            Command::Counters { .. } => Some("counters"),
            _ => None,
        };
        if let Some(name) = local {
            bail!(
                "`lbctl {name}` reads the datapath's pinned maps on this node (--bpffs-dir), not \
                 the agent's API, so it cannot reach {endpoint}: run it on the agent's node without \
                 --endpoint (`lbctl --endpoint ... state` lists the API's services remotely)"
            );
        }
    }
    let pinned = Pinned::new(&args.bpffs_dir);
    match args.command {
        Command::Services => {
            for service in pinned.services()? {
                println!("{service}");
            }
        }
        Command::Backends { command: None } => {
            for backend in pinned.backends()? {
                println!("{backend}");
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
        _ => {
            let api = Api::from_args(&args)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime
                .block_on(change(&api, args.command))
                .map_err(|err| api.explain(err))?;
        }
    }
    Ok(())
}

/// The commands that go through the agent's API.
async fn change(api: &Api, command: Command) -> Result<()> {
    let mut client = api.connect().await?;
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
        Command::Backends {
            command: Some(BackendsCommand::Set { service, backends }),
        } => {
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
        Command::Endpoints => ctl::endpoints(&mut client).await?,
        Command::FlowEvents { action } => match action {
            FlowEventsAction::On => ctl::set_flow_events(&mut client, Some(true)).await?,
            FlowEventsAction::Off => ctl::set_flow_events(&mut client, Some(false)).await?,
            FlowEventsAction::Reset => ctl::set_flow_events(&mut client, None).await?,
            FlowEventsAction::Status => ctl::flow_events(&mut client).await?,
        },
        Command::Events { count } => {
            ctl::events(&mut client, count).await?;
            Vec::new()
        }
        Command::Services
        | Command::Backends { command: None }
        | Command::Flows { .. }
        | Command::Counters { .. } => {
            unreachable!("read from the maps")
        }
    };
    for line in lines {
        println!("{line}");
    }
    Ok(())
}
