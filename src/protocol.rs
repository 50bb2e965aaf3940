//! The agent stream protocol, shared by the server, the client and `forward`: the names and
//! numbers both ends agree on, and the 275-byte header that opens every tunnel (pure
//! encode/decode, no I/O). docs/PROTOCOL.md describes it in prose.
//!
//! | offset | size | field                                       |
//! |-------:|-----:|---------------------------------------------|
//! |      0 |    8 | version `0.1.0` + 3 NUL                     |
//! |      8 |    1 | host length                                 |
//! |      9 |  255 | host, NUL padded                            |
//! |    264 |    1 | port length (0..=5)                         |
//! |    265 |    5 | port, decimal ASCII, NUL padded             |
//! |    270 |    1 | flag (bit 0: health probe)                  |
//! |    271 |    4 | CRC-32 (IEEE) of bytes 0..271, big-endian   |

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU16;

/// The name every GoDoxy agent certificate is issued for: SNI, and what clients verify.
pub const SERVER_NAME: &str = "godoxy.agent";
/// ALPN id of the TCP stream tunnel.
pub const ALPN_STREAM: &[u8] = b"godoxy-agent-stream/1";
/// ALPN id of the HTTP API.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// The one DTLS cipher suite the GoDoxy server (pion/dtls) offers and we accept.
pub const DTLS_CIPHER_SUITE: webrtc_dtls::cipher_suite::CipherSuiteId =
    webrtc_dtls::cipher_suite::CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Gcm_Sha256;
/// Size of the buffer every DTLS record read uses: webrtc-dtls and pion read records into
/// buffers of this size, and a record that does not fit is discarded.
pub const DTLS_READ_BUF: usize = 8192;
/// The largest datagram payload that crosses a UDP tunnel: 8192 minus a record's 37 bytes of
/// overhead with AES-128-GCM (13 header, 8 explicit nonce, 16 tag).
pub const MAX_PAYLOAD: usize = 8155;

/// Size of the header on the wire.
pub const HEADER_LEN: usize = 275;
/// The only version this protocol knows.
pub const VERSION: [u8; 8] = *b"0.1.0\0\0\0";
/// Flag bit 0: validate the header and close without dialing.
pub const FLAG_PROBE: u8 = 0x01;

const HOST_LEN_AT: usize = 8;
const HOST_AT: usize = 9;
const HOST_MAX: usize = 255;
const PORT_LEN_AT: usize = 264;
const PORT_AT: usize = 265;
const PORT_MAX: usize = 5;
const FLAG_AT: usize = 270;
const CRC_AT: usize = 271;

/// Why a header is not a valid header (the wire checks of PROTOCOL.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than 275 bytes arrived before the stream ended.
    #[error("header truncated: the stream ended before 275 bytes")]
    Short,
    /// The CRC-32 over bytes 0..271 does not match the trailer.
    #[error("header checksum mismatch")]
    Checksum,
    /// The version field is not `0.1.0`.
    #[error("unsupported header version")]
    Version,
    /// The port length byte is above 5.
    #[error("header port length {0} exceeds 5")]
    PortLength(u8),
}

impl HeaderError {
    /// Short name of the failed check, for logs and metrics.
    pub fn check(&self) -> &'static str {
        match self {
            Self::Short => "short",
            Self::Checksum => "crc",
            Self::Version => "version",
            Self::PortLength(_) => "port_length",
        }
    }
}

/// Why a well-formed header names a destination we refuse to dial (our rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    /// No host and no probe flag.
    #[error("empty host")]
    EmptyHost,
    /// The host holds NUL or other control bytes.
    #[error("host contains control bytes")]
    HostControlBytes,
    /// The host is not valid UTF-8.
    #[error("host is not valid UTF-8")]
    HostNotUtf8,
    /// No port.
    #[error("empty port")]
    EmptyPort,
    /// The port has a byte that is not an ASCII digit.
    #[error("port is not decimal")]
    PortNotDecimal,
    /// Port 0 or above 65535.
    #[error("port out of range")]
    PortOutOfRange,
}

/// A decoded header. The host and port are kept as raw bytes: [`TunnelHeader::destination`]
/// turns them into something that can be dialed.
#[derive(Clone, PartialEq, Eq)]
pub struct TunnelHeader {
    host: [u8; HOST_MAX],
    host_len: u8,
    port: [u8; PORT_MAX],
    port_len: u8,
    flag: u8,
}

impl TunnelHeader {
    /// A header for `host:port`. Fails when either does not fit its field.
    pub fn new(host: &str, port: &str, flag: u8) -> Result<Self, FieldTooLong> {
        Self::from_raw(host.as_bytes(), port.as_bytes(), flag)
    }

    /// A header from raw field bytes (tests use this to build refused destinations).
    pub fn from_raw(host: &[u8], port: &[u8], flag: u8) -> Result<Self, FieldTooLong> {
        let host_len = u8::try_from(host.len())
            .ok()
            .filter(|&n| usize::from(n) <= HOST_MAX)
            .ok_or(FieldTooLong::Host(host.len()))?;
        let port_len = u8::try_from(port.len())
            .ok()
            .filter(|&n| usize::from(n) <= PORT_MAX)
            .ok_or(FieldTooLong::Port(port.len()))?;
        let mut header = Self {
            host: [0; HOST_MAX],
            host_len,
            port: [0; PORT_MAX],
            port_len,
            flag,
        };
        header.host[..host.len()].copy_from_slice(host);
        header.port[..port.len()].copy_from_slice(port);
        Ok(header)
    }

    /// The health-probe header: empty host and port, probe flag set.
    pub fn probe() -> Self {
        Self {
            host: [0; HOST_MAX],
            host_len: 0,
            port: [0; PORT_MAX],
            port_len: 0,
            flag: FLAG_PROBE,
        }
    }

    /// Checks and decodes a header received from a peer.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, HeaderError> {
        let crc = u32::from_be_bytes([
            bytes[CRC_AT],
            bytes[CRC_AT + 1],
            bytes[CRC_AT + 2],
            bytes[CRC_AT + 3],
        ]);
        if crc32fast::hash(&bytes[..CRC_AT]) != crc {
            return Err(HeaderError::Checksum);
        }
        if bytes[..HOST_LEN_AT] != VERSION {
            return Err(HeaderError::Version);
        }
        let port_len = bytes[PORT_LEN_AT];
        if usize::from(port_len) > PORT_MAX {
            return Err(HeaderError::PortLength(port_len));
        }
        let mut header = Self {
            host: [0; HOST_MAX],
            host_len: bytes[HOST_LEN_AT],
            port: [0; PORT_MAX],
            port_len,
            flag: bytes[FLAG_AT],
        };
        header
            .host
            .copy_from_slice(&bytes[HOST_AT..HOST_AT + HOST_MAX]);
        header
            .port
            .copy_from_slice(&bytes[PORT_AT..PORT_AT + PORT_MAX]);
        Ok(header)
    }

    /// Decodes a header that may be shorter than [`HEADER_LEN`] (a DTLS record).
    pub fn decode_slice(bytes: &[u8]) -> Result<Self, HeaderError> {
        let array: &[u8; HEADER_LEN] = bytes.try_into().map_err(|_| HeaderError::Short)?;
        Self::decode(array)
    }

    /// The wire form, checksum included.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..HOST_LEN_AT].copy_from_slice(&VERSION);
        out[HOST_LEN_AT] = self.host_len;
        out[HOST_AT..HOST_AT + HOST_MAX].copy_from_slice(&self.host);
        out[PORT_LEN_AT] = self.port_len;
        out[PORT_AT..PORT_AT + PORT_MAX].copy_from_slice(&self.port);
        out[FLAG_AT] = self.flag;
        let crc = crc32fast::hash(&out[..CRC_AT]);
        out[CRC_AT..].copy_from_slice(&crc.to_be_bytes());
        out
    }

    /// The host field, its first `host length` bytes.
    pub fn host_bytes(&self) -> &[u8] {
        &self.host[..usize::from(self.host_len)]
    }

    /// The port field, its first `port length` bytes.
    pub fn port_bytes(&self) -> &[u8] {
        &self.port[..usize::from(self.port_len)]
    }

    /// The raw flag byte; unknown bits are kept but mean nothing.
    pub fn flag(&self) -> u8 {
        self.flag
    }

    /// Whether this header asks for a health probe (validate, close, dial nothing).
    pub fn is_probe(&self) -> bool {
        self.flag & FLAG_PROBE != 0
    }

    /// The destination to dial, checked against our rule. Never call this for a probe:
    /// a probe dials nothing whatever it names.
    pub fn destination(&self) -> Result<Destination, DestinationError> {
        let host = self.host_bytes();
        if host.is_empty() {
            return Err(DestinationError::EmptyHost);
        }
        if host.iter().any(|b| b.is_ascii_control()) {
            return Err(DestinationError::HostControlBytes);
        }
        let host = std::str::from_utf8(host).map_err(|_| DestinationError::HostNotUtf8)?;
        let port = self.port_bytes();
        if port.is_empty() {
            return Err(DestinationError::EmptyPort);
        }
        let mut value: u32 = 0;
        for &b in port {
            if !b.is_ascii_digit() {
                return Err(DestinationError::PortNotDecimal);
            }
            // at most 5 digits: no overflow in u32
            value = value * 10 + u32::from(b - b'0');
        }
        let port = u16::try_from(value)
            .ok()
            .and_then(NonZeroU16::new)
            .ok_or(DestinationError::PortOutOfRange)?;
        let host = match host.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(host.to_owned()),
        };
        Ok(Destination { host, port })
    }
}

impl fmt::Debug for TunnelHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelHeader")
            .field("host", &String::from_utf8_lossy(self.host_bytes()))
            .field("port", &String::from_utf8_lossy(self.port_bytes()))
            .field("flag", &self.flag)
            .finish()
    }
}

/// A host or port that does not fit its header field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FieldTooLong {
    /// The host is longer than 255 bytes.
    #[error("host is {0} bytes; the header holds at most 255")]
    Host(usize),
    /// The port is longer than 5 bytes.
    #[error("port is {0} bytes; the header holds at most 5")]
    Port(usize),
}

/// A checked destination host: an IP literal or a name to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// An IPv4 or IPv6 literal.
    Ip(IpAddr),
    /// A name without control bytes, resolved at dial time.
    Name(String),
}

/// A destination that passed our rule: dialable as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Where to connect.
    pub host: Host,
    /// A port in 1..=65535.
    pub port: NonZeroU16,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_round_trips() {
        let wire = TunnelHeader::probe().encode();
        let back = TunnelHeader::decode(&wire).unwrap();
        assert!(back.is_probe());
        assert_eq!(back.host_bytes(), b"");
    }

    #[test]
    fn too_long_fields_are_refused() {
        assert_eq!(
            TunnelHeader::new(&"a".repeat(256), "1", 0),
            Err(FieldTooLong::Host(256))
        );
        assert_eq!(
            TunnelHeader::new("a", "123456", 0),
            Err(FieldTooLong::Port(6))
        );
    }

    #[test]
    fn short_slice_is_short() {
        assert_eq!(
            TunnelHeader::decode_slice(&[0u8; 10]),
            Err(HeaderError::Short)
        );
    }

    #[test]
    fn ipv6_destination_displays_with_brackets() {
        let header = TunnelHeader::new("::1", "53", 0).unwrap();
        assert_eq!(header.destination().unwrap().to_string(), "[::1]:53");
    }

    #[test]
    fn every_byte_pattern_decodes_without_panic() {
        // Cheap exhaustive-ish fuzz: flip each byte of a valid header through a few values.
        let valid = TunnelHeader::new("example.com", "443", 0).unwrap().encode();
        for i in 0..HEADER_LEN {
            for v in [0u8, 1, 5, 6, 0x7f, 0xff] {
                let mut bytes = valid;
                bytes[i] = v;
                if let Ok(h) = TunnelHeader::decode(&bytes) {
                    let _ = h.destination();
                }
            }
        }
    }
}
