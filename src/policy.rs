//! The destination policy: which addresses the agent dials on a client's behalf (TCP tunnels,
//! UDP sessions, `/proxy/http` routes and `/health` checks). A name is resolved once, every
//! address it resolves to is judged, and only the allowed addresses are returned: the caller
//! connects to exactly those, so a second resolution (DNS rebinding) cannot change the target.
//!
//! Entries of `policy.allow` and `policy.deny` (see `config/godoxy-agent.toml`):
//! `10.0.0.0/8`, `192.168.1.20`, `fd00::/8` (addresses and CIDRs), `*.lan`, `db.internal` (host
//! names), `@host-addresses`, `@host-networks` (this host's interfaces), `*` (everything), each
//! optionally with ports: `10.0.0.0/8:5432`, `*.lan:80-443`, `[fd00::/8]:53`, `*:22`.
//! Deny wins over allow; what no allow entry matches is denied.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioIo;
use ipnet::{IpNet, Ipv4Net};
use tokio::net::TcpStream;
use tracing::debug;

use crate::config::PolicyConfig;
use crate::protocol::Host;

/// What `policy.allow = []` means: loopback, the private ranges (RFC 1918, CGNAT/Tailscale,
/// IPv6 ULA), this host's own addresses and the networks on its interfaces (container bridges
/// of any prefix).
pub(crate) const DEFAULT_ALLOW: &[&str] = &[
    "127.0.0.0/8",
    "::1",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
    HOST_ADDRESSES,
    HOST_NETWORKS,
];

/// Denied before any rule of the file while `policy.deny_link_local` is on (the default):
/// link-local ranges, where clouds serve instance metadata (169.254.169.254), and the metadata
/// services' other addresses (AWS over IPv6, Alibaba Cloud).
pub(crate) const LINK_LOCAL_DENY: &[&str] = &[
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254",
    "100.100.100.200",
];

const HOST_ADDRESSES: &str = "@host-addresses";
const HOST_NETWORKS: &str = "@host-networks";
const DEFAULTS: &str = "@defaults";
/// How long a reading of the host's interfaces is used (bridges come and go with networks).
const INTERFACES_TTL: Duration = Duration::from_secs(2);
/// Refused addresses named in one denial at most (a name may resolve to many).
const MAX_LISTED: usize = 8;

/// The compiled `[policy]`.
#[derive(Debug)]
pub(crate) struct Policy {
    allow: Vec<Rule>,
    /// Built-in entries first, then the file's.
    deny: Vec<Rule>,
    interfaces: Interfaces,
}

/// A bad entry of `policy.allow` or `policy.deny`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntryError {
    /// `policy.allow` or `policy.deny`.
    pub(crate) key: &'static str,
    /// What is wrong, naming the entry.
    pub(crate) reason: String,
}

impl Policy {
    /// Compiles the configuration; every bad entry is reported.
    pub(crate) fn new(config: &PolicyConfig) -> Result<Self, Vec<EntryError>> {
        let mut errors = Vec::new();
        let mut allow = Vec::new();
        let listed: Vec<&str> = if config.allow.is_empty() {
            DEFAULT_ALLOW.to_vec()
        } else {
            config.allow.iter().map(String::as_str).collect()
        };
        for entry in listed {
            if entry.trim() == DEFAULTS {
                allow.extend(
                    DEFAULT_ALLOW
                        .iter()
                        .filter_map(|e| Rule::parse(e, false).ok()),
                );
                continue;
            }
            match Rule::parse(entry, false) {
                Ok(rule) => allow.push(rule),
                Err(reason) => errors.push(EntryError {
                    key: "policy.allow",
                    reason: format!("`{entry}`: {reason}"),
                }),
            }
        }
        let mut deny = Vec::new();
        if config.deny_link_local {
            deny.extend(
                LINK_LOCAL_DENY
                    .iter()
                    .filter_map(|e| Rule::parse(e, true).ok()),
            );
        }
        for entry in &config.deny {
            let parsed = if entry.trim() == DEFAULTS {
                Err(format!("{DEFAULTS} is for policy.allow"))
            } else {
                Rule::parse(entry, false)
            };
            match parsed {
                Ok(rule) => deny.push(rule),
                Err(reason) => errors.push(EntryError {
                    key: "policy.deny",
                    reason: format!("`{entry}`: {reason}"),
                }),
            }
        }
        if errors.is_empty() {
            Ok(Self {
                allow,
                deny,
                interfaces: Interfaces::default(),
            })
        } else {
            Err(errors)
        }
    }

    /// The addresses to connect to for `host:port`: an IP literal as it is, a name through the
    /// system resolver (so numeric spellings like `127.1` or `0x7f.1` become the address they
    /// mean); each address judged, the denied ones dropped. Refused when none is left.
    pub(crate) async fn resolve(&self, host: &Host, port: u16) -> Result<Vec<SocketAddr>, Refused> {
        let name = match host {
            Host::Ip(ip) => {
                let ip = ip.to_canonical();
                return match self.judge(None, ip, port) {
                    Ok(()) => Ok(vec![SocketAddr::new(ip, port)]),
                    Err(why) => Err(Refused::Denied(Denial {
                        host: ip.to_string(),
                        refused: vec![(Some(ip), why)],
                        more: 0,
                    })),
                };
            }
            Host::Name(name) => name.as_str(),
        };
        let deny_name = |why| {
            Refused::Denied(Denial {
                host: name.to_owned(),
                refused: vec![(None, why)],
                more: 0,
            })
        };
        // Nothing that could not be a name or a numeric address reaches the resolver (a query
        // for garbage would leave the host for nothing).
        if !resolvable(name) {
            return Err(deny_name(Why::NotAHostName));
        }
        let pattern = pattern_name(name);
        let mut view = self.interfaces.view();
        // A name a deny entry matches is refused before it is resolved.
        if let Some(rule) = self
            .deny
            .iter()
            .find(|r| r.matches(pattern.as_deref(), None, port, &mut view))
        {
            return Err(deny_name(rule.why()));
        }
        let found: Vec<SocketAddr> = tokio::net::lookup_host((name, port))
            .await
            .map_err(Refused::Resolve)?
            .collect();
        if found.is_empty() {
            return Err(Refused::Resolve(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{name} resolved to no address"),
            )));
        }
        let mut allowed: Vec<SocketAddr> = Vec::new();
        let mut refused = Vec::new();
        for addr in found {
            let ip = addr.ip().to_canonical();
            // The scope of a link-local IPv6 address stays with it.
            let addr = if ip == addr.ip() {
                addr
            } else {
                SocketAddr::new(ip, port)
            };
            match self.judge_with(pattern.as_deref(), ip, port, &mut view) {
                Ok(()) if !allowed.contains(&addr) => allowed.push(addr),
                Ok(()) => {}
                Err(why) if !refused.iter().any(|(r, _)| *r == Some(ip)) => {
                    refused.push((Some(ip), why));
                }
                Err(_) => {}
            }
        }
        let more = refused.len().saturating_sub(MAX_LISTED);
        refused.truncate(MAX_LISTED);
        let denial = Denial {
            host: name.to_owned(),
            refused,
            more,
        };
        if allowed.is_empty() {
            return Err(Refused::Denied(denial));
        }
        if !denial.refused.is_empty() {
            debug!(allowed = ?allowed, "some addresses refused: {denial}");
        }
        Ok(allowed)
    }

    /// Judges one address; `name` is the host name it came from, for name entries.
    fn judge(&self, name: Option<&str>, ip: IpAddr, port: u16) -> Result<(), Why> {
        self.judge_with(name, ip, port, &mut self.interfaces.view())
    }

    fn judge_with(
        &self,
        name: Option<&str>,
        ip: IpAddr,
        port: u16,
        view: &mut View<'_>,
    ) -> Result<(), Why> {
        // 0.0.0.0 and :: reach this host's every address: no destination, whatever the file.
        if ip.is_unspecified() {
            return Err(Why::Unspecified);
        }
        if let Some(rule) = self
            .deny
            .iter()
            .find(|r| r.matches(name, Some(ip), port, view))
        {
            return Err(rule.why());
        }
        if self
            .allow
            .iter()
            .any(|r| r.matches(name, Some(ip), port, view))
        {
            Ok(())
        } else {
            Err(Why::NotAllowed)
        }
    }
}

/// Why nothing was dialed.
#[derive(Debug)]
pub(crate) enum Refused {
    /// The policy refused the destination.
    Denied(Denial),
    /// The name did not resolve.
    Resolve(io::Error),
}

/// A destination the policy refused: the host as the client named it and why each address
/// (or the name itself) was refused.
#[derive(Debug, Clone)]
pub(crate) struct Denial {
    host: String,
    refused: Vec<(Option<IpAddr>, Why)>,
    /// Refused addresses beyond those listed.
    more: usize,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.host)?;
        for (i, (ip, why)) in self.refused.iter().enumerate() {
            match ip {
                Some(ip) if ip.to_string() == self.host => write!(f, " ({why})")?,
                Some(ip) => {
                    let sep = if i == 0 { " -> " } else { ", " };
                    write!(f, "{sep}{ip} ({why})")?;
                }
                None => write!(f, " ({why})")?,
            }
        }
        if self.more > 0 {
            write!(f, " and {} more", self.more)?;
        }
        Ok(())
    }
}

impl std::error::Error for Denial {}

/// The denial somewhere in an error's chain (hyper's client wraps the connector's error).
pub(crate) fn denial_in<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Denial> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(denial) = err.downcast_ref::<Denial>() {
            return Some(denial);
        }
        next = err.source();
    }
    None
}

#[derive(Debug, Clone)]
enum Why {
    Rule { text: Arc<str>, built_in: bool },
    Unspecified,
    NotAllowed,
    NotAHostName,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rule {
                text,
                built_in: true,
            } => write!(f, "built-in deny \"{text}\""),
            Self::Rule { text, .. } => write!(f, "deny entry \"{text}\""),
            Self::Unspecified => f.write_str("unspecified address"),
            Self::NotAllowed => f.write_str("in no allow entry"),
            Self::NotAHostName => f.write_str("not a host name or address"),
        }
    }
}

/// One entry of a list.
#[derive(Debug, Clone)]
struct Rule {
    text: Arc<str>,
    target: Target,
    /// Inclusive; `None`: every port.
    ports: Option<(u16, u16)>,
    built_in: bool,
}

#[derive(Debug, Clone)]
enum Target {
    Net(IpNet),
    Name(NamePattern),
    HostAddresses,
    HostNetworks,
    Any,
}

#[derive(Debug, Clone)]
enum NamePattern {
    /// `db.internal`.
    Exact(String),
    /// `*.lan`, stored as `.lan`: names under the domain, not the domain itself.
    Under(String),
}

impl Rule {
    fn parse(entry: &str, built_in: bool) -> Result<Self, String> {
        let text = entry.trim();
        if text.is_empty() {
            return Err("empty entry".to_owned());
        }
        let (target, ports) = if let Some(rest) = text.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or("missing `]` (IPv6 with ports: [fd00::/8]:53)")?;
            let ports = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or("expected `:PORTS` after `]`")?,
                ),
            };
            (Target::Net(parse_net(inside)?), ports)
        } else if text.matches(':').count() >= 2 {
            // IPv6 without brackets: no ports (`fd00::1:53` is an address).
            let net = parse_net(text).map_err(|e| {
                if text
                    .split_once('/')
                    .is_some_and(|(_, len)| len.contains(':'))
                {
                    "an IPv6 address with ports is written in brackets: [fd00::/8]:53".to_owned()
                } else {
                    e
                }
            })?;
            (Target::Net(net), None)
        } else {
            let (target, ports) = match text.rsplit_once(':') {
                Some((target, ports)) => (target, Some(ports)),
                None => (text, None),
            };
            let target = match target {
                "*" => Target::Any,
                HOST_ADDRESSES => Target::HostAddresses,
                HOST_NETWORKS => Target::HostNetworks,
                keyword if keyword.starts_with('@') => {
                    return Err(format!(
                        "unknown keyword (expected {HOST_ADDRESSES}, {HOST_NETWORKS} or, in \
                         policy.allow, {DEFAULTS})"
                    ));
                }
                t if t.contains('/') || t.parse::<IpAddr>().is_ok() => Target::Net(parse_net(t)?),
                name => Target::Name(parse_name(name)?),
            };
            (target, ports)
        };
        let ports = ports.map(parse_ports).transpose()?;
        Ok(Self {
            text: Arc::from(text),
            target,
            ports,
            built_in,
        })
    }

    fn matches(
        &self,
        name: Option<&str>,
        ip: Option<IpAddr>,
        port: u16,
        view: &mut View<'_>,
    ) -> bool {
        if let Some((lo, hi)) = self.ports
            && !(lo..=hi).contains(&port)
        {
            return false;
        }
        match &self.target {
            Target::Any => true,
            Target::Net(net) => ip.is_some_and(|ip| net.contains(&ip)),
            Target::Name(pattern) => name.is_some_and(|name| pattern.matches(name)),
            Target::HostAddresses => {
                ip.is_some_and(|ip| view.nets().iter().any(|net| net.addr() == ip))
            }
            Target::HostNetworks => {
                ip.is_some_and(|ip| view.nets().iter().any(|net| net.contains(&ip)))
            }
        }
    }

    fn why(&self) -> Why {
        Why::Rule {
            text: self.text.clone(),
            built_in: self.built_in,
        }
    }
}

impl NamePattern {
    fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(exact) => name == exact,
            Self::Under(suffix) => name.len() > suffix.len() && name.ends_with(suffix.as_str()),
        }
    }
}

/// An address or CIDR; IPv4-mapped IPv6 (`::ffff:10.0.0.0/104`) becomes the IPv4 form, as the
/// addresses it is matched against do.
fn parse_net(text: &str) -> Result<IpNet, String> {
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (text, None),
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("`{addr}` is not an IPv4 or IPv6 address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(len) => len
            .parse::<u8>()
            .ok()
            .filter(|&n| n <= max)
            .ok_or_else(|| format!("prefix length `{len}` is not 0-{max}"))?,
    };
    let net = IpNet::new(ip, len).map_err(|e| format!("{e}"))?.trunc();
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
    {
        let v4 = Ipv4Net::new(v4, v6.prefix_len() - 96).map_err(|e| format!("{e}"))?;
        return Ok(IpNet::V4(v4));
    }
    Ok(net)
}

/// `*.lan` or `db.internal`, lowercased, without a trailing dot.
fn parse_name(text: &str) -> Result<NamePattern, String> {
    let (under, name) = match text.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let Some(name) = pattern_name(name) else {
        return Err(if name.contains('*') {
            "`*` stands alone or opens a domain pattern: `*.lan`".to_owned()
        } else if is_numeric(name) {
            "a numeric spelling, not a host name: write the address (e.g. 127.0.0.1) or a CIDR"
                .to_owned()
        } else {
            "not an address, CIDR, host name or `*.domain` pattern".to_owned()
        });
    };
    Ok(if under {
        NamePattern::Under(format!(".{name}"))
    } else {
        NamePattern::Exact(name)
    })
}

/// `N` or `N-M`, within 1-65535.
fn parse_ports(text: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("`{p}` is not a port (1-65535)"))
    };
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (port(lo)?, port(hi)?),
        None => {
            let p = port(text)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(format!("port range `{text}` runs backwards"));
    }
    Ok((lo, hi))
}

/// A host name as name entries see it: lowercased, no trailing dot, letters, digits, `-`, `_`
/// and dots. `None` for anything else, and for numeric spellings (`127.1`, `0x7f.1`,
/// `2130706433`): those are judged by the address they resolve to, never by name.
fn pattern_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    (valid && !is_numeric(&name)).then_some(name)
}

/// Whether the resolver would read `name` as a number: its last label is decimal, octal or
/// `0x` hex (what inet_aton accepts, and what URL parsers treat as an IPv4 address).
fn is_numeric(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let last = name.rsplit('.').next().unwrap_or("");
    let hex = last
        .strip_prefix("0x")
        .or_else(|| last.strip_prefix("0X"))
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    hex || (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `name` may go to the resolver: a host name, a numeric spelling, or an IPv6 address
/// with a zone (`fe80::1%eth0`, which Rust's parser does not read but getaddrinfo does).
fn resolvable(name: &str) -> bool {
    let plain = !name.is_empty()
        && name.len() <= 254
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    let zoned = name.split_once('%').is_some_and(|(ip, zone)| {
        ip.parse::<std::net::Ipv6Addr>().is_ok()
            && !zone.is_empty()
            && zone
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    });
    plain || zoned
}

/// The host's interface addresses with their networks, read at most every [`INTERFACES_TTL`].
#[derive(Debug, Default)]
struct Interfaces {
    cache: Mutex<Option<(Instant, Arc<[IpNet]>)>>,
}

impl Interfaces {
    fn view(&self) -> View<'_> {
        View {
            source: self,
            nets: None,
        }
    }

    fn read(&self) -> Arc<[IpNet]> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, nets)) = cache.as_ref()
            && at.elapsed() < INTERFACES_TTL
        {
            return nets.clone();
        }
        let nets: Arc<[IpNet]> = match webrtc_util::ifaces::ifaces() {
            Ok(interfaces) => interfaces
                .into_iter()
                .filter_map(|i| {
                    let ip = i.addr?.ip();
                    let ip = match ip {
                        IpAddr::V4(_) => ip,
                        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                    };
                    let mask = i.mask.map(|m| m.ip());
                    match mask {
                        Some(mask) if mask.is_ipv4() == ip.is_ipv4() => {
                            IpNet::with_netmask(ip, mask).ok()
                        }
                        _ => Some(IpNet::from(ip)),
                    }
                })
                .collect(),
            Err(err) => {
                debug!("reading the host's interfaces: {err}");
                Arc::from(Vec::new())
            }
        };
        *cache = Some((Instant::now(), nets.clone()));
        nets
    }
}

/// One judgement's look at the interfaces: read once, on first need.
struct View<'a> {
    source: &'a Interfaces,
    nets: Option<Arc<[IpNet]>>,
}

impl View<'_> {
    fn nets(&mut self) -> &[IpNet] {
        self.nets.get_or_insert_with(|| self.source.read())
    }
}

/// A host and port as an HTTP request or a health check names them: `[v6]`, v4, or a name.
pub(crate) fn host_of(text: &str) -> Host {
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    match bare.parse::<IpAddr>() {
        Ok(ip) => Host::Ip(ip),
        Err(_) => Host::Name(text.to_owned()),
    }
}

/// The connector of every HTTP client that dials for a client (`/proxy/http`, `/health`):
/// hyper-util's `HttpConnector` with [`PolicyResolver`], so it connects only to addresses the
/// policy allowed. IP literals, which `HttpConnector` dials without asking its resolver, are
/// judged here first.
#[derive(Debug, Clone)]
pub(crate) struct PolicyConnector {
    policy: Arc<Policy>,
}

impl PolicyConnector {
    pub(crate) fn new(policy: Arc<Policy>) -> Self {
        Self { policy }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for PolicyConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            let https = uri.scheme() == Some(&hyper::http::uri::Scheme::HTTPS);
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            if let Host::Ip(ip) = host_of(uri.host().unwrap_or("")) {
                match policy.resolve(&Host::Ip(ip), port).await {
                    Ok(_) => {}
                    Err(Refused::Denied(denial)) => return Err(denial.into()),
                    Err(Refused::Resolve(err)) => return Err(err.into()),
                }
            }
            // The resolver needs the port for entries with ports; a connector per connection
            // is cheap (its settings are one small allocation).
            let mut http = HttpConnector::new_with_resolver(PolicyResolver { policy, port });
            http.enforce_http(false);
            http.set_nodelay(true);
            tower_service::Service::call(&mut http, uri)
                .await
                .map_err(Into::into)
        })
    }
}

/// hyper-util's resolver for one port: [`Policy::resolve`], failing with the [`Denial`] when
/// nothing is allowed.
#[derive(Debug, Clone)]
struct PolicyResolver {
    policy: Arc<Policy>,
    port: u16,
}

impl tower_service::Service<Name> for PolicyResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let (policy, port) = (self.policy.clone(), self.port);
        Box::pin(async move {
            match policy
                .resolve(&Host::Name(name.as_str().to_owned()), port)
                .await
            {
                Ok(addrs) => Ok(addrs.into_iter()),
                Err(Refused::Denied(denial)) => Err(denial.into()),
                Err(Refused::Resolve(err)) => Err(err.into()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn policy(allow: &[&str], deny: &[&str]) -> Policy {
        Policy::new(&PolicyConfig {
            allow: allow.iter().map(|s| (*s).to_owned()).collect(),
            deny: deny.iter().map(|s| (*s).to_owned()).collect(),
            deny_link_local: true,
        })
        .unwrap()
    }

    fn errors(allow: &[&str], deny: &[&str]) -> Vec<EntryError> {
        Policy::new(&PolicyConfig {
            allow: allow.iter().map(|s| (*s).to_owned()).collect(),
            deny: deny.iter().map(|s| (*s).to_owned()).collect(),
            deny_link_local: true,
        })
        .unwrap_err()
    }

    async fn verdict(p: &Policy, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let host = match host.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(host.to_owned()),
        };
        p.resolve(&host, port).await.map_err(|e| match e {
            Refused::Denied(d) => d.to_string(),
            Refused::Resolve(e) => format!("resolve: {e}"),
        })
    }

    #[test]
    fn entries_parse() {
        let p = policy(
            &[
                "10.0.0.0/8",
                "192.168.1.20",
                "10.1.2.3/8:5432",
                "[fd00::/8]:53",
                "[::1]",
                "fd00::/8",
                "*.lan:80-443",
                "db.internal",
                "*",
                "*:22",
                "@host-addresses",
                "@host-networks:1-1024",
                "::ffff:10.0.0.0/104",
            ],
            &[],
        );
        assert_eq!(p.allow.len(), 13);
        assert!(matches!(p.allow[2].ports, Some((5432, 5432))));
        assert!(matches!(&p.allow[12].target, Target::Net(IpNet::V4(n)) if n.prefix_len() == 8));
        // `@defaults` expands.
        let p = policy(&["@defaults", "203.0.113.0/24"], &[]);
        assert_eq!(p.allow.len(), DEFAULT_ALLOW.len() + 1);
    }

    #[test]
    fn bad_entries_name_the_key_and_the_entry() {
        for (entry, needle) in [
            ("10.0.0.0/33", "prefix length `33` is not 0-32"),
            ("fd00::/8:53", "brackets"),
            ("fd00::/200", "prefix length `200` is not 0-128"),
            ("[fd00::1]53", "`:PORTS`"),
            ("10.0.0.0/8:0", "`0` is not a port"),
            ("10.0.0.0/8:10-5", "runs backwards"),
            ("*.lan:70000", "`70000` is not a port"),
            ("127.1", "numeric spelling"),
            ("0x7f.1", "numeric spelling"),
            ("a*.lan", "`*` stands alone"),
            ("bad name", "not an address"),
            ("@hosts", "unknown keyword"),
            ("", "empty entry"),
            ("300.1.1.1/8", "not an IPv4 or IPv6 address"),
        ] {
            let errs = errors(&[entry], &[]);
            assert_eq!(errs.len(), 1, "{entry}");
            assert_eq!(errs[0].key, "policy.allow");
            assert!(
                errs[0].reason.contains(&format!("`{entry}`")),
                "{entry}: {errs:?}"
            );
            assert!(errs[0].reason.contains(needle), "{entry}: {errs:?}");
        }
        let errs = errors(&[], &["@defaults", "x y"]);
        assert_eq!(errs.len(), 2);
        assert!(errs.iter().all(|e| e.key == "policy.deny"));
    }

    #[tokio::test]
    async fn every_spelling_of_loopback_meets_a_loopback_deny() {
        let p = policy(&[], &["127.0.0.0/8", "::1"]);
        for host in [
            "127.0.0.1",
            "127.1",
            "2130706433",
            "0x7f.1",
            "0x7f000001",
            "0177.0.0.1",
            "127.000.000.001",
            "::ffff:127.0.0.1",
            "::ffff:7f00:1",
            "localhost",
            "LocalHost",
        ] {
            let v = verdict(&p, host, 80).await;
            let err = match v {
                Ok(addrs) => panic!("{host}: allowed {addrs:?}"),
                Err(err) => err,
            };
            assert!(err.contains("deny entry"), "{host}: {err}");
        }
        // Not a name: refused before the resolver sees it.
        let err = verdict(&p, "[::ffff:127.0.0.1]", 80).await.unwrap_err();
        assert!(err.contains("not a host name"), "{err}");
    }

    #[tokio::test]
    async fn defaults_allow_loopback_and_private_but_not_metadata_or_unspecified() {
        let p = policy(&[], &[]);
        for host in [
            "127.0.0.1",
            "127.1",
            "::1",
            "10.1.2.3",
            "172.17.0.2",
            "192.168.1.1",
        ] {
            assert!(verdict(&p, host, 80).await.is_ok(), "{host}");
        }
        assert_eq!(
            verdict(&p, "127.1", 80).await.unwrap(),
            vec![SocketAddr::new(LOOPBACK, 80)]
        );
        // The mapped form is dialed as the IPv4 address it was judged as.
        assert_eq!(
            verdict(&p, "::ffff:127.0.0.1", 80).await.unwrap(),
            vec![SocketAddr::new(LOOPBACK, 80)]
        );
        for host in [
            "169.254.169.254",
            "0xa9.0xfe.0xa9.0xfe",
            "2852039166",
            "0251.0376.0251.0376",
            "169.254.43518",
            "::ffff:169.254.169.254",
            "::ffff:a9fe:a9fe",
            "fd00:ec2::254",
            "fe80::1",
            "100.100.100.200",
        ] {
            let err = verdict(&p, host, 80).await.unwrap_err();
            assert!(err.contains("built-in deny"), "{host}: {err}");
            assert!(
                err.contains("169.254.169.254") || !host.contains("169"),
                "{err}"
            );
        }
        for host in ["0.0.0.0", "::", "0", "::ffff:0.0.0.0"] {
            let err = verdict(&p, host, 80).await.unwrap_err();
            assert!(err.contains("unspecified"), "{host}: {err}");
        }
        let err = verdict(&p, "8.8.8.8", 53).await.unwrap_err();
        assert!(err.contains("in no allow entry"), "{err}");
    }

    #[tokio::test]
    async fn link_local_denies_can_be_lifted() {
        let p = Policy::new(&PolicyConfig {
            allow: vec!["169.254.0.0/16".to_owned()],
            deny: Vec::new(),
            deny_link_local: false,
        })
        .unwrap();
        assert!(verdict(&p, "169.254.1.1", 80).await.is_ok());
        // The unspecified addresses stay refused.
        assert!(verdict(&p, "0.0.0.0", 80).await.is_err());
    }

    #[tokio::test]
    async fn allow_list_mode_with_ports_and_names() {
        let p = policy(
            &["127.0.0.2/32", "127.0.0.1:8000-8099", "localhost:9000"],
            &[],
        );
        assert!(verdict(&p, "127.0.0.2", 1).await.is_ok());
        assert!(verdict(&p, "127.0.0.1", 8050).await.is_ok());
        assert!(verdict(&p, "127.0.0.1", 8100).await.is_err());
        assert!(verdict(&p, "localhost", 9000).await.is_ok());
        // The name entry does not cover its numeric spellings.
        assert!(verdict(&p, "10.0.0.1", 80).await.is_err());
        // Deny wins.
        let p = policy(&["*"], &["127.0.0.0/8:22", "*.lan"]);
        assert!(verdict(&p, "127.0.0.1", 80).await.is_ok());
        let err = verdict(&p, "127.0.0.1", 22).await.unwrap_err();
        assert!(err.contains("127.0.0.0/8:22"), "{err}");
        // A denied name is refused before it is resolved (this one would not resolve).
        let err = verdict(&p, "nothing.lan", 80).await.unwrap_err();
        assert!(err.contains("deny entry \"*.lan\""), "{err}");
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(pattern_name("DB.Lan."), Some("db.lan".to_owned()));
        for numeric in [
            "127.1",
            "2130706433",
            "0x7f.1",
            "0177.0.0.1",
            "a.0x1f",
            "1.2.3.4",
        ] {
            assert!(is_numeric(numeric), "{numeric}");
            assert_eq!(pattern_name(numeric), None, "{numeric}");
        }
        assert!(!is_numeric("db.lan") && !is_numeric("0xg.lan"));
        assert!(resolvable("fe80::1%eth0") && resolvable("db.lan") && resolvable("0x7f.1"));
        assert!(!resolvable("[::1]") && !resolvable("a b") && !resolvable(""));
        let p = NamePattern::Under(".lan".to_owned());
        assert!(
            p.matches("a.lan") && p.matches("a.b.lan") && !p.matches("lan") && !p.matches("alan")
        );
    }

    #[test]
    fn denial_reads_well_and_is_found_in_an_error_chain() {
        let d = Denial {
            host: "localhost".to_owned(),
            refused: vec![
                (Some(LOOPBACK), Why::NotAllowed),
                (Some("::1".parse().unwrap()), Why::Unspecified),
            ],
            more: 0,
        };
        assert_eq!(
            d.to_string(),
            "localhost -> 127.0.0.1 (in no allow entry), ::1 (unspecified address)"
        );
        // As hyper's client and connector errors hold their cause.
        #[derive(Debug)]
        struct Wrapper(BoxError);
        impl fmt::Display for Wrapper {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("client error")
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&*self.0)
            }
        }
        let wrapped = Wrapper(Box::new(Wrapper(d.into())));
        assert!(denial_in(&wrapped).is_some());
        assert!(denial_in(&Wrapper(io::Error::other("x").into())).is_none());
    }
}
