//! Admission of strangers: TCP connections whose TLS handshake has not completed and DTLS
//! handshakes in progress. Each transport has one bounded pool of them, apart from its
//! authenticated tunnels, so that strangers can never take a tunnel's place:
//!
//! - while the pool is more than half full (busy), a source (an IPv4 address, an IPv6 /64)
//!   holding `per_source` entries is refused one more at once; a quiet pool admits any burst
//!   (a GoDoxy server opening a hundred tunnels at once from one address);
//! - an entry admitted while the pool is busy gets the short deadline (`busy_timeout`) instead
//!   of the full one;
//! - when the pool is full, an entry is shed (its handshake abandoned) to make room rather than
//!   refusing the newcomer: the oldest of the source holding the most, so a flood sheds itself
//!   and a source with a single handshake in progress goes last.
//!
//! Authenticated connections and sessions leave the pool the moment their handshake completes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::stats::{Stats, Transport};

/// The limits of one pool.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PreauthLimits {
    /// Entries at most.
    pub(crate) capacity: usize,
    /// Entries from one source at most while the pool is more than half full.
    pub(crate) per_source: usize,
    /// The handshake deadline while the pool is at most half full.
    pub(crate) timeout: Duration,
    /// The handshake deadline of an entry admitted while it is more than half full.
    pub(crate) busy_timeout: Duration,
}

/// Where a stranger comes from, as far as the per-source cap is concerned: an IPv4 address
/// (an IPv4-mapped IPv6 address counts as its IPv4 address), or an IPv6 /64, which one host is
/// commonly given whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Source(IpAddr);

impl Source {
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }
}

impl Source {
    /// The address (for a /64, its first address).
    pub(crate) fn ip(self) -> IpAddr {
        self.0
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => v4.fmt(f),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// The counters a pool keeps in [`Stats`], by transport.
fn gauge(transport: Transport, stats: &Stats) -> &AtomicU64 {
    match transport {
        Transport::Tcp => &stats.preauth_tcp,
        Transport::Udp => &stats.preauth_dtls,
    }
}

fn shed_counter(transport: Transport, stats: &Stats) -> &AtomicU64 {
    match transport {
        Transport::Tcp => &stats.shed_tcp,
        Transport::Udp => &stats.shed_dtls,
    }
}

fn refused_counter(transport: Transport, stats: &Stats) -> &AtomicU64 {
    match transport {
        Transport::Tcp => &stats.preauth_refused_tcp,
        Transport::Udp => &stats.preauth_refused_dtls,
    }
}

/// One transport's pool.
pub(crate) struct Admission {
    limits: PreauthLimits,
    transport: Transport,
    stats: Arc<Stats>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Entries by admission order: the first is the oldest.
    order: BTreeMap<u64, (Source, CancellationToken)>,
    /// Each source's entries, oldest first.
    per_source: HashMap<Source, BTreeSet<u64>>,
    next: u64,
}

impl Inner {
    fn count(&self, source: Source) -> usize {
        self.per_source.get(&source).map_or(0, BTreeSet::len)
    }

    /// Takes entry `id` out, if it is still in.
    fn remove(&mut self, id: u64) -> Option<(Source, CancellationToken)> {
        let (source, shed) = self.order.remove(&id)?;
        if let Some(ids) = self.per_source.get_mut(&source) {
            ids.remove(&id);
            if ids.is_empty() {
                self.per_source.remove(&source);
            }
        }
        Some((source, shed))
    }

    /// The entry to shed: the oldest of the source holding the most (of those, the one whose
    /// oldest is oldest). A source with one handshake in progress, such as a GoDoxy server, is
    /// shed last; a flood sheds itself.
    fn victim(&self) -> Option<u64> {
        self.per_source
            .values()
            .filter_map(|ids| Some((ids.len(), *ids.first()?)))
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
            .map(|(_, oldest)| oldest)
    }
}

/// Why a stranger was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SourceFull;

/// An admitted stranger's place in the pool; dropping it (handshake done, failed or shed)
/// frees the place.
pub(crate) struct Ticket {
    pool: Arc<Admission>,
    id: u64,
    /// Fires when this entry is shed to make room.
    pub(crate) shed: CancellationToken,
    /// This entry's handshake deadline.
    pub(crate) deadline: Duration,
    /// The entry shed to admit this one, if any (for the aggregate log line).
    pub(crate) displaced: Option<Source>,
}

impl Admission {
    pub(crate) fn new(limits: PreauthLimits, transport: Transport, stats: Arc<Stats>) -> Self {
        Self {
            limits,
            transport,
            stats,
            inner: Mutex::default(),
        }
    }

    /// Admits a stranger from `ip`, shedding an entry when the pool is full (`Inner::victim`).
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, SourceFull> {
        let source = Source::of(ip);
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let busy = inner.order.len() >= self.limits.capacity / 2;
        if busy && inner.count(source) >= self.limits.per_source {
            drop(inner);
            Stats::bump(refused_counter(self.transport, &self.stats));
            return Err(SourceFull);
        }
        let mut displaced = None;
        if inner.order.len() >= self.limits.capacity
            && let Some(oldest) = inner.victim()
            && let Some((victim, shed)) = inner.remove(oldest)
        {
            shed.cancel();
            displaced = Some(victim);
            Stats::bump(shed_counter(self.transport, &self.stats));
        }
        let deadline = if inner.order.len() >= self.limits.capacity / 2 {
            self.limits.busy_timeout.min(self.limits.timeout)
        } else {
            self.limits.timeout
        };
        inner.next += 1;
        let id = inner.next;
        let shed = CancellationToken::new();
        inner.order.insert(id, (source, shed.clone()));
        inner.per_source.entry(source).or_default().insert(id);
        Stats::set(gauge(self.transport, &self.stats), inner.order.len() as u64);
        Ok(Ticket {
            pool: self.clone(),
            id,
            shed,
            deadline,
            displaced,
        })
    }

    /// Entries in the pool now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .order
            .len()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut inner = self
            .pool
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // A shed entry is out already.
        if inner.remove(self.id).is_some() {
            Stats::set(
                gauge(self.pool.transport, &self.pool.stats),
                inner.order.len() as u64,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(capacity: usize, per_source: usize) -> Arc<Admission> {
        Arc::new(Admission::new(
            PreauthLimits {
                capacity,
                per_source,
                timeout: Duration::from_secs(10),
                busy_timeout: Duration::from_secs(2),
            },
            Transport::Tcp,
            Arc::new(Stats::default()),
        ))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_is_capped_while_busy_and_frees_its_places() {
        let pool = pool(4, 2);
        let a = pool.admit(ip("10.0.0.1")).unwrap();
        let _b = pool.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(pool.admit(ip("10.0.0.1")).err(), Some(SourceFull));
        // IPv4-mapped is the same source.
        assert_eq!(pool.admit(ip("::ffff:10.0.0.1")).err(), Some(SourceFull));
        let _other = pool.admit(ip("10.0.0.2")).unwrap();
        drop(a);
        let _c = pool.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(Stats::get(&pool.stats.preauth_refused_tcp), 2);
        assert_eq!(Stats::get(&pool.stats.preauth_tcp), 3);
    }

    #[test]
    fn the_largest_source_sheds_first() {
        let pool = pool(4, 16);
        let lone = pool.admit(ip("10.0.0.1")).unwrap();
        let flood: Vec<Ticket> = (0..3)
            .map(|_| pool.admit(ip("10.0.0.9")).unwrap())
            .collect();
        let newcomer = pool.admit(ip("10.0.0.9")).unwrap();
        assert!(!lone.shed.is_cancelled());
        assert!(flood[0].shed.is_cancelled());
        assert_eq!(newcomer.displaced, Some(Source::of(ip("10.0.0.9"))));
        let _other = pool.admit(ip("10.0.0.2")).unwrap();
        assert!(flood[1].shed.is_cancelled());
        assert!(!lone.shed.is_cancelled());
    }

    #[test]
    fn a_quiet_pool_admits_a_burst_from_one_source() {
        let pool = pool(100, 2);
        let burst: Vec<Ticket> = (0..50)
            .map(|_| pool.admit(ip("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(pool.admit(ip("10.0.0.1")).err(), Some(SourceFull));
        drop(burst);
        assert!(pool.admit(ip("10.0.0.1")).is_ok());
    }

    #[test]
    fn ipv6_sources_are_slash_64() {
        let pool = pool(2, 1);
        let _a = pool.admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(pool.admit(ip("2001:db8:1:2:ffff::9")).is_err());
        assert!(pool.admit(ip("2001:db8:1:3::1")).is_ok());
        assert_eq!(
            Source::of(ip("2001:db8:1:2::1")).to_string(),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn a_full_pool_sheds_its_oldest_and_busy_entries_get_the_short_deadline() {
        let pool = pool(4, 16);
        let first = pool.admit(ip("10.0.0.1")).unwrap();
        let second = pool.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(first.deadline, Duration::from_secs(10));
        assert_eq!(second.deadline, Duration::from_secs(10));
        let third = pool.admit(ip("10.0.0.3")).unwrap();
        assert_eq!(third.deadline, Duration::from_secs(2));
        let _fourth = pool.admit(ip("10.0.0.4")).unwrap();
        let fifth = pool.admit(ip("10.0.0.5")).unwrap();
        assert!(first.shed.is_cancelled());
        assert!(!second.shed.is_cancelled());
        assert_eq!(fifth.displaced, Some(Source::of(ip("10.0.0.1"))));
        assert_eq!(pool.len(), 4);
        // The shed entry's drop frees nothing twice.
        drop(first);
        assert_eq!(pool.len(), 4);
        drop(second);
        assert_eq!(pool.len(), 3);
        assert_eq!(Stats::get(&pool.stats.shed_tcp), 1);
    }
}
