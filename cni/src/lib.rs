//! `ztunnel-cni`: the chained CNI plugin that enrolls a pod with the node's
//! ztunnel before the pod's first packet, and its install into the node's
//! CNI configuration.
//!
//! The container runtime runs the plugin at sandbox creation, after the
//! primary plugin has given the pod its interface and addresses
//! (`prevResult`). The plugin decides from the API server alone whether the
//! pod is in the mesh ([`membership`]: namespace label
//! `ztunnel.dev/dataplane=enabled`, pod label `...=disabled` opts out,
//! host-network pods never). A pod outside the mesh passes through untouched
//! and the tunnel is never asked. A pod in the mesh is enrolled
//! synchronously: the plugin sends the pod's network namespace fd to the
//! tunnel over a unix socket ([`protocol`]) and succeeds only once the tunnel
//! answers `enrolled`. If the tunnel is down, slow, or refuses, ADD fails
//! and the kubelet retries: no mesh pod ever runs without its tunnel side.
//! DEL never fails. See [`plugin`] for each command and the README for the
//! configuration keys.
//!
//! [`install`] puts the binary, a kubeconfig and the plugin's entry into the
//! node's CNI configuration, and takes exactly those out again.

pub mod config;
pub mod install;
pub mod logging;
pub mod membership;
pub mod plugin;
pub mod protocol;
pub mod spec;
