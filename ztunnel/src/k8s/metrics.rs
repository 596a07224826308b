//! What discovery counts, as Prometheus series (`ztunnel_k8s_*`). The
//! families are shared handles: clones count into the same series.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InvalidLabels {
    pub resource: String,
    /// The label at fault (`ztunnel.dev/mtls`), or for a policy why it
    /// failed closed (`invalid`, `unreadable`, `unsupported_field`,
    /// `invalid_annotation`).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WhatLabels {
    /// `cgroup` or `netns`.
    pub what: String,
}

#[derive(Clone, Debug, Default)]
pub struct K8sMetrics {
    /// Watch or list failures (each is retried with backoff).
    pub watch_errors: Family<ResourceLabels, Counter>,
    /// Full relists (after a 410 Gone, a dropped stream, a restart).
    pub relists: Family<ResourceLabels, Counter>,
    /// Objects (versions) that could not be used as written.
    pub invalid_objects: Family<InvalidLabels, Counter>,
    /// Policies in force as their fail-closed stand-in.
    pub policies_failed_closed: Gauge,
    /// Entries in the discovery cache, per resource.
    pub cached: Family<ResourceLabels, Gauge>,
    /// 1 once every watcher has delivered its first full list.
    pub synced: Gauge,
    /// States published to the controller.
    pub publications: Counter,
    /// Local pods whose cgroup or netns was looked for and not there yet.
    pub resolution_retries: Family<WhatLabels, Counter>,
    /// Local mesh pods not (yet) resolved to a cgroup and a netns.
    pub pods_unresolved: Gauge,
}

impl K8sMetrics {
    /// Adds the series to the tunnel's registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ztunnel_k8s_watch_errors",
            "Kubernetes watch or list failures, retried with backoff",
            self.watch_errors.clone(),
        );
        registry.register("ztunnel_k8s_relists", "Kubernetes full relists by resource", self.relists.clone());
        registry.register(
            "ztunnel_k8s_invalid_objects",
            "Kubernetes objects not usable as written (labels kept at their previous value, policies failed closed)",
            self.invalid_objects.clone(),
        );
        registry.register(
            "ztunnel_k8s_policies_failed_closed",
            "AuthorizationPolicies in force as their fail-closed stand-in",
            self.policies_failed_closed.clone(),
        );
        registry.register(
            "ztunnel_k8s_cached_objects",
            "Entries in the discovery cache",
            self.cached.clone(),
        );
        registry.register("ztunnel_k8s_synced", "1 once every watcher has listed once", self.synced.clone());
        registry.register(
            "ztunnel_k8s_publications",
            "Cluster states handed to the controller",
            self.publications.clone(),
        );
        registry.register(
            "ztunnel_k8s_pod_resolution_retries",
            "Local pods whose cgroup or network namespace was not there yet",
            self.resolution_retries.clone(),
        );
        registry.register(
            "ztunnel_k8s_pods_unresolved",
            "Local mesh pods without a cgroup and network namespace yet",
            self.pods_unresolved.clone(),
        );
    }

    pub fn invalid(&self, resource: &str, reason: &str) {
        self.invalid_objects
            .get_or_create(&InvalidLabels { resource: resource.into(), reason: reason.into() })
            .inc();
    }

    pub fn invalid_count(&self, resource: &str, reason: &str) -> u64 {
        self.invalid_objects
            .get_or_create(&InvalidLabels { resource: resource.into(), reason: reason.into() })
            .get()
    }

    pub(crate) fn resource(family: &Family<ResourceLabels, Counter>, resource: &str) -> Counter {
        family.get_or_create(&ResourceLabels { resource: resource.into() }).clone()
    }
}
