//! What strangers cause, logged without letting them flood the log: refused datagrams, failed,
//! shed and refused handshakes are counted and reported in one line per interval and transport
//! (the TLS port's and the DTLS port's), and a panic inside webrtc-dtls is logged once per site
//! and counted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::panic::{self, PanicHookInfo};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once, PoisonError};
use std::time::{Duration, Instant};

use tracing::{error, warn};

use super::preauth::Refusal;

/// How often the aggregate line may be written (only when something happened).
pub(crate) const REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Distinct source addresses remembered per interval; more are counted, not named.
const MAX_SOURCES: usize = 4096;
/// Sources named in the line.
const TOP_SOURCES: usize = 3;

/// Why a handshake from a not yet authenticated peer failed, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No handshake within `stream.handshake_timeout`.
    Timeout,
    /// The peer sent a fatal alert or close_notify (it refused us, or gave up).
    PeerAlert,
    /// TCP: the peer closed or reset the connection during the handshake.
    PeerClosed,
    /// No client certificate where one is required.
    NoClientCert,
    /// A client certificate or its signature that does not verify against `tls.ca`.
    BadClientCert,
    /// No cipher suite, curve, signature scheme or Extended Master Secret in common.
    NoCommonParameters,
    /// Anything else webrtc-dtls reports.
    Other,
}

impl Failure {
    const ALL: [Failure; 7] = [
        Self::Timeout,
        Self::PeerAlert,
        Self::PeerClosed,
        Self::NoClientCert,
        Self::BadClientCert,
        Self::NoCommonParameters,
        Self::Other,
    ];

    /// Classifies a handshake error.
    pub(crate) fn of(err: &webrtc_dtls::Error) -> Self {
        use webrtc_dtls::Error as E;
        match err {
            E::ErrAlertFatalOrClose => Self::PeerAlert,
            E::ErrClientCertificateRequired
            | E::ErrClientCertificateNotVerified
            | E::ErrCertificateVerifyNoCertificate => Self::NoClientCert,
            E::ErrInvalidCertificate
            | E::ErrKeySignatureMismatch
            | E::ErrInvalidEcdsasignature
            | E::ErrVerifyDataMismatch => Self::BadClientCert,
            E::ErrCipherSuiteNoIntersection
            | E::ErrNoAvailableCipherSuites
            | E::ErrNoAvailableSignatureSchemes
            | E::ErrNoSupportedEllipticCurves
            | E::ErrServerRequiredButNoClientEms
            | E::ErrUnsupportedProtocolVersion => Self::NoCommonParameters,
            _ => Self::Other,
        }
    }

    /// Classifies a TLS handshake error (tokio-rustls wraps rustls's in an `io::Error`).
    pub(crate) fn of_tls(err: &std::io::Error) -> Self {
        use rustls::Error as E;
        let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<E>()) else {
            return match err.kind() {
                std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe => Self::PeerClosed,
                _ => Self::Other,
            };
        };
        match tls {
            E::AlertReceived(_) => Self::PeerAlert,
            E::NoCertificatesPresented => Self::NoClientCert,
            E::InvalidCertificate(_) => Self::BadClientCert,
            E::PeerIncompatible(_) | E::NoApplicationProtocol => Self::NoCommonParameters,
            _ => Self::Other,
        }
    }

    /// The short name in the aggregate line and the `reason` label of the metric.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::PeerAlert => "peer_alert",
            Self::PeerClosed => "peer_closed",
            Self::NoClientCert => "no_client_cert",
            Self::BadClientCert => "bad_client_cert",
            Self::NoCommonParameters => "no_common_parameters",
            Self::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counts since the last report, shared by the listener (refusals, shedding) and the
/// connection or session tasks (handshake failures).
pub(crate) struct Tally {
    /// `TLS` or `DTLS`: the transport the line is about.
    transport: &'static str,
    inner: Mutex<Counts>,
    /// `dtls_panics()` at the last report.
    panics_reported: AtomicU64,
}

struct Counts {
    /// When this interval began.
    since: Instant,
    refused: [u64; Refusal::ALL.len()],
    failed: [u64; Failure::ALL.len()],
    /// Handshakes abandoned to make room for a newer one (the pool was full).
    shed: u64,
    /// Handshakes refused because their source had its share open.
    source_full: u64,
    sources: HashMap<IpAddr, u64>,
    /// Events from sources beyond `MAX_SOURCES`.
    unnamed: u64,
}

impl Default for Counts {
    fn default() -> Self {
        Self {
            since: Instant::now(),
            refused: [0; Refusal::ALL.len()],
            failed: [0; Failure::ALL.len()],
            shed: 0,
            source_full: 0,
            sources: HashMap::new(),
            unnamed: 0,
        }
    }
}

impl Counts {
    fn source(&mut self, ip: IpAddr) {
        if let Some(n) = self.sources.get_mut(&ip) {
            *n += 1;
        } else if self.sources.len() < MAX_SOURCES {
            self.sources.insert(ip, 1);
        } else {
            self.unnamed += 1;
        }
    }
}

impl Tally {
    /// A tally for `transport` (`TLS` or `DTLS`).
    pub(crate) fn new(transport: &'static str) -> Self {
        Self {
            transport,
            inner: Mutex::default(),
            panics_reported: AtomicU64::new(0),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A handshake from `ip` abandoned to make room.
    pub(crate) fn shed(&self, ip: IpAddr) {
        let mut counts = self.counts();
        counts.shed += 1;
        counts.source(ip);
    }

    /// A handshake from `ip` refused: its source had its share open.
    pub(crate) fn source_full(&self, ip: IpAddr) {
        let mut counts = self.counts();
        counts.source_full += 1;
        counts.source(ip);
    }

    /// A datagram dropped before authentication.
    pub(crate) fn refused(&self, ip: IpAddr, reason: Refusal) {
        let mut counts = self.counts();
        counts.refused[reason.index()] += 1;
        counts.source(ip);
    }

    /// A handshake that did not complete.
    pub(crate) fn failed(&self, ip: IpAddr, reason: Failure) {
        let mut counts = self.counts();
        counts.failed[reason.index()] += 1;
        counts.source(ip);
    }

    /// Writes the line for the interval that ends now, if anything happened (a drop, a failed,
    /// shed or refused handshake, a panic: `panics` is the process's total), and starts a new
    /// one.
    pub(crate) fn report(&self) {
        let counts = std::mem::take(&mut *self.counts());
        let dropped: u64 = counts.refused.iter().sum();
        let failed: u64 = counts.failed.iter().sum();
        let panics = dtls_panics();
        let new_panics = self.panics_reported.swap(panics, Ordering::Relaxed) != panics;
        if dropped == 0 && failed == 0 && counts.shed == 0 && counts.source_full == 0 && !new_panics
        {
            return;
        }
        let reasons = named(
            Refusal::ALL
                .iter()
                .map(|r| (r.name(), counts.refused[r.index()])),
        );
        let failures = named(
            Failure::ALL
                .iter()
                .map(|f| (f.name(), counts.failed[f.index()])),
        );
        let mut sources: Vec<(IpAddr, u64)> = counts.sources.into_iter().collect();
        sources.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let distinct = sources.len() + usize::from(counts.unnamed > 0);
        let top = sources
            .iter()
            .take(TOP_SOURCES)
            .map(|(ip, n)| format!("{ip}={n}"))
            .collect::<Vec<_>>()
            .join(",");
        warn!(
            transport = self.transport,
            seconds = counts.since.elapsed().as_secs(),
            dropped,
            reasons,
            handshake_failures = failed,
            failures,
            shed = counts.shed,
            source_full = counts.source_full,
            sources = distinct,
            top,
            panics,
            "unauthenticated peers: datagrams dropped, handshakes failed, shed (pool full) or \
             refused (source's share open)"
        );
    }
}

/// `a=1,b=2` of the non-zero counts.
fn named(counts: impl Iterator<Item = (&'static str, u64)>) -> String {
    counts
        .filter(|&(_, n)| n > 0)
        .map(|(name, n)| format!("{name}={n}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Panics inside webrtc-dtls caught so far (its tasks end; the process goes on).
static DTLS_PANICS: AtomicU64 = AtomicU64::new(0);
/// Panic sites already logged; bounded, so a panic can never grow it without end.
static PANIC_SITES: Mutex<Vec<String>> = Mutex::new(Vec::new());
const MAX_PANIC_SITES: usize = 32;

/// Panics counted by the hook since the process started.
pub(crate) fn dtls_panics() -> u64 {
    DTLS_PANICS.load(Ordering::Relaxed)
}

/// Installs, once per process, a panic hook that handles panics located in webrtc-dtls (or
/// webrtc-util): the first at each site is logged as one line, every one is counted, and none
/// prints the default multi-line report. Every other panic goes to the previous hook
/// unchanged. tokio catches a panic in a task, so the session (or webrtc-dtls's reader task)
/// ends and the daemon goes on.
pub(crate) fn install_panic_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !in_webrtc(info) {
                previous(info);
                return;
            }
            let count = DTLS_PANICS.fetch_add(1, Ordering::Relaxed) + 1;
            let site = info.location().map_or_else(
                || "unknown".to_owned(),
                |l| format!("{}:{}", l.file(), l.line()),
            );
            let first = {
                let mut sites = PANIC_SITES.lock().unwrap_or_else(PoisonError::into_inner);
                if sites.contains(&site) || sites.len() >= MAX_PANIC_SITES {
                    false
                } else {
                    sites.push(site.clone());
                    true
                }
            };
            if first {
                let message = payload(info);
                error!(
                    %site,
                    payload = %message.chars().take(200).collect::<String>(),
                    panics = count,
                    "panic in webrtc-dtls, caught; further panics at this site are only counted"
                );
            }
        }));
    });
}

fn in_webrtc(info: &PanicHookInfo<'_>) -> bool {
    info.location().is_some_and(|l| {
        let file = l.file();
        file.contains("webrtc-dtls") || file.contains("webrtc-util")
    })
}

fn payload(info: &PanicHookInfo<'_>) -> String {
    let payload = info.payload();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_reset_per_report_and_sources_are_bounded() {
        let tally = Tally::new("DTLS");
        for i in 0..(u32::try_from(MAX_SOURCES).unwrap() + 10) {
            tally.refused(IpAddr::from(i.to_be_bytes()), Refusal::Extensions);
        }
        {
            let counts = tally.inner.lock().unwrap();
            assert_eq!(counts.sources.len(), MAX_SOURCES);
            assert_eq!(counts.unnamed, 10);
        }
        tally.report();
        let counts = tally.inner.lock().unwrap();
        assert!(counts.sources.is_empty());
        assert_eq!(counts.refused.iter().sum::<u64>(), 0);
    }

    #[test]
    fn failures_are_classified() {
        assert_eq!(
            Failure::of(&webrtc_dtls::Error::ErrAlertFatalOrClose),
            Failure::PeerAlert
        );
        assert_eq!(
            Failure::of(&webrtc_dtls::Error::ErrClientCertificateRequired),
            Failure::NoClientCert
        );
        assert_eq!(
            Failure::of(&webrtc_dtls::Error::Other("x".into())),
            Failure::Other
        );
        assert_eq!(named([("a", 0), ("b", 2), ("c", 1)].into_iter()), "b=2,c=1");
    }
}
