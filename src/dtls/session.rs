//! One DTLS session's life: handshake under a timeout (webrtc-dtls), the client's identity,
//! then the keys taken over by the session's own record layer and webrtc-dtls dropped, the
//! tunnel pipeline, close_notify and the closing line.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use rustls_pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use webrtc_dtls::conn::DTLSConn;
use webrtc_util::Conn;

use super::UdpShared;
use super::peer::PeerConn;
use super::record;
use super::report::{Failure, Tally};
use crate::admission::Ticket;
use crate::stats::{Stats, Transport};
use crate::tunnel::{self, udp::UdpLink};

/// How long sending close_notify may take before the session is dropped anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Keeps the open-session gauge right however the session ends.
struct SessionGauge<'a>(&'a Stats);

impl<'a> SessionGauge<'a> {
    fn new(stats: &'a Stats) -> Self {
        stats.udp_sessions.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for SessionGauge<'_> {
    fn drop(&mut self) {
        self.0.udp_sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the handshake phase of a session holds.
pub(super) struct Handshake {
    /// A place in the handshakes' pool, given up as soon as the handshake ends; it carries
    /// the deadline and fires when the handshake is shed to make room.
    pub(super) ticket: Ticket,
    /// Set once the handshake has completed: the demultiplexer stops checking datagrams.
    pub(super) authenticated: Arc<AtomicBool>,
    /// Where a failed handshake is counted (a stranger's failures are not logged one by one).
    pub(super) tally: Arc<Tally>,
    /// The peer's protected records (and every datagram once authenticated), for the
    /// session's own record layer.
    pub(super) datagrams: mpsc::Receiver<BytesMut>,
    /// The DTLS socket's batched I/O.
    pub(super) batched: Arc<super::batch::Batched>,
}

/// Runs one peer's session to its end and logs it.
pub(super) async fn run(
    conn: Arc<PeerConn>,
    shared: Arc<UdpShared>,
    handshake: Handshake,
    shutdown: CancellationToken,
    stop: CancellationToken,
) {
    let limits = shared.limits;
    let stats = &shared.stats;
    let Handshake {
        ticket,
        authenticated,
        tally,
        datagrams,
        batched,
    } = handshake;
    let peer = conn.remote_addr();
    let transport: Arc<dyn Conn + Send + Sync> = conn.clone();
    let credentials = shared.credentials.current();
    let Some(config) = credentials.dtls.clone() else {
        return; // UDP runs only with a DTLS configuration
    };
    let deadline = ticket.deadline;
    let handshake = tokio::select! {
        // A handshake that completed wins over a shed or a shutdown in the same poll.
        biased;
        r = timeout(deadline, DTLSConn::new(transport, config, false, None)) => r,
        // Made room for a newer handshake: counted when it was shed.
        () = ticket.shed.cancelled() => return,
        // Not a tunnel yet: no grace period.
        () = shutdown.cancelled() => return,
    };
    drop(ticket);
    // A failed handshake comes from a peer that never authenticated: counted into the
    // aggregate line (by reason and source), and only at debug level one by one.
    let failure = match handshake {
        Ok(Ok(dtls)) => Ok(dtls),
        Ok(Err(err)) => {
            debug!("DTLS handshake failed: {err}");
            Err(Failure::of(&err))
        }
        Err(_) => {
            debug!(timeout = ?deadline, "DTLS handshake timed out");
            Err(Failure::Timeout)
        }
    };
    let dtls = match failure {
        Ok(dtls) => dtls,
        Err(reason) => {
            Stats::bump(&stats.udp_handshake_failures);
            stats.prom.handshake_failed(Transport::Udp, reason.name());
            if let Some(peer) = peer {
                tally.failed(peer.ip(), reason);
            }
            return;
        }
    };
    authenticated.store(true, Ordering::Release);
    Stats::bump(&stats.udp_handshakes);
    let _gauge = SessionGauge::new(stats);
    let chain: Vec<CertificateDer<'static>> = dtls
        .connection_state()
        .await
        .peer_certificates
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let subject = chain
        .first()
        .map_or_else(|| "<none>".to_owned(), crate::tls::subject);
    tracing::Span::current().record("subject", subject.as_str());
    // Expiry, allow-list and CRL: the same rule as on the TLS port.
    if let Err(reason) = credentials
        .clients
        .check(Some(&chain), std::time::SystemTime::now())
    {
        warn!("client refused: {reason}");
        let _ = timeout(CLOSE_TIMEOUT, dtls.close()).await;
        return;
    }
    drop(credentials);
    // From here the session protects its records itself; dropping the DTLSConn ends its
    // tasks and frees its buffers and handshake cache.
    let keys = match dtls
        .record_keys()
        .await
        .map_err(|e| e.to_string())
        .and_then(|keys| record::split(&keys).map_err(|e| e.to_string()))
    {
        Ok(keys) => keys,
        Err(err) => {
            warn!("DTLS session without usable record keys: {err}");
            let _ = timeout(CLOSE_TIMEOUT, dtls.close()).await;
            return;
        }
    };
    drop(dtls);
    let Some(peer) = peer else {
        return; // a demultiplexed peer always has an address
    };
    let flight = conn.take_last_flight();
    let socket = conn.socket();
    drop(conn);

    let cx = tunnel::Context {
        timeouts: limits.timeouts,
        policy: &shared.policy,
        stats,
        shutdown: &shutdown,
        stop: &stop,
    };
    let mut link = UdpLink::new(
        keys,
        datagrams,
        (socket, batched, peer),
        flight,
        limits.idle_timeout,
        stats,
    );
    let report = tunnel::serve(&mut link, &cx).await;
    link.close().await;
    tunnel::log_closed(&report);
}
