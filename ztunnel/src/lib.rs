//! ztunnel: a node-level, sidecar-free, transparent mTLS tunnel.
//!
//! | module | job |
//! | --- | --- |
//! | `config` | the node configuration file, checked before anything starts |
//! | `cgroup`, `netns` | the kernel objects workloads are known by |
//! | `capture` | the eBPF programs and maps that send workloads' connections to the tunnel |
//! | `enrollment` | makes capture match the configuration, at start and on reload |
//! | `proxy` | listeners, per-connection handling, the byte relay |
//! | `limits` | fair shares: connections in all, per workload, per source |
//! | `identity` | SPIFFE IDs |
//! | `k8s` | Kubernetes mode: discovery, the policy CRD, pods' cgroups and namespaces |
//! | `clock` | the wall clock certificates live by (tokio's, in unit tests) |
//! | `admin`, `metrics`, `access_log` | what operators see |
//! | `failures`, `explain` | the last failed connections, and why a call works or fails (`ztunnel explain`) |
//! | `app` | `ztunnel run`: wiring, reload, graceful shutdown |
//! | `precheck` | `ztunnel precheck`: whether a node can run the tunnel, before install |

pub mod access_log;
pub mod admin;
pub mod app;
pub mod ca;
pub mod capture;
pub mod cgroup;
pub mod cli;
pub mod clock;
pub mod config;
pub mod enrollment;
pub mod explain;
pub mod failures;
pub mod handover;
pub mod http;
pub mod identity;
pub mod k8s;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod netns;
pub mod policy;
pub mod precheck;
pub mod proxy;
pub mod sd_notify;
pub mod sockopt;
pub mod state;
pub mod tls;
pub mod unix_socket;
pub mod workload;
