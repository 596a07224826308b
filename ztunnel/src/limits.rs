//! Fair shares of the tunnel: how many connections it carries in all, for
//! one local workload, and for one source address before and after the
//! handshake. A connection beyond a limit is refused at once (reset, or 503
//! on HBONE) and counted in `ztunnel_limit_refusals_total{limit}`; it never
//! waits, and never takes what the other workloads need.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use prometheus_client::metrics::{counter::Counter, family::Family};

use crate::{config::ResolvedLimits, metrics::LimitLabels};

/// Which limit refused a connection (the access log's reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitExceeded {
    /// The tunnel carries `max_connections` already.
    Total,
    /// The workload has `connections_per_workload` already.
    Workload,
    /// Past `soft_connections`, the workload holds more than its fair share.
    FairShare,
    /// A source address has its share of connections still in the handshake.
    HandshakesPerSource,
    /// Connections in the handshake, from everyone.
    Handshakes,
    /// A source address has its share of authenticated HBONE connections.
    ConnectionsPerSource,
    /// Connections being opened to one local workload at once.
    Deliveries,
}

impl LimitExceeded {
    pub const ALL: [LimitExceeded; 7] = [
        LimitExceeded::Total,
        LimitExceeded::Workload,
        LimitExceeded::FairShare,
        LimitExceeded::HandshakesPerSource,
        LimitExceeded::Handshakes,
        LimitExceeded::ConnectionsPerSource,
        LimitExceeded::Deliveries,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            LimitExceeded::Total => "limit_total",
            LimitExceeded::Workload => "limit_workload",
            LimitExceeded::FairShare => "limit_fair_share",
            LimitExceeded::HandshakesPerSource => "limit_handshakes_per_source",
            LimitExceeded::Handshakes => "limit_handshakes",
            LimitExceeded::ConnectionsPerSource => "limit_connections_per_source",
            LimitExceeded::Deliveries => "limit_deliveries",
        }
    }
}

/// Counts refusals by limit.
#[derive(Clone, Default)]
pub struct Refusals(Family<LimitLabels, Counter>);

impl Refusals {
    pub fn new(family: Family<LimitLabels, Counter>) -> Self {
        Self(family)
    }

    fn count(&self, limit: LimitExceeded) -> LimitExceeded {
        self.0.get_or_create(&LimitLabels { limit: limit.reason() }).inc();
        limit
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_workload: HashMap<u32, usize>,
}

/// Connections carried, in all and per local workload.
pub struct ConnectionLimits {
    limits: ResolvedLimits,
    counts: Mutex<Counts>,
    refusals: Refusals,
}

/// One carried connection; dropping it gives its place back.
pub struct ConnectionPermit {
    owner: Arc<ConnectionLimits>,
    workload: u32,
}

impl ConnectionLimits {
    pub fn new(limits: ResolvedLimits, refusals: Refusals) -> Arc<Self> {
        Arc::new(Self { limits, counts: Mutex::default(), refusals })
    }

    pub fn limits(&self) -> ResolvedLimits {
        self.limits
    }

    /// A place for one more connection of the local workload `workload`
    /// (its source, outbound; its destination, inbound).
    pub fn acquire(self: &Arc<Self>, workload: u32) -> Result<ConnectionPermit, LimitExceeded> {
        let l = &self.limits;
        let mut c = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = c.by_workload.get(&workload).copied().unwrap_or(0);
        let refused = if c.total >= l.max_connections {
            Some(LimitExceeded::Total)
        } else if mine >= l.connections_per_workload {
            Some(LimitExceeded::Workload)
        } else if c.total >= l.soft_connections {
            // Share the soft limit among the workloads that hold connections
            // (this one included): the greediest are refused first.
            let holders = c.by_workload.len() + usize::from(mine == 0);
            let fair = (l.soft_connections / holders.max(1)).max(1);
            (mine >= fair).then_some(LimitExceeded::FairShare)
        } else {
            None
        };
        if let Some(limit) = refused {
            return Err(self.refusals.count(limit));
        }
        c.total += 1;
        *c.by_workload.entry(workload).or_default() += 1;
        Ok(ConnectionPermit { owner: self.clone(), workload })
    }

    /// Connections carried now, in all.
    pub fn total(&self) -> usize {
        self.counts.lock().map_or(0, |c| c.total)
    }

    /// Connections carried now for `workload`.
    pub fn of(&self, workload: u32) -> usize {
        self.counts.lock().map_or(0, |c| c.by_workload.get(&workload).copied().unwrap_or(0))
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut c = self.owner.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_workload.get_mut(&self.workload) {
            *n -= 1;
            if *n == 0 {
                c.by_workload.remove(&self.workload);
            }
        }
    }
}

/// Connections per source address (and in all), for what a peer holds
/// before it is authenticated, or once it is.
pub struct PerSource {
    per_source: usize,
    total: usize,
    over_source: LimitExceeded,
    over_total: LimitExceeded,
    counts: Mutex<(usize, HashMap<IpAddr, usize>)>,
    refusals: Refusals,
}

/// One connection of a source; dropping it gives its place back.
pub struct SourcePermit {
    owner: Arc<PerSource>,
    source: IpAddr,
}

impl PerSource {
    /// Connections in their handshake.
    pub fn handshakes(per_source: usize, total: usize, refusals: Refusals) -> Arc<Self> {
        Arc::new(Self {
            per_source,
            total,
            over_source: LimitExceeded::HandshakesPerSource,
            over_total: LimitExceeded::Handshakes,
            counts: Mutex::default(),
            refusals,
        })
    }

    /// Authenticated connections (the total is the tunnel's own limit).
    pub fn connections(per_source: usize, refusals: Refusals) -> Arc<Self> {
        Arc::new(Self {
            per_source,
            total: usize::MAX,
            over_source: LimitExceeded::ConnectionsPerSource,
            over_total: LimitExceeded::Total,
            counts: Mutex::default(),
            refusals,
        })
    }

    pub fn acquire(self: &Arc<Self>, source: IpAddr) -> Result<SourcePermit, LimitExceeded> {
        let source = crate::workload::canonical(source);
        let mut c = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if c.0 >= self.total {
            return Err(self.refusals.count(self.over_total));
        }
        let n = c.1.entry(source).or_default();
        if *n >= self.per_source {
            return Err(self.refusals.count(self.over_source));
        }
        *n += 1;
        c.0 += 1;
        Ok(SourcePermit { owner: self.clone(), source })
    }

    pub fn total(&self) -> usize {
        self.counts.lock().map_or(0, |c| c.0)
    }
}

impl Drop for SourcePermit {
    fn drop(&mut self) {
        let mut c = self.owner.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        c.0 = c.0.saturating_sub(1);
        if let Some(n) = c.1.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                c.1.remove(&self.source);
            }
        }
    }
}

/// What each local workload may hold of the tunnel's memory and dials.
pub struct WorkloadBudgets {
    early_data: usize,
    deliveries: usize,
    by_workload: Mutex<HashMap<u32, Arc<Budget>>>,
}

pub struct Budget {
    /// Bytes its clients sent that wait for their HBONE streams' answers.
    pub early_data: tokio::sync::Semaphore,
    /// Connections the tunnel is opening to it now.
    pub deliveries: tokio::sync::Semaphore,
}

impl WorkloadBudgets {
    pub fn new(early_data: usize, deliveries: usize) -> Self {
        Self { early_data, deliveries, by_workload: Mutex::default() }
    }

    pub fn of(&self, workload: u32) -> Arc<Budget> {
        let mut m = self.by_workload.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(workload)
            .or_insert_with(|| {
                Arc::new(Budget {
                    early_data: tokio::sync::Semaphore::new(self.early_data),
                    deliveries: tokio::sync::Semaphore::new(self.deliveries),
                })
            })
            .clone()
    }

    /// Forgets the budgets of workloads that left (connections still open
    /// keep theirs alive through their own Arc).
    pub fn retain(&self, keep: impl Fn(u32) -> bool) {
        let mut m = self.by_workload.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.retain(|id, _| keep(*id));
    }

    /// Per-workload early data allowance (bytes).
    pub fn early_data(&self) -> usize {
        self.early_data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, soft: usize, per: usize) -> Arc<ConnectionLimits> {
        ConnectionLimits::new(
            ResolvedLimits {
                max_connections: max,
                soft_connections: soft,
                connections_per_workload: per,
                open_files: 0,
            },
            Refusals::default(),
        )
    }

    #[test]
    fn a_workload_at_its_limit_does_not_stop_the_others() {
        let l = limits(100, 100, 10);
        let held: Vec<_> = (0..10).map(|_| l.acquire(1).unwrap()).collect();
        assert_eq!(l.acquire(1).err(), Some(LimitExceeded::Workload));
        assert!(l.acquire(2).is_ok());
        drop(held);
        assert_eq!(l.total(), 0, "permits give their places back");
        assert!(l.acquire(1).is_ok());
    }

    #[test]
    fn past_the_soft_limit_the_greedy_are_refused_first() {
        let l = limits(10, 6, 10);
        let greedy: Vec<_> = (0..6).map(|_| l.acquire(1).unwrap()).collect();
        // Soft limit reached: 1 holds 6 of 6; a newcomer's fair share is 3.
        assert_eq!(l.acquire(1).err(), Some(LimitExceeded::FairShare));
        let modest: Vec<_> = (0..3).map(|_| l.acquire(2).unwrap()).collect();
        assert_eq!(l.acquire(2).err(), Some(LimitExceeded::FairShare));
        let _one = l.acquire(3).unwrap();
        assert_eq!(l.acquire(4).err(), Some(LimitExceeded::Total));
        drop((greedy, modest));
    }

    #[test]
    fn one_source_cannot_take_every_handshake() {
        let h = PerSource::handshakes(2, 3, Refusals::default());
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "::ffff:198.18.0.2".parse().unwrap();
        let held = [h.acquire(a).unwrap(), h.acquire(a).unwrap()];
        assert_eq!(h.acquire(a).err(), Some(LimitExceeded::HandshakesPerSource));
        let _b = h.acquire(b).unwrap();
        assert_eq!(h.acquire("198.18.0.3".parse().unwrap()).err(), Some(LimitExceeded::Handshakes));
        drop(held);
        assert_eq!(h.total(), 1);
    }
}
