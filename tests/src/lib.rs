//! Test harness shared by the integration tests (`tests/tests/*.rs`), the demo and benchmarks.
//!
//! - [`netns`]: network namespaces that delete themselves on drop (also when a test panics), and a
//!   sweep for namespaces left by killed runs.
//! - [`topology`]: "client — balancer node — N backends" built from namespaces and veth pairs.
//! - [`servers`]: backend servers that count what they receive (bytes on the wire, not log lines).
//! - [`agent`]: the `lb-agent` binary as a child process, stopped on drop.
//! - [`cni`]: the container runtime's side of CNI: runs the reference plugins and `lb-cni`.
//! - [`grpc_client`]: a client of the agent's gRPC API over its unix socket.
//! - [`fake_apiserver`], [`k8s_objects`]: a Kubernetes API server that speaks list/watch over HTTP,
//!   and objects for it.
//! - [`frames`]: crafted Ethernet frames for `BPF_PROG_TEST_RUN`.
//! - [`policy_topology`]: three labelled workloads around a routing node, for the policy tests.
//! - [`policy_bench`]: the policy check's per-packet cost against rule and ipcache sizes.
//! - [`modes`]: namespaced test runs, IP-in-IP frames, DSR backends and peer-recording servers
//!   for the forwarding-mode tests.
//! - [`modes_bench`]: the forwarding modes' per-packet cost, inside a topology's balancer namespace.
//! - [`memory`]: resident set and BPF map memory, for the benchmarks.
//! - [`procs`], [`loadgen`], [`baselines`]: the end-to-end benchmark's bounded child processes,
//!   traffic (nginx/wrk, iperf3, a `sendmmsg` UDP sender) and the contenders lb is compared with
//!   (kube-proxy iptables and nftables modes, HAProxy).

pub mod agent;
pub mod baselines;
pub mod cni;
pub mod fake_apiserver;
pub mod frames;
pub mod grpc_client;
pub mod k8s_objects;
pub mod loadgen;
pub mod memory;
pub mod modes;
pub mod modes_bench;
pub mod netns;
pub mod policy_bench;
pub mod policy_topology;
pub mod procs;
pub mod servers;
pub mod test_run;
pub mod topology;
