//! Istio's TCP metrics and the access log while connections run.
//!
//! * A connection is counted in `istio_tcp_connections_opened_total` when the
//!   tunnel starts carrying it, and in `istio_tcp_connections_closed_total`,
//!   with the same labels, when its [`Carried`] guard drops: no path can
//!   leave it counted open, and opened minus closed is the number open.
//! * The relay counts bytes into the connection's own atomics (one
//!   uncontended add per chunk). A flusher task adds what is new to the
//!   shared `istio_tcp_*_bytes_total` counters every [`FLUSH_EVERY`], and the
//!   guard adds the rest at close: a scrape sees a long connection's bytes
//!   at most that late, and the data path never touches a shared counter or
//!   a label map.
//! * The same task writes a `periodic` access log line for each connection
//!   open longer than the configured interval, once per interval.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::metrics::counter::Counter;

use super::relay::Transferred;
use crate::{
    access_log::{AccessLog, Entry},
    metrics::{Metrics, TcpLabels},
};

/// The most a scrape lags behind a running connection's bytes.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// Spreads opens and closes over several locks.
const SHARDS: usize = 16;

/// Part of the carried connections, by id.
type Shard = Mutex<HashMap<u64, Arc<Live>>>;

/// Connections being carried.
pub struct Traffic {
    metrics: Arc<Metrics>,
    access_log: Arc<AccessLog>,
    /// How often a running connection gets a periodic access log line.
    log_every: Option<Duration>,
    shards: Box<[Shard]>,
    next_id: AtomicU64,
}

/// One carried connection, as the flusher sees it.
struct Live {
    transferred: Transferred,
    /// How much of `transferred` the shared counters already have.
    flushed_sent: AtomicU64,
    flushed_received: AtomicU64,
    /// Istio counts the caller's bytes as received, the answer as sent.
    received_bytes: Counter,
    sent_bytes: Counter,
    started: Instant,
    /// The connection's log line as carrying started, for periodic lines
    /// (None when they are off).
    entry: Option<Entry>,
    /// Periodic lines written so far (only the flusher writes them).
    periodic_lines: AtomicU64,
    closed: AtomicBool,
}

impl Live {
    fn flush(&self) {
        flush_delta(&self.transferred.sent, &self.flushed_sent, &self.received_bytes);
        flush_delta(&self.transferred.received, &self.flushed_received, &self.sent_bytes);
    }
}

/// Adds what `total` gained since the last flush; `fetch_max` keeps a flush
/// racing the close from counting a byte twice.
fn flush_delta(total: &AtomicU64, flushed: &AtomicU64, counter: &Counter) {
    let now = total.load(Ordering::Relaxed);
    let before = flushed.fetch_max(now, Ordering::Relaxed);
    if now > before {
        counter.inc_by(now - before);
    }
}

/// A connection counted open; dropping it counts it closed.
pub struct Carried {
    traffic: Arc<Traffic>,
    id: u64,
    live: Arc<Live>,
    closed: Counter,
}

impl Carried {
    /// Where the relay counts the connection's bytes.
    pub fn transferred(&self) -> &Transferred {
        &self.live.transferred
    }
}

impl Drop for Carried {
    fn drop(&mut self) {
        self.live.closed.store(true, Ordering::Relaxed);
        self.traffic.shard(self.id).lock().unwrap_or_else(PoisonError::into_inner).remove(&self.id);
        self.live.flush();
        self.closed.inc();
    }
}

impl Traffic {
    /// Starts the flusher (inside a tokio runtime); it ends with the last
    /// reference to the returned value. `log_every` None: no periodic lines.
    pub fn new(metrics: Arc<Metrics>, access_log: Arc<AccessLog>, log_every: Option<Duration>) -> Arc<Self> {
        let log_every = log_every.filter(|d| !d.is_zero() && access_log.enabled());
        let traffic = Arc::new(Self {
            metrics,
            access_log,
            log_every,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            next_id: AtomicU64::new(1),
        });
        let every = log_every.map_or(FLUSH_EVERY, |l| l.min(FLUSH_EVERY));
        tokio::spawn(flusher(Arc::downgrade(&traffic), every));
        traffic
    }

    fn shard(&self, id: u64) -> &Shard {
        &self.shards[(id % SHARDS as u64) as usize]
    }

    /// Counts a connection open with `labels`; `entry` is its access log
    /// line so far (the periodic lines repeat it).
    pub fn open(self: &Arc<Self>, labels: &TcpLabels, entry: &Entry) -> Carried {
        let m = &self.metrics;
        m.tcp_opened.get_or_create(labels).inc();
        let closed = m.tcp_closed.get_or_create(labels).clone();
        let live = Arc::new(Live {
            transferred: Transferred::default(),
            flushed_sent: AtomicU64::new(0),
            flushed_received: AtomicU64::new(0),
            received_bytes: m.tcp_received_bytes.get_or_create(labels).clone(),
            sent_bytes: m.tcp_sent_bytes.get_or_create(labels).clone(),
            started: Instant::now(),
            entry: self.log_every.map(|_| entry.clone()),
            periodic_lines: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.shard(id).lock().unwrap_or_else(PoisonError::into_inner).insert(id, live.clone());
        Carried { traffic: self.clone(), id, live, closed }
    }

    /// Connections carried now.
    pub fn open_connections(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len()).sum()
    }

    fn flush_all(&self) {
        for shard in &self.shards[..] {
            // Flushing and logging happen outside the lock: opens and closes
            // on this shard wait only for the copy.
            let live: Vec<Arc<Live>> =
                shard.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
            for l in live {
                l.flush();
                self.log_periodic(&l);
            }
        }
    }

    fn log_periodic(&self, l: &Live) {
        let (Some(every), Some(entry)) = (self.log_every, &l.entry) else { return };
        let elapsed = l.started.elapsed();
        let due = elapsed.as_nanos() / every.as_nanos().max(1);
        let written = u128::from(l.periodic_lines.load(Ordering::Relaxed));
        if due <= written || l.closed.load(Ordering::Relaxed) {
            return;
        }
        // Intervals missed under load are not made up: one line, current.
        l.periodic_lines.store(due as u64, Ordering::Relaxed);
        let mut line = entry.clone();
        line.event = "periodic";
        line.bytes_sent = l.transferred.sent();
        line.bytes_received = l.transferred.received();
        line.duration_ms = elapsed.as_millis() as u64;
        self.access_log.log(line);
    }
}

async fn flusher(traffic: Weak<Traffic>, every: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(traffic) = traffic.upgrade() else { return };
        traffic.flush_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    fn labels(metrics: &Metrics) -> (TcpLabels, impl Fn() -> [u64; 4] + '_) {
        let mut entry = Entry::now("outbound", "hbone");
        entry.source_identity = Some("spiffe://td/ns/a/sa/b".into());
        let l = TcpLabels::new("source", None, None, &entry);
        let read = {
            let l = l.clone();
            move || {
                [
                    metrics.tcp_opened.get_or_create(&l).get(),
                    metrics.tcp_closed.get_or_create(&l).get(),
                    metrics.tcp_received_bytes.get_or_create(&l).get(),
                    metrics.tcp_sent_bytes.get_or_create(&l).get(),
                ]
            }
        };
        (l, read)
    }

    #[tokio::test(start_paused = true)]
    async fn open_is_counted_at_once_bytes_every_flush_and_the_rest_at_close() {
        let metrics = Arc::new(Metrics::new());
        let log =
            Arc::new(AccessLog::start(&crate::config::AccessLogTarget::Off, Counter::default()).unwrap());
        let traffic = Traffic::new(metrics.clone(), log, None);
        let (l, read) = labels(&metrics);
        let c = traffic.open(&l, &Entry::now("outbound", "hbone"));
        assert_eq!(read(), [1, 0, 0, 0]);
        assert_eq!(traffic.open_connections(), 1);
        c.transferred().sent.fetch_add(100, Ordering::Relaxed);
        c.transferred().received.fetch_add(7, Ordering::Relaxed);
        // Not yet flushed: the shared counters wait for the flusher...
        assert_eq!(read(), [1, 0, 0, 0]);
        tokio::time::sleep(FLUSH_EVERY + Duration::from_millis(10)).await;
        // ...which has run by now (the same wait shows it counting).
        assert_eq!(read(), [1, 0, 100, 7]);
        c.transferred().sent.fetch_add(5, Ordering::Relaxed);
        drop(c);
        assert_eq!(read(), [1, 1, 105, 7]);
        assert_eq!(traffic.open_connections(), 0);
        // A later flush adds nothing twice.
        tokio::time::sleep(FLUSH_EVERY * 2).await;
        assert_eq!(read(), [1, 1, 105, 7]);
    }

    #[test]
    fn a_racing_flush_never_counts_a_byte_twice() {
        let total = AtomicU64::new(150);
        let flushed = AtomicU64::new(0);
        let counter = Counter::default();
        flush_delta(&total, &flushed, &counter);
        // A flush that read an older total after a newer one was flushed.
        let stale = AtomicU64::new(100);
        flush_delta(&stale, &flushed, &counter);
        assert_eq!(counter.get(), 150);
        total.store(160, Ordering::Relaxed);
        flush_delta(&total, &flushed, &counter);
        assert_eq!(counter.get(), 160);
    }
}
