//! The agent's own counters in the OpenMetrics text format (`/metrics`): on a plain-HTTP
//! listener of its own (`[prometheus] listen`, off by default) and, with `[prometheus] mtls`,
//! on the TLS port for scrapers holding a client certificate. docs/PROMETHEUS.md lists the
//! families.
//!
//! Two sources: the atomics of [`Stats`], read at scrape time by [`StatsCollector`], and the
//! labelled families in [`Recorders`] (reasons, HTTP statuses, latencies), each updated once
//! per tunnel, handshake or request, never per byte or datagram.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::stats::{Stats, Transport};

/// The media type of the OpenMetrics text format.
pub(crate) const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Every family's name starts with this (and `_`).
const PREFIX: &str = "godoxy_agent";
/// Scrape connections served at once on the plain listener; more wait in the backlog.
const MAX_SCRAPERS: usize = 16;
/// Time a scraper has to send its request headers.
const SCRAPE_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Dial latency buckets (seconds): loopback to a slow resolver.
const DIAL_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];
/// HTTP time-to-response-headers buckets (seconds).
const HTTP_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5, 10.0];

/// `transport`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: &'static str,
}

/// `transport`, `reason`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    transport: &'static str,
    reason: &'static str,
}

/// `route`, `code`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: &'static str,
    code: u16,
}

/// `route`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

/// An HTTP route family that is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// The Docker Engine API relay.
    Docker,
    /// `/godoxy/agent/proxy/http/...`.
    Proxy,
}

impl Route {
    fn as_str(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Proxy => "proxy",
        }
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The labelled families, shared by every task through [`Stats`]. Cloning shares them.
#[derive(Debug, Clone)]
pub(crate) struct Recorders {
    tunnels_closed: Family<ReasonLabels, Counter>,
    handshake_failures: Family<ReasonLabels, Counter>,
    dial_seconds: HistogramFamily<TransportLabel>,
    http_requests: Family<HttpLabels, Counter>,
    http_seconds: HistogramFamily<RouteLabel>,
}

impl Default for Recorders {
    fn default() -> Self {
        Self {
            tunnels_closed: Family::default(),
            handshake_failures: Family::default(),
            dial_seconds: Family::new_with_constructor(|| Histogram::new(DIAL_BUCKETS)),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(|| Histogram::new(HTTP_BUCKETS)),
        }
    }
}

impl Recorders {
    /// A tunnel ended with `reason` (`tunnel::End::reason`).
    pub(crate) fn tunnel_closed(&self, transport: Transport, reason: &'static str) {
        let labels = ReasonLabels {
            transport: transport.as_str(),
            reason,
        };
        self.tunnels_closed.get_or_create(&labels).inc();
    }

    /// A TLS or DTLS handshake failed, for `reason` (a fixed short name).
    pub(crate) fn handshake_failed(&self, transport: Transport, reason: &'static str) {
        let labels = ReasonLabels {
            transport: transport.as_str(),
            reason,
        };
        self.handshake_failures.get_or_create(&labels).inc();
    }

    /// A destination was resolved and connected in `took`.
    pub(crate) fn dialed(&self, transport: Transport, took: Duration) {
        let labels = TransportLabel {
            transport: transport.as_str(),
        };
        self.dial_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// An HTTP request of `route` was answered with `status` after `took` (to the response
    /// headers; a stream's body may go on).
    pub(crate) fn http_answered(&self, route: Route, status: StatusCode, took: Duration) {
        let route = route.as_str();
        let labels = HttpLabels {
            route,
            code: status.as_u16(),
        };
        self.http_requests.get_or_create(&labels).inc();
        self.http_seconds
            .get_or_create(&RouteLabel { route })
            .observe(took.as_secs_f64());
    }
}

/// Renders the whole exposition: the registry of families plus the [`Stats`] atomics.
#[derive(Debug)]
pub(crate) struct Exporter {
    registry: Registry,
}

impl Exporter {
    /// Registers every family; `godoxy_api` goes into `build_info`.
    pub(crate) fn new(stats: Arc<Stats>, godoxy_api: &str) -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let prom = stats.prom.clone();
        registry.register(
            "tunnels_closed",
            "Tunnels ended, by transport and end reason (the tunnel-closed log line's reason)",
            prom.tunnels_closed,
        );
        registry.register(
            "handshake_failures",
            "TLS (tcp) and DTLS (udp) handshakes that failed, by reason",
            prom.handshake_failures,
        );
        registry.register_with_unit(
            "dial_duration",
            "Time to resolve and connect to a tunnel destination (successful dials)",
            Unit::Seconds,
            prom.dial_seconds,
        );
        registry.register(
            "http_requests",
            "Docker API and HTTP-route requests on the TLS port, by route and status code",
            prom.http_requests,
        );
        registry.register_with_unit(
            "http_request_duration",
            "Time from a request to its response headers, by route",
            Unit::Seconds,
            prom.http_seconds,
        );
        registry.register(
            "build",
            "The agent's version and the GoDoxy agent API it answers as",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("godoxy_api", godoxy_api.to_owned()),
            ]),
        );
        registry.register_collector(Box::new(StatsCollector { stats }));
        Self { registry }
    }

    /// The OpenMetrics text, `# EOF` included.
    pub(crate) fn render(&self) -> String {
        let mut text = String::with_capacity(8 * 1024);
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            // Writing to a String fails only if a value's Display does: a bug, not input.
            warn!("encoding /metrics: {err}");
            let _ = writeln!(text, "# EOF");
        }
        text
    }

    /// The `/metrics` response.
    pub(crate) fn response(&self) -> hyper::Response<Full<Bytes>> {
        let mut response = hyper::Response::new(Full::new(Bytes::from(self.render())));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static(CONTENT_TYPE_OPENMETRICS),
        );
        response
    }
}

/// Reads the [`Stats`] atomics at scrape time.
#[derive(Debug)]
struct StatsCollector {
    stats: Arc<Stats>,
}

impl StatsCollector {
    fn counter(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        values: &[(&[(&'static str, &'static str)], u64)],
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, value) in values {
            ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn gauge(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        values: &[(&[(&'static str, &'static str)], i64)],
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
        for (labels, value) in values {
            ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &*self.stats;
        let get = Stats::get;
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        const TCP: &[(&str, &str)] = &[("transport", "tcp")];
        const UDP: &[(&str, &str)] = &[("transport", "udp")];
        const SERVER: &[(&str, &str)] = &[("certificate", "server")];
        const CA: &[(&str, &str)] = &[("certificate", "ca")];
        let per = |a: &[std::sync::atomic::AtomicU64; 2]| {
            [
                (TCP, get(&a[Transport::Tcp.index()])),
                (UDP, get(&a[Transport::Udp.index()])),
            ]
        };
        let e = &mut encoder;
        Self::counter(
            e,
            "tunnels_opened",
            "Tunnels started on an authenticated connection, by transport.",
            &per(&s.tunnels_opened),
        )?;
        let open = |t: Transport| {
            gauge(
                get(&s.tunnels_opened[t.index()]).saturating_sub(get(&s.tunnels_closed[t.index()])),
            )
        };
        Self::gauge(
            e,
            "tunnels_open",
            "Tunnels open now, by transport.",
            None,
            &[(TCP, open(Transport::Tcp)), (UDP, open(Transport::Udp))],
        )?;
        let (tcp, udp) = (Transport::Tcp.index(), Transport::Udp.index());
        let mut family = e.encode_descriptor(
            "tunnel",
            "Payload bytes relayed, by transport and direction (up: client to destination).",
            Some(&Unit::Bytes),
            MetricType::Counter,
        )?;
        for (labels, value) in [
            (
                [("transport", "tcp"), ("direction", "up")],
                get(&s.up_bytes[tcp]),
            ),
            (
                [("transport", "tcp"), ("direction", "down")],
                get(&s.down_bytes[tcp]),
            ),
            (
                [("transport", "udp"), ("direction", "up")],
                get(&s.up_bytes[udp]),
            ),
            (
                [("transport", "udp"), ("direction", "down")],
                get(&s.down_bytes[udp]),
            ),
        ] {
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Self::gauge(
            e,
            "dtls_sessions",
            "UDP (DTLS) sessions past the handshake.",
            None,
            &[(&[], gauge(get(&s.udp_sessions)))],
        )?;
        Self::gauge(
            e,
            "dtls_peers",
            "Peers in the DTLS demultiplexer's table (handshaking or in session).",
            None,
            &[(&[], gauge(get(&s.udp_table)))],
        )?;
        Self::counter(
            e,
            "handshakes",
            "TLS (tcp) and DTLS (udp) handshakes completed.",
            &[(TCP, get(&s.tls_handshakes)), (UDP, get(&s.udp_handshakes))],
        )?;
        Self::gauge(
            e,
            "preauth_connections",
            "Connections (tcp) and DTLS handshakes (udp) not yet authenticated.",
            None,
            &[
                (TCP, gauge(get(&s.preauth_tcp))),
                (UDP, gauge(get(&s.preauth_dtls))),
            ],
        )?;
        Self::counter(
            e,
            "preauth_shed",
            "Unauthenticated connections and handshakes shed by the pre-authentication caps.",
            &[(TCP, get(&s.shed_tcp)), (UDP, get(&s.shed_dtls))],
        )?;
        Self::counter(
            e,
            "preauth_refused",
            "Unauthenticated connections and handshakes refused at once: their source (IPv4 \
             address, IPv6 /64) had max_handshakes_per_source open.",
            &[
                (TCP, get(&s.preauth_refused_tcp)),
                (UDP, get(&s.preauth_refused_dtls)),
            ],
        )?;
        Self::counter(
            e,
            "refused_connections",
            "Authenticated connections closed at once: max_connections (TCP) or \
             max_udp_sessions (UDP) were open.",
            &[
                (TCP, get(&s.tcp_refused_connections)),
                (UDP, get(&s.udp_refused_sessions)),
            ],
        )?;
        Self::counter(
            e,
            "dtls_cookies",
            "HelloVerifyRequests sent (no state kept) and ClientHellos returning a cookie this \
             agent did not make for them.",
            &[
                (&[("result", "sent")], get(&s.udp_cookies_sent)),
                (&[("result", "bad")], get(&s.udp_bad_cookies)),
            ],
        )?;
        Self::counter(
            e,
            "dtls_dropped_datagrams",
            "Datagrams dropped on the UDP side, by reason.",
            &[
                (&[("reason", "unsolicited")], get(&s.udp_unsolicited)),
                (&[("reason", "queue_full")], get(&s.udp_queue_drops)),
                (&[("reason", "oversize")], get(&s.udp_oversize_drops)),
                (&[("reason", "preauth")], get(&s.udp_preauth_drops)),
            ],
        )?;
        Self::counter(
            e,
            "dtls_panics",
            "Panics inside webrtc-dtls caught in this process.",
            &[(&[], get(&s.dtls_panics))],
        )?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        // A certificate whose notAfter could not be read (0) has no sample rather than one
        // that looks expired.
        let certs: Vec<(&[(&str, &str)], i64)> = [
            (SERVER, &s.server_cert_not_after),
            (CA, &s.ca_cert_not_after),
        ]
        .into_iter()
        .map(|(labels, at)| (labels, at.load(std::sync::atomic::Ordering::Relaxed)))
        .filter(|(_, at)| *at != 0)
        .map(|(labels, at)| (labels, at.saturating_sub(now)))
        .collect();
        Self::gauge(
            e,
            "certificate_expiry",
            "Seconds until the certificate expires (negative: expired): server and CA.",
            Some(&Unit::Seconds),
            &certs,
        )?;
        Ok(())
    }
}

/// Binds the plain-HTTP scrape listener.
pub(crate) async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `/metrics` on the plain listener until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    exporter: Arc<Exporter>,
    shutdown: CancellationToken,
) {
    let tasks = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(MAX_SCRAPERS));
    loop {
        let Some(Ok(permit)) = shutdown
            .run_until_cancelled(limit.clone().acquire_owned())
            .await
        else {
            break;
        };
        let Some(accepted) = shutdown.run_until_cancelled(listener.accept()).await else {
            break;
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(err) => {
                warn!(%err, "prometheus listener: accept failed");
                if shutdown
                    .run_until_cancelled(tokio::time::sleep(Duration::from_millis(100)))
                    .await
                    .is_none()
                {
                    break;
                }
                continue;
            }
        };
        let (exporter, shutdown) = (exporter.clone(), shutdown.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = answer(&req, &exporter);
                async move { Ok::<_, Infallible>(response) }
            });
            // One request per connection: an idle scraper connection cannot hold a slot.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .keep_alive(false)
                .header_read_timeout(SCRAPE_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = result {
                debug!(%peer, "prometheus scrape connection: {err}");
            }
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// `GET /metrics` (or HEAD); anything else is a 404 or 405.
fn answer(req: &Request<Incoming>, exporter: &Exporter) -> hyper::Response<Full<Bytes>> {
    let status = if req.uri().path() != "/metrics" {
        StatusCode::NOT_FOUND
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        StatusCode::METHOD_NOT_ALLOWED
    } else {
        return exporter.response();
    };
    let mut response = hyper::Response::new(Full::new(Bytes::from(format!(
        "{status}: this listener serves GET /metrics\n"
    ))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// The `/metrics` response as a body of the TLS port's HTTP service.
pub(crate) fn boxed_response(
    exporter: &Exporter,
) -> hyper::Response<http_body_util::combinators::BoxBody<Bytes, hyper::Error>> {
    exporter
        .response()
        .map(|body| body.map_err(|never| match never {}).boxed())
}
