//! The UDP side: owns the DTLS socket, demultiplexes datagrams per peer, one session task each.
//!
//! webrtc-dtls's own listeners are not used: its `listener` runs every handshake inside
//! `accept()` with no timeout (one silent ClientHello stalls everyone), and webrtc-util's
//! `conn_udp_listener` never forgets a closed peer. Here a table keyed by peer address gives each
//! peer a bounded queue; only a ClientHello may open an entry; the entry leaves the table when
//! its session ends; handshakes run in their own tasks under a timeout and a cap.
//!
//! A ClientHello from an unknown peer is answered statelessly (`cookie`: HelloVerifyRequest);
//! only one returning a valid cookie opens an entry, and then a place in the `admission` pool
//! of handshakes (per-source cap, short deadline when busy, the oldest shed when full). Until
//! a peer's handshake has completed, each of its datagrams must pass `preauth::check`
//! (webrtc-dtls's parsers are not safe on malformed input); what fails is dropped and counted,
//! and `report` turns the drops and failed, shed and refused handshakes into one line per
//! interval.

pub(crate) mod batch;
pub(crate) mod cookie;
mod peer;
pub(crate) mod preauth;
pub(crate) mod record;
pub(crate) mod report;
mod session;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::BytesMut;
use rustls::RootCertStore;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, field, info_span, warn};
use webrtc_dtls::config::{ClientAuthType, Config as DtlsConfig, ExtendedMasterSecretType};

use self::batch::{Batched, RecvBufs};
use self::cookie::{Cookies, Verdict};
use self::peer::PeerConn;
use self::preauth::Refusal;
use self::report::Tally;
use crate::admission::{Admission, PreauthLimits};
use crate::credentials::CredentialStore;
use crate::policy::Policy;
use crate::protocol::DTLS_CIPHER_SUITE;
use crate::stats::Stats;
use crate::tls::TlsMaterial;
use crate::tunnel::Timeouts;

/// Receive buffer asked of the kernel for the DTLS socket (capped by net.core.rmem_max).
pub(crate) const SOCKET_RCVBUF: usize = 4 << 20;
/// Datagrams queued per peer before the demultiplexer drops (and counts) more.
const PEER_QUEUE: usize = 128;
/// Largest datagram the socket reads.
const MAX_DATAGRAM: usize = 65_535;
/// Encrypted records a peer may send before its handshake has completed. A client sends one
/// Finished per (re)transmission of its last flight, and perhaps its first records of data
/// before the session task has marked it authenticated; webrtc-dtls queues all of them
/// without limit until it has keys, so they are capped here.
const MAX_PREAUTH_CIPHERTEXT: usize = 32;

/// Limits and timeouts of the UDP side.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UdpLimits {
    /// Header and dial deadlines.
    pub(crate) timeouts: Timeouts,
    /// No datagram either way for this long ends a session.
    pub(crate) idle_timeout: Duration,
    /// Table entries (handshaking or established) at most.
    pub(crate) max_sessions: usize,
    /// The handshakes' pool.
    pub(crate) preauth: PreauthLimits,
}

/// What every session task needs.
pub(crate) struct UdpShared {
    /// The server's DTLS configuration and client rules; each handshake reads the current
    /// set once.
    pub(crate) credentials: Arc<CredentialStore>,
    /// Limits.
    pub(crate) limits: UdpLimits,
    /// Counters.
    pub(crate) stats: Arc<Stats>,
    /// Which tunnel destinations may be dialed.
    pub(crate) policy: Arc<Policy>,
    /// Handshakes in progress.
    pub(crate) admission: Arc<Admission>,
    /// The stateless HelloVerifyRequest exchange.
    pub(crate) cookies: Cookies,
}

/// The DTLS server configuration: the TLS port's certificate and CA, one cipher suite,
/// Extended Master Secret required, client certificates required unless turned off.
pub(crate) fn server_config(
    material: &TlsMaterial,
    require_client_cert: bool,
) -> anyhow::Result<DtlsConfig> {
    let mut client_cas = RootCertStore::empty();
    for cert in &material.ca {
        client_cas
            .add(cert.clone())
            .context("tls.ca: not a usable CA certificate")?;
    }
    Ok(DtlsConfig {
        certificates: vec![crate::tls::dtls_certificate(
            material.chain.clone(),
            &material.key,
        )?],
        cipher_suites: vec![DTLS_CIPHER_SUITE],
        extended_master_secret: ExtendedMasterSecretType::Require,
        client_auth: if require_client_cert {
            ClientAuthType::RequireAndVerifyClientCert
        } else {
            ClientAuthType::VerifyClientCertIfGiven
        },
        client_cas,
        // The demultiplexer runs the cookie exchange (`cookie`).
        hello_verified_by_caller: true,
        ..Default::default()
    })
}

/// Binds the DTLS socket with a large receive buffer. Returns the socket and the buffer size
/// the kernel granted.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<(UdpSocket, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    let _ = socket.set_recv_buffer_size(SOCKET_RCVBUF);
    let granted = socket.recv_buffer_size().unwrap_or(0);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    Ok((socket, granted))
}

/// The check of a datagram from a peer whose handshake has not completed: `preauth::check`,
/// and the cap on encrypted records, `ciphertext` being the running count of those admitted
/// from that peer so far.
pub(crate) fn admit(datagram: &[u8], ciphertext: &mut usize) -> Result<preauth::Admitted, Refusal> {
    let admitted = preauth::check(datagram)?;
    let total = *ciphertext + admitted.ciphertext_records;
    if total > MAX_PREAUTH_CIPHERTEXT {
        return Err(Refusal::CiphertextFlood);
    }
    *ciphertext = total;
    Ok(admitted)
}

struct Entry {
    id: u64,
    /// Handshake records, to webrtc-dtls through `PeerConn`.
    tx: mpsc::Sender<BytesMut>,
    /// Protected records (application data, alerts), and every datagram once the handshake
    /// has completed: the session's own record layer (`record`) reads them.
    data: mpsc::Sender<BytesMut>,
    /// Set by the session once its handshake has completed: from then on its datagrams go to
    /// webrtc-dtls unchecked.
    authenticated: Arc<AtomicBool>,
    /// Encrypted records admitted before that.
    ciphertext: usize,
}

/// The demultiplexer's state: the table and what a new session needs.
struct Demux {
    socket: Arc<UdpSocket>,
    batched: Arc<Batched>,
    shared: Arc<UdpShared>,
    tally: Arc<Tally>,
    peers: HashMap<SocketAddr, Entry>,
    done_tx: mpsc::UnboundedSender<(SocketAddr, u64)>,
    next_id: u64,
    accepting: bool,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
}

/// The demultiplexer. Runs until `hard_stop`, or until `shutdown` once the last session ended
/// (sessions keep receiving through it during the grace period).
pub(crate) async fn run(
    socket: Arc<UdpSocket>,
    shared: Arc<UdpShared>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
) {
    report::install_panic_hook();
    let batched = match Batched::new(&socket) {
        Ok(b) => Arc::new(b),
        Err(err) => {
            warn!(%err, "UDP: cannot prepare the DTLS socket for batched I/O; UDP tunnels are off");
            return;
        }
    };
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut demux = Demux {
        socket,
        batched,
        shared,
        tally: Arc::new(Tally::new("DTLS")),
        peers: HashMap::new(),
        done_tx,
        next_id: 0,
        accepting: true,
        tasks,
        shutdown: shutdown.clone(),
        hard_stop: hard_stop.clone(),
    };
    let stats = demux.shared.stats.clone();
    let mut report_tick = interval_at(
        Instant::now() + report::REPORT_INTERVAL,
        report::REPORT_INTERVAL,
    );
    report_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // GRO may put up to 64 datagrams of one peer in a buffer: each holds the largest.
    let mut bufs = RecvBufs::new(MAX_DATAGRAM);
    loop {
        if !demux.accepting && demux.peers.is_empty() {
            break;
        }
        let socket = demux.socket.clone();
        let batched = demux.batched.clone();
        tokio::select! {
            biased;
            () = hard_stop.cancelled() => break,
            () = shutdown.cancelled(), if demux.accepting => {
                demux.accepting = false;
                continue;
            }
            _ = report_tick.tick() => {
                demux.tally.report();
                Stats::set(&stats.dtls_panics, report::dtls_panics());
            }
            Some((peer, id)) = done_rx.recv() => {
                // The peer may already have a newer entry: remove only the one that ended.
                if demux.peers.get(&peer).is_some_and(|e| e.id == id) {
                    demux.peers.remove(&peer);
                    Stats::set(&stats.udp_table, demux.peers.len() as u64);
                }
            }
            received = bufs.recv(&batched, &socket) => {
                let filled = match received {
                    Ok(n) => n,
                    Err(err) => {
                        // ICMP errors surface here on some systems; never fatal.
                        debug!(%err, "udp receive failed");
                        sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                };
                for i in 0..filled {
                    let (buf, meta) = bufs.get(i);
                    for datagram in batch::datagrams(buf, meta) {
                        demux.datagram(datagram, meta.addr);
                    }
                }
            }
        }
    }
    // What the last interval saw, before the daemon's closing lines.
    demux.tally.report();
}

impl Demux {
    fn refuse(&self, peer: SocketAddr, reason: Refusal) {
        Stats::bump(&self.shared.stats.udp_preauth_drops);
        self.tally.refused(peer.ip(), reason);
    }

    /// Routes one datagram to its session, or opens a session for a verified ClientHello.
    fn datagram(&mut self, datagram: &[u8], peer: SocketAddr) {
        let stats = &self.shared.stats;
        // Queued datagrams are copied out of the receive buffer: one small allocation each.
        // Slicing a shared pool instead would let one datagram held in a slow peer's queue
        // pin a whole pool block.
        if let Some(entry) = self.peers.get_mut(&peer) {
            let authenticated = entry.authenticated.load(Ordering::Acquire);
            if !authenticated && let Err(reason) = admit(datagram, &mut entry.ciphertext) {
                self.refuse(peer, reason);
                return;
            }
            let queue = if authenticated || record::is_protected(datagram) {
                &entry.data
            } else {
                &entry.tx
            };
            match queue.try_send(BytesMut::from(datagram)) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    Stats::bump(&stats.udp_queue_drops);
                    return;
                }
                // The session ended and its removal is still in flight: a ClientHello
                // from the same address starts afresh below.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.peers.remove(&peer);
                    Stats::set(&stats.udp_table, self.peers.len() as u64);
                }
            }
        }
        if !self.accepting {
            Stats::bump(&stats.udp_unsolicited);
            return;
        }
        // Only a well-formed ClientHello may create state. Anything else well formed
        // (a closed session's late records) is merely unsolicited.
        let mut ciphertext = 0;
        match admit(datagram, &mut ciphertext) {
            Ok(admitted) if admitted.client_hello => {}
            Ok(_) => {
                Stats::bump(&stats.udp_unsolicited);
                return;
            }
            Err(reason) => {
                self.refuse(peer, reason);
                return;
            }
        }
        match self.shared.cookies.judge(datagram, peer) {
            Verdict::Verified => {}
            Verdict::Challenge(request) => {
                Stats::bump(&stats.udp_cookies_sent);
                // Best effort, as any datagram: the client retransmits its hello.
                let _ = self.socket.try_send_to(&request, peer);
                return;
            }
            Verdict::BadCookie => {
                Stats::bump(&stats.udp_bad_cookies);
                self.refuse(peer, Refusal::Cookie);
                return;
            }
        }
        if self.peers.len() >= self.shared.limits.max_sessions {
            Stats::bump(&stats.udp_refused_sessions);
            // Clients retry every second and a flood is many peers: warn on the first
            // refusal and then once per 1000, with the running count.
            let refused = Stats::get(&stats.udp_refused_sessions);
            if refused % 1000 == 1 {
                warn!(%peer, max = self.shared.limits.max_sessions, refused, "UDP session refused: max_udp_sessions reached");
            }
            return;
        }
        let Ok(ticket) = self.shared.admission.admit(peer.ip()) else {
            self.tally.source_full(peer.ip());
            return;
        };
        if let Some(displaced) = ticket.displaced {
            self.tally.shed(displaced.ip());
        }
        self.next_id += 1;
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        if tx.try_send(BytesMut::from(datagram)).is_err() {
            return; // a fresh queue has room: unreachable
        }
        let (data, datagrams) = mpsc::channel(PEER_QUEUE);
        let authenticated = Arc::new(AtomicBool::new(false));
        self.peers.insert(
            peer,
            Entry {
                id: self.next_id,
                tx,
                data,
                authenticated: authenticated.clone(),
                ciphertext,
            },
        );
        Stats::set(&stats.udp_table, self.peers.len() as u64);
        let conn = Arc::new(PeerConn::new(self.socket.clone(), peer, rx));
        let id = self.next_id;
        let done = self.done_tx.clone();
        let shared = self.shared.clone();
        let batched = self.batched.clone();
        let tally = self.tally.clone();
        let soft = self.shutdown.clone();
        let stop = self.hard_stop.clone();
        let span = info_span!("udp", %peer, subject = field::Empty);
        self.tasks.spawn(
            async move {
                let handshake = session::Handshake {
                    ticket,
                    authenticated,
                    tally,
                    datagrams,
                    batched,
                };
                session::run(conn, shared, handshake, soft, stop).await;
                let _ = done.send((peer, id));
            }
            .instrument(span),
        );
    }
}
