//! `/godoxy/agent/proxy/http/<path>`: the HTTP routes a GoDoxy server places on this agent.
//! The target comes from the `X-Proxy-*` headers; the path, query and `Host` go to the origin
//! as they came; bodies stream both ways at once; upgrades are spliced; an h2c origin's
//! trailers come back as HTTP/1.1 chunked trailers. One pooled client per distinct route
//! configuration, at most [`MAX_CLIENTS`] of them.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, StatusCode, Uri, Version};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::relay::{error_chain, splice, strip_hop_by_hop, wants_upgrade};
use super::{Response, reply};
use crate::policy::{Policy, PolicyConnector, denial_in};

/// What the GoDoxy server puts before the route's own path.
pub(super) const PREFIX: &str = "/godoxy/agent/proxy/http";
/// Distinct route configurations with a client (and its pool) kept at most.
const MAX_CLIENTS: usize = 64;
/// Idle origin connections are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// Idle origin connections kept per origin.
const POOL_MAX_IDLE: usize = 100;
/// Waiting for the response headers, unless the route says otherwise.
const DEFAULT_RESPONSE_HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// Trailers a gRPC response ends with: announced to HTTP/1.1 clients so they can be sent.
const GRPC_TRAILERS: &str = "grpc-status, grpc-message, grpc-status-details-bin";

const X_PROXY_HOST: &str = "x-proxy-host";
const X_PROXY_SCHEME: &str = "x-proxy-scheme";
const X_PROXY_CONFIG: &str = "x-proxy-config";
const X_PROXY_HTTPS: &str = "x-proxy-https";
const X_PROXY_SKIP_TLS_VERIFY: &str = "x-proxy-skip-tls-verify";
const X_PROXY_RESPONSE_HEADER_TIMEOUT: &str = "x-proxy-response-header-timeout";

/// How the agent talks to the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Scheme {
    Http,
    Https,
    /// HTTP/2 with prior knowledge, no TLS.
    H2c,
}

impl Scheme {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "http" => Some(Self::Http),
            "https" => Some(Self::Https),
            "h2c" => Some(Self::H2c),
            _ => None,
        }
    }

    fn uri_scheme(self) -> &'static str {
        match self {
            Self::Https => "https",
            Self::Http | Self::H2c => "http",
        }
    }
}

/// A route's settings, as GoDoxy encodes them in `X-Proxy-Config` (unknown keys ignored).
#[derive(Debug, Default, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
struct RouteConfig {
    no_tls_verify: bool,
    /// Nanoseconds; 0 = the default.
    response_header_timeout: i64,
    max_conns_per_host: i64,
    /// Accepted for compatibility: the agent never adds `Accept-Encoding` or decompresses,
    /// so there is nothing to disable.
    disable_compression: bool,
    ssl_server_name: Option<String>,
    ssl_trusted_certificate: String,
    ssl_certificate: String,
    ssl_certificate_key: String,
    ssl_protocols: Vec<String>,
}

/// Where a request goes.
#[derive(Debug)]
pub(super) struct Target {
    scheme: Scheme,
    /// `host` or `host:port`.
    host: String,
    config: RouteConfig,
}

impl Target {
    /// From the modern headers, or the legacy ones when neither `X-Proxy-Scheme` nor
    /// `X-Proxy-Config` is present. The error is the 400 body.
    pub(super) fn from_headers(headers: &HeaderMap) -> Result<Self, String> {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .unwrap_or("")
        };
        let host = text(X_PROXY_HOST).to_owned();
        let modern = headers.contains_key(X_PROXY_SCHEME) || headers.contains_key(X_PROXY_CONFIG);
        let (scheme, config) = if modern {
            let config = match text(X_PROXY_CONFIG) {
                "" => RouteConfig::default(),
                encoded => {
                    let json = base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .map_err(|e| format!("X-Proxy-Config is not base64: {e}"))?;
                    serde_json::from_slice(&json)
                        .map_err(|e| format!("X-Proxy-Config is not the expected JSON: {e}"))?
                }
            };
            let scheme = text(X_PROXY_SCHEME);
            let scheme = Scheme::parse(scheme).ok_or_else(|| {
                format!("invalid proxy scheme {scheme:?}: expected http, https or h2c")
            })?;
            (scheme, config)
        } else {
            let https = go_bool(text(X_PROXY_HTTPS));
            let config = RouteConfig {
                no_tls_verify: go_bool(text(X_PROXY_SKIP_TLS_VERIFY)),
                response_header_timeout: text(X_PROXY_RESPONSE_HEADER_TIMEOUT)
                    .parse::<i64>()
                    .map_or(0, |s| s.saturating_mul(1_000_000_000)),
                ..RouteConfig::default()
            };
            (if https { Scheme::Https } else { Scheme::Http }, config)
        };
        if host.is_empty() {
            return Err("missing proxy host (X-Proxy-Host)".to_owned());
        }
        if host.parse::<hyper::http::uri::Authority>().is_err() {
            return Err(format!("X-Proxy-Host {host:?} is not host[:port]"));
        }
        Ok(Self {
            scheme,
            host,
            config,
        })
    }
}

/// Go's `strconv.ParseBool`; anything else is false, as GoDoxy's legacy parser treats it.
fn go_bool(text: &str) -> bool {
    matches!(text, "1" | "t" | "T" | "TRUE" | "true" | "True")
}

/// A pooled client for one route configuration.
struct Origin {
    client: OriginClient,
    response_header_timeout: Duration,
    /// `max_conns_per_host`: requests in flight (response bodies included) at most.
    limit: Option<Arc<Semaphore>>,
}

enum OriginClient {
    Http(Client<HttpsConnector<PolicyConnector>, Incoming>),
    /// One client per h2c target: the request URI's authority is the client's `Host` (HTTP/2
    /// has no separate Host header; GoDoxy's origin must see the route's host), while the
    /// connector always dials the target.
    H2c(Client<H2cConnector, Incoming>),
}

/// Dials one h2c origin whatever the request URI names, through the policy like every dial.
#[derive(Clone)]
struct H2cConnector {
    /// `http://TARGET/`.
    target: Uri,
    inner: PolicyConnector,
}

impl tower_service::Service<Uri> for H2cConnector {
    type Response = <PolicyConnector as tower_service::Service<Uri>>::Response;
    type Error = <PolicyConnector as tower_service::Service<Uri>>::Error;
    type Future = <PolicyConnector as tower_service::Service<Uri>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower_service::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        tower_service::Service::call(&mut self.inner, self.target.clone())
    }
}

impl OriginClient {
    fn request(&self, req: Request<Incoming>) -> hyper_util::client::legacy::ResponseFuture {
        match self {
            Self::Http(client) => client.request(req),
            Self::H2c(client) => client.request(req),
        }
    }
}

/// The clients, least recently used out first.
#[derive(Default)]
struct Cache {
    /// Keyed by the scheme family, the h2c target (h2c clients are per target) and the
    /// route's settings.
    entries: HashMap<CacheKey, (Arc<Origin>, u64)>,
    clock: u64,
}

/// The scheme family, the h2c target and the route's settings.
type CacheKey = (Scheme, Option<String>, RouteConfig);

/// The HTTP route relay.
pub(crate) struct Proxy {
    cache: Mutex<Cache>,
    /// Which origins may be dialed.
    policy: Arc<Policy>,
}

impl Proxy {
    pub(crate) fn new(policy: Arc<Policy>) -> Self {
        Self {
            cache: Mutex::default(),
            policy,
        }
    }

    /// Relays one request under [`PREFIX`].
    pub(super) async fn handle(&self, mut req: Request<Incoming>) -> Response {
        let started = Instant::now();
        let method = req.method().clone();
        let target = match Target::from_headers(req.headers()) {
            Ok(target) => target,
            Err(reason) => {
                warn!(%method, "proxy request refused: {reason}");
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("failed to parse agent proxy config: {reason}"),
                );
            }
        };
        let origin = match self.origin(&target) {
            Ok(origin) => origin,
            Err(reason) => {
                warn!(%method, host = %target.host, "proxy TLS settings: {reason}");
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("failed to build proxy: {reason}"),
                );
            }
        };
        let path_and_query = req.uri().path_and_query().map_or("", |pq| pq.as_str());
        let rest = path_and_query
            .strip_prefix(PREFIX)
            .unwrap_or(path_and_query);
        // h2c: the URI's authority becomes :authority, so it carries the client's Host.
        let authority = match target.scheme {
            Scheme::H2c => req
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .filter(|h| h.parse::<hyper::http::uri::Authority>().is_ok())
                .unwrap_or(&target.host)
                .to_owned(),
            Scheme::Http | Scheme::Https => target.host.clone(),
        };
        let uri = if rest.starts_with('/') {
            format!("{}://{authority}{rest}", target.scheme.uri_scheme())
        } else {
            format!("{}://{authority}/{rest}", target.scheme.uri_scheme())
        };
        let uri: Uri = match uri.parse() {
            Ok(uri) => uri,
            Err(err) => {
                return text(StatusCode::BAD_REQUEST, format!("bad request path: {err}"));
            }
        };
        let log_target = format!("{}://{}", target.scheme.uri_scheme(), target.host);
        let upgrade = target.scheme != Scheme::H2c && wants_upgrade(req.headers());
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        let accepts_html = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/html"));
        prepare_request(req.headers_mut(), upgrade);
        if target.scheme == Scheme::H2c {
            req.headers_mut().remove(header::HOST);
        }
        *req.uri_mut() = uri;
        *req.version_mut() = if target.scheme == Scheme::H2c {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };

        let permit = match &origin.limit {
            Some(limit) => limit.clone().acquire_owned().await.ok(),
            None => None,
        };
        let response = match tokio::time::timeout(
            origin.response_header_timeout,
            origin.client.request(req),
        )
        .await
        {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => {
                if let Some(denial) = denial_in(&err) {
                    // The client's subject is on the connection's span.
                    warn!(%method, target = %log_target, "proxy request denied by policy: {denial}");
                    return text(
                        StatusCode::FORBIDDEN,
                        format!(
                            "403 Forbidden: destination denied by the agent's policy: {denial}"
                        ),
                    );
                }
                let reason = error_chain(&err);
                warn!(%method, target = %log_target, elapsed = ?started.elapsed(), "origin unreachable: {reason}");
                return bad_gateway(&reason, accepts_html);
            }
            Err(_) => {
                let reason = format!(
                    "timeout awaiting response headers ({:?})",
                    origin.response_header_timeout
                );
                warn!(%method, target = %log_target, "origin unreachable: {reason}");
                return bad_gateway(&reason, accepts_html);
            }
        };
        let (mut parts, body) = response.into_parts();
        // Our hop is HTTP/1.1, whatever the origin spoke (HTTP/1.0, h2c).
        parts.version = Version::HTTP_11;
        debug!(%method, target = %log_target, status = parts.status.as_u16(), elapsed = ?started.elapsed(), "proxied");
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            let mut origin_response = hyper::Response::from_parts(parts.clone(), body);
            let origin_side = hyper::upgrade::on(&mut origin_response);
            let Some(client_side) = client_side else {
                return bad_gateway("the origin switched protocols unasked", accepts_html);
            };
            tokio::spawn(splice("proxy", client_side, origin_side));
            prepare_response(&mut parts.headers, true, false);
            return hyper::Response::from_parts(parts, super::empty());
        }
        let grpc = target.scheme == Scheme::H2c
            && parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/grpc"));
        prepare_response(&mut parts.headers, false, grpc);
        let body = Limited {
            body,
            _permit: permit,
        };
        hyper::Response::from_parts(parts, body.boxed())
    }

    /// The client for this route's configuration, made on first use.
    fn origin(&self, target: &Target) -> Result<Arc<Origin>, String> {
        let key = match target.scheme {
            Scheme::H2c => (
                Scheme::H2c,
                Some(target.host.clone()),
                target.config.clone(),
            ),
            Scheme::Http | Scheme::Https => (Scheme::Http, None, target.config.clone()),
        };
        let mut cache = self.cache.lock().map_err(|_| "client cache poisoned")?;
        cache.clock += 1;
        let now = cache.clock;
        if let Some((origin, used)) = cache.entries.get_mut(&key) {
            *used = now;
            return Ok(origin.clone());
        }
        let origin = Arc::new(build_origin(target, &self.policy)?);
        if cache.entries.len() >= MAX_CLIENTS
            && let Some(oldest) = cache
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(key, _)| key.clone())
        {
            cache.entries.remove(&oldest);
        }
        cache.entries.insert(key, (origin.clone(), now));
        Ok(origin)
    }
}

fn build_origin(target: &Target, policy: &Arc<Policy>) -> Result<Origin, String> {
    let config = &target.config;
    let response_header_timeout = match config.response_header_timeout {
        ns if ns > 0 => Duration::from_nanos(ns.unsigned_abs()),
        _ => DEFAULT_RESPONSE_HEADER_TIMEOUT,
    };
    let limit = usize::try_from(config.max_conns_per_host)
        .ok()
        .filter(|&n| n > 0)
        .map(|n| Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS))));
    let http = PolicyConnector::new(policy.clone());
    let client = if target.scheme == Scheme::H2c {
        let origin = format!("http://{}/", target.host)
            .parse::<Uri>()
            .map_err(|e| format!("h2c target {:?}: {e}", target.host))?;
        OriginClient::H2c(
            Client::builder(TokioExecutor::new())
                .http2_only(true)
                .pool_idle_timeout(POOL_IDLE)
                .build(H2cConnector {
                    target: origin,
                    inner: http,
                }),
        )
    } else {
        let tls = tls_config(config)?;
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let builder = match config.ssl_server_name.as_deref() {
            None | Some("" | "on" | "off") => builder,
            Some(name) => {
                let name = ServerName::try_from(name.to_owned())
                    .map_err(|e| format!("ssl_server_name {name:?}: {e}"))?;
                builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
            }
        };
        let connector = builder.enable_http1().wrap_connector(http);
        OriginClient::Http(
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(POOL_IDLE)
                .pool_max_idle_per_host(POOL_MAX_IDLE)
                .set_host(false)
                .build(connector),
        )
    };
    Ok(Origin {
        client,
        response_header_timeout,
        limit,
    })
}

/// The rustls client configuration of an https route. Errors are what GoDoxy answers 500 for.
fn tls_config(config: &RouteConfig) -> Result<rustls::ClientConfig, String> {
    let provider = crate::tls::client_provider();
    let versions = tls_versions(&config.ssl_protocols)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("ssl_protocols: {e}"))?;
    let builder = if config.no_tls_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification::new(provider)))
    } else if !config.ssl_trusted_certificate.is_empty() {
        let path = &config.ssl_trusted_certificate;
        let pem = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("{path}: {e}"))?;
            roots.add(cert).map_err(|e| format!("{path}: {e}"))?;
        }
        if roots.is_empty() {
            return Err(format!("{path}: failed to parse trusted certificates"));
        }
        builder.with_root_certificates(roots)
    } else {
        builder.with_root_certificates(system_roots())
    };
    let mut tls = match (
        config.ssl_certificate.as_str(),
        config.ssl_certificate_key.as_str(),
    ) {
        ("", "") => builder.with_no_client_auth(),
        ("", _) => {
            return Err("ssl_certificate is required when ssl_certificate_key is specified".into());
        }
        (_, "") => {
            return Err("ssl_certificate_key is required when ssl_certificate is specified".into());
        }
        (cert, key) => {
            let chain = std::fs::read(cert)
                .map_err(|e| format!("{cert}: {e}"))
                .and_then(|pem| {
                    crate::tls::parse_certs(&pem).map_err(|e| format!("{cert}: {e:#}"))
                })?;
            let key_der = std::fs::read(key)
                .map_err(|e| format!("{key}: {e}"))
                .and_then(|pem| {
                    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| format!("{key}: {e}"))
                })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| format!("{cert}: {e}"))?
        }
    };
    if config.ssl_server_name.as_deref() == Some("off") {
        tls.enable_sni = false;
    }
    Ok(tls)
}

/// `ssl_protocols` as the versions rustls offers (TLS 1.2 and 1.3): the range from the lowest
/// to the highest named.
fn tls_versions(
    protocols: &[String],
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, String> {
    if protocols.is_empty() {
        return Ok(vec![&rustls::version::TLS13, &rustls::version::TLS12]);
    }
    let mut range: Option<(u8, u8)> = None;
    for protocol in protocols {
        let minor = match protocol.to_ascii_lowercase().as_str() {
            "tlsv1.0" => 0,
            "tlsv1.1" => 1,
            "tlsv1.2" => 2,
            "tlsv1.3" => 3,
            other => return Err(format!("unsupported TLS protocol {other:?}")),
        };
        range = Some(range.map_or((minor, minor), |(lo, hi)| (lo.min(minor), hi.max(minor))));
    }
    let (lo, hi) = range.unwrap_or((2, 3));
    let versions: Vec<_> = [(3, &rustls::version::TLS13), (2, &rustls::version::TLS12)]
        .into_iter()
        .filter(|(minor, _)| (lo..=hi).contains(minor))
        .map(|(_, version)| version)
        .collect();
    if versions.is_empty() {
        return Err(format!(
            "ssl_protocols {protocols:?}: this agent speaks TLS 1.2 and 1.3 only"
        ));
    }
    Ok(versions)
}

/// The system's trusted roots (the host's CA bundle), with Mozilla's as the fallback where
/// there is none (a `scratch` container).
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
            Arc::new(roots)
        })
        .clone()
}

/// `no_tls_verify`: any certificate is accepted, but the handshake signatures are still
/// checked (the peer must hold the key of the certificate it shows).
#[derive(Debug)]
pub(super) struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl NoVerification {
    pub(super) fn new(provider: Arc<rustls::crypto::CryptoProvider>) -> Self {
        Self(provider)
    }
}

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The request as the origin should see it: no `X-Proxy-*`, no hop-by-hop headers (but
/// `TE: trailers`, which gRPC needs), `X-Forwarded-Proto: https` (the agent's hop is TLS).
fn prepare_request(headers: &mut HeaderMap, upgrade: bool) {
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    let proxy_headers: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("x-proxy-"))
        .cloned()
        .collect();
    for name in proxy_headers {
        headers.remove(name);
    }
    strip_hop_by_hop(headers, upgrade);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("https"),
    );
}

/// The response as the client should see it: no hop-by-hop headers, no `Server` or
/// `X-Powered-By`; trailers the origin announced (or gRPC's) stay announced, so the HTTP/1.1
/// side sends them.
fn prepare_response(headers: &mut HeaderMap, upgrade: bool, grpc: bool) {
    let announced: Vec<HeaderValue> = headers.get_all(header::TRAILER).iter().cloned().collect();
    strip_hop_by_hop(headers, upgrade);
    headers.remove(header::SERVER);
    headers.remove("x-powered-by");
    for value in announced {
        headers.append(header::TRAILER, value);
    }
    if grpc && !headers.contains_key(header::TRAILER) {
        headers.insert(header::TRAILER, HeaderValue::from_static(GRPC_TRAILERS));
    }
}

/// A short text answer.
fn text(status: StatusCode, message: String) -> Response {
    reply(status, "text/plain; charset=utf-8", Bytes::from(message))
}

/// 502: a line of text, or a small page for browsers.
fn bad_gateway(reason: &str, html: bool) -> Response {
    if html {
        let escaped = reason
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        let page = format!(
            "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\
             <body><h1>502 Bad Gateway</h1><p>The agent could not reach this route's \
             origin.</p><pre>{escaped}</pre></body></html>\n"
        );
        reply(
            StatusCode::BAD_GATEWAY,
            "text/html; charset=utf-8",
            Bytes::from(page),
        )
    } else {
        text(
            StatusCode::BAD_GATEWAY,
            format!("502 Bad Gateway: {reason}"),
        )
    }
}

/// A response body that holds a `max_conns_per_host` slot until it ends.
struct Limited {
    body: Incoming,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Body for Limited {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn modern_headers() {
        let json = r#"{"no_tls_verify":true,"response_header_timeout":2500000000,"ssl_protocols":["tlsv1.3"],"unknown":1}"#;
        let b64 = base64::engine::general_purpose::STANDARD.encode(json);
        let t = Target::from_headers(&headers(&[
            ("X-Proxy-Host", "10.0.0.2:8443"),
            ("X-Proxy-Scheme", "https"),
            ("X-Proxy-Config", &b64),
        ]))
        .unwrap();
        assert_eq!(t.scheme, Scheme::Https);
        assert_eq!(t.host, "10.0.0.2:8443");
        assert!(t.config.no_tls_verify);
        assert_eq!(t.config.response_header_timeout, 2_500_000_000);
        let t = Target::from_headers(&headers(&[
            ("X-Proxy-Host", "app:80"),
            ("X-Proxy-Scheme", "h2c"),
            ("X-Proxy-Config", "e30="),
        ]))
        .unwrap();
        assert_eq!((t.scheme, t.config), (Scheme::H2c, RouteConfig::default()));
    }

    #[test]
    fn legacy_headers() {
        let t = Target::from_headers(&headers(&[
            ("X-Proxy-Host", "app:443"),
            ("X-Proxy-Https", "true"),
            ("X-Proxy-Skip-Tls-Verify", "1"),
            ("X-Proxy-Response-Header-Timeout", "7"),
        ]))
        .unwrap();
        assert_eq!(t.scheme, Scheme::Https);
        assert!(t.config.no_tls_verify);
        assert_eq!(t.config.response_header_timeout, 7_000_000_000);
        let t = Target::from_headers(&headers(&[("X-Proxy-Host", "app:80")])).unwrap();
        assert_eq!(t.scheme, Scheme::Http);
    }

    #[test]
    fn refusals() {
        for (pairs, needle) in [
            (vec![("X-Proxy-Scheme", "http")], "missing proxy host"),
            (vec![], "missing proxy host"),
            (
                vec![("X-Proxy-Host", "a:1"), ("X-Proxy-Scheme", "ftp")],
                "invalid proxy scheme",
            ),
            (
                vec![("X-Proxy-Host", "a:1"), ("X-Proxy-Config", "%%%")],
                "not base64",
            ),
            (
                vec![("X-Proxy-Host", "a:1"), ("X-Proxy-Config", "bm90IGpzb24=")],
                "expected JSON",
            ),
            (
                vec![("X-Proxy-Host", "a b"), ("X-Proxy-Scheme", "http")],
                "host[:port]",
            ),
        ] {
            let err = Target::from_headers(&headers(&pairs)).unwrap_err();
            assert!(err.contains(needle), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn protocol_ranges() {
        let v =
            |list: &[&str]| tls_versions(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(v(&[]).unwrap().len(), 2);
        assert_eq!(v(&["tlsv1.3"]).unwrap().len(), 1);
        assert_eq!(v(&["tlsv1.0", "tlsv1.3"]).unwrap().len(), 2);
        assert_eq!(v(&["TLSv1.2"]).unwrap().len(), 1);
        assert!(
            v(&["tlsv1.0", "tlsv1.1"])
                .unwrap_err()
                .contains("1.2 and 1.3")
        );
        assert!(v(&["sslv3"]).unwrap_err().contains("unsupported"));
    }

    #[test]
    fn request_and_response_headers() {
        let mut req = headers(&[
            ("Host", "app.example"),
            ("X-Proxy-Host", "a:1"),
            ("X-Proxy-Config", "e30="),
            ("Connection", "keep-alive, x-custom"),
            ("X-Custom", "1"),
            ("TE", "trailers"),
            ("X-Forwarded-For", "1.2.3.4"),
        ]);
        prepare_request(&mut req, false);
        assert_eq!(req["host"], "app.example");
        assert!(!req.keys().any(|k| k.as_str().starts_with("x-proxy")));
        assert!(!req.contains_key("x-custom"));
        assert!(!req.contains_key("connection"));
        assert_eq!(req["te"], "trailers");
        assert_eq!(req["x-forwarded-proto"], "https");
        assert_eq!(req["x-forwarded-for"], "1.2.3.4");
        let mut resp = headers(&[
            ("Server", "nginx"),
            ("X-Powered-By", "PHP"),
            ("Content-Type", "application/grpc"),
            ("Keep-Alive", "timeout=5"),
        ]);
        prepare_response(&mut resp, false, true);
        assert!(!resp.contains_key("server"));
        assert!(!resp.contains_key("x-powered-by"));
        assert!(!resp.contains_key("keep-alive"));
        assert_eq!(resp["trailer"], GRPC_TRAILERS);
    }
}
