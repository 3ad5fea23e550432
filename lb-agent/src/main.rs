//! `lb-agent`: the node agent. `run` loads the XDP datapath, attaches it and keeps its maps in line
//! with the config file (and Kubernetes, when enabled) until SIGINT/SIGTERM, leaving it attached and
//! pinned for the next agent; `detach` removes the pinned datapath; `check` validates a config file.

use std::{
    io::IsTerminal,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use lb_agent::{
    agent::{self, AgentOptions, KubeApi},
    config::Config,
    datapath::{AttachMode, Capacity, PinOptions},
    endpoints::store::DEFAULT_STATE_DIR,
    grpc::TlsConfig,
    pins::{PinDir, DEFAULT_BPFFS_DIR},
};
use lb_common::service::limits;

#[derive(Parser)]
#[command(version, about = "eBPF/XDP load balancer node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of `Run` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Load the datapath, attach it and keep its maps in line with CONFIG (re-read when the file
    /// changes or on SIGHUP) until SIGINT/SIGTERM.
    Run {
        /// Service configuration (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// Interface to attach to; repeat for every interface that receives client traffic or
        /// backend replies.
        #[arg(long = "iface", short, required_unless_present = "workload_interfaces")]
        interfaces: Vec<String>,
        /// Program for every --iface: `xdp` (lb_xdp, every forwarding mode; best on physical
        /// NICs) or `tc` (lb_tc at tcx ingress, every forwarding mode too; best on veths, where
        /// XDP forces NAPI, copies cloned skbs and turns TSO off on the peer).
        #[arg(long = "attach", default_value = "xdp", value_name = "xdp|tc")]
        attach_mode: AttachMode,
        /// Host side of a workload's veth (a pod interface, where the policy programs also run);
        /// repeat for each. Gets TC split around the policy (whatever --attach says): requests to
        /// a VIP are translated before the policy checks the workload's egress, so its rules see
        /// the backend chosen, not the VIP; replies are turned back into the VIP at its veth's
        /// egress, after the policy. DNAT only there: such a workload's requests to SNAT/DSR
        /// services are served as DNAT (its replies reach this node by its route anyway).
        #[arg(long = "workload-iface", value_name = "IFACE")]
        workload_interfaces: Vec<String>,
        /// Serve /metrics, /healthz and /readyz on this address.
        #[arg(long, value_name = "ADDR:PORT")]
        metrics_addr: Option<SocketAddr>,
        /// How often to check the config file for changes, besides watching its directory with
        /// inotify (which notices an edit at once): the fallback for filesystems without inotify.
        #[arg(long, default_value = "2000", value_name = "MILLISECONDS",
              value_parser = clap::value_parser!(u64).range(1..))]
        config_poll_ms: u64,
        /// How often to refresh metrics and log the datapath counters (0 = do not log).
        #[arg(long, default_value = "10", value_name = "SECONDS")]
        stats_interval: u64,
        /// Entries of each connection tracking table (IPv4 flows, IPv6 flows unless
        /// --conntrack-entries-v6 is given, per-flow reply translations).
        #[arg(long, default_value_t = limits::DEFAULT_CONNTRACK_ENTRIES,
              value_parser = clap::value_parser!(u32).range(1..))]
        conntrack_entries: u32,
        /// Entries of the IPv6 flow table [default: --conntrack-entries]. The tables are
        /// allocated whole at start, so a node with few IPv6 flows can keep this one small.
        #[arg(long, value_name = "ENTRIES", value_parser = clap::value_parser!(u32).range(1..))]
        conntrack_entries_v6: Option<u32>,
        /// Services the datapath holds (default 16384, at most 65536). Each costs 24 bytes of
        /// statistics per CPU: lower it on nodes with many CPUs and few services. Another value
        /// than the pinned maps' carries them over into maps of the new size.
        #[arg(long, default_value_t = limits::DEFAULT_SERVICES,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(limits::SERVICES_LIMIT)))]
        max_services: u32,
        /// Backends of all services together the datapath holds (default 131071, at most
        /// 1048575); 24 bytes of statistics per CPU each, as for services.
        #[arg(long, default_value_t = limits::DEFAULT_BACKENDS - 1,
              value_parser = clap::value_parser!(u32).range(1..i64::from(limits::BACKENDS_LIMIT)))]
        max_backends: u32,
        /// Report the datapath's load-balancing decisions on the event stream (`lbctl events`,
        /// gRPC StreamEvents): each new flow's backend (and why it was chosen) and each packet to
        /// a service dropped before it had a backend (with the reason). Off: the datapath is
        /// loaded without the reporting and pays nothing for it. The config file's `flow_events`
        /// overrides it, and `lbctl flow-events on|off` both, at runtime.
        #[arg(long)]
        flow_events: bool,
        /// Also take services from Kubernetes (in-cluster account or $KUBECONFIG).
        #[arg(long)]
        kubernetes: bool,
        /// Kubernetes from this kubeconfig file (implies --kubernetes).
        #[arg(long, value_name = "FILE")]
        kubeconfig: Option<PathBuf>,
        /// Kubernetes API at this plain URL, e.g. `kubectl proxy` (implies --kubernetes).
        #[arg(long, value_name = "URL")]
        kube_api_url: Option<String>,
        /// This node's name, for externalTrafficPolicy/internalTrafficPolicy Local.
        #[arg(long)]
        node_name: Option<String>,
        /// Addresses NodePort services are served on; repeatable.
        #[arg(long = "node-address")]
        node_addresses: Vec<IpAddr>,
        /// Pin maps, programs and links here (on a BPF filesystem; the policy's under `policy/`)
        /// and adopt what an earlier agent pinned: the datapath and policy enforcement survive
        /// restarts and upgrades with their connection tracking.
        #[arg(long, default_value = DEFAULT_BPFFS_DIR, value_name = "DIR")]
        bpffs_dir: PathBuf,
        /// If the pinned state has another map layout, remove it and start fresh instead of
        /// refusing to start. Flushes connection tracking: established connections may reset.
        #[arg(long)]
        replace_incompatible_state: bool,
        /// Serve the gRPC API (lb.v1.LoadBalancer) on this unix socket, created with mode 0600.
        #[arg(long, value_name = "PATH")]
        grpc_socket: Option<PathBuf>,
        /// Keep the endpoints the CNI plugin (lb-cni) registers (`endpoints.json`) and the gRPC
        /// API's flow events setting (`flow-events.json`) in this directory, so that a restarted
        /// agent keeps the pods' programs attached and flow events as the API last set them.
        #[arg(long, default_value = DEFAULT_STATE_DIR, value_name = "DIR")]
        state_dir: PathBuf,
        /// Also serve the gRPC API on this TCP address, with TLS; needs --grpc-tls-cert,
        /// --grpc-tls-key and --grpc-tls-client-ca (clients must present a certificate).
        #[arg(long, value_name = "ADDR:PORT", requires_all = ["grpc_tls_cert", "grpc_tls_key", "grpc_tls_client_ca"])]
        grpc_tcp: Option<SocketAddr>,
        /// The gRPC server's certificate chain (PEM).
        #[arg(long, value_name = "FILE", requires = "grpc_tcp")]
        grpc_tls_cert: Option<PathBuf>,
        /// The gRPC server's private key (PEM).
        #[arg(long, value_name = "FILE", requires = "grpc_tcp")]
        grpc_tls_key: Option<PathBuf>,
        /// CA certificate(s) that gRPC clients' certificates must chain to (PEM).
        #[arg(long, value_name = "FILE", requires = "grpc_tcp")]
        grpc_tls_client_ca: Option<PathBuf>,
    },
    /// Remove the pinned datapath and policy datapath (links, programs, maps): detaches them from
    /// every interface. For uninstalling; stop the agent first.
    Detach {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR, value_name = "DIR")]
        bpffs_dir: PathBuf,
    },
    /// Validate CONFIG and exit (0 = valid).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => Config::from_file(&config)
            .map(|c| println!("{}: {} services, valid", config.display(), c.services.len()))
            .with_context(|| format!("invalid config {}", config.display())),
        Command::Detach { bpffs_dir } => PinDir::new(&bpffs_dir)
            .remove_all()
            .map(|removed| println!("{}: {removed} pins removed", bpffs_dir.display()))
            .with_context(|| format!("removing the pinned datapath in {}", bpffs_dir.display())),
        Command::Run {
            config,
            interfaces,
            attach_mode,
            workload_interfaces,
            metrics_addr,
            config_poll_ms,
            stats_interval,
            conntrack_entries,
            conntrack_entries_v6,
            max_services,
            max_backends,
            flow_events,
            kubernetes,
            kubeconfig,
            kube_api_url,
            node_name,
            node_addresses,
            bpffs_dir,
            replace_incompatible_state,
            grpc_socket,
            state_dir,
            grpc_tcp,
            grpc_tls_cert,
            grpc_tls_key,
            grpc_tls_client_ca,
        } => (|| {
            let kubernetes = match (kube_api_url, kubeconfig, kubernetes) {
                (Some(url), _, _) => Some(KubeApi::Url(url)),
                (None, Some(path), _) => Some(KubeApi::Kubeconfig(path)),
                (None, None, true) => Some(KubeApi::FromEnvironment),
                (None, None, false) => None,
            };
            let grpc_tcp = match (grpc_tcp, grpc_tls_cert, grpc_tls_key, grpc_tls_client_ca) {
                (Some(addr), Some(cert), Some(key), Some(ca)) => {
                    Some((addr, TlsConfig::from_files(&cert, &key, &ca)?))
                }
                _ => None, // clap requires all four together
            };
            let options = AgentOptions {
                config_path: config,
                interfaces,
                attach_mode,
                workload_interfaces,
                metrics_addr,
                stats_interval: Duration::from_secs(stats_interval),
                conntrack_entries,
                conntrack_entries_v6,
                capacity: Capacity {
                    services: max_services,
                    backends: max_backends,
                },
                flow_events,
                pins: Some(PinOptions {
                    dir: bpffs_dir,
                    replace_incompatible_state,
                }),
                kubernetes,
                node_name,
                node_addresses,
                watch_interval: Duration::from_millis(config_poll_ms),
                grpc_socket,
                state_dir,
                grpc_tcp,
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting tokio")
                .and_then(|rt| rt.block_on(agent::run(options)))
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("lb-agent: {err:#}");
            ExitCode::from(2)
        }
    }
}
