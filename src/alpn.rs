//! Routing a TLS connection by the application protocol it negotiated.

use crate::protocol::{ALPN_HTTP1, ALPN_STREAM};

/// What a TLS connection carries, decided by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alpn {
    /// `godoxy-agent-stream/1`: a TCP stream tunnel.
    Stream,
    /// `http/1.1`, anything else, or no ALPN: the HTTP API.
    Http,
}

impl Alpn {
    /// What the server offers, in preference order.
    pub(crate) const SERVER_OFFER: [&'static [u8]; 2] = [ALPN_STREAM, ALPN_HTTP1];

    /// Routes a negotiated protocol (or none).
    pub(crate) fn parse(negotiated: Option<&[u8]>) -> Self {
        match negotiated {
            Some(ALPN_STREAM) => Self::Stream,
            _ => Self::Http,
        }
    }

    /// For logs.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Stream => "stream",
            Self::Http => "http",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(Alpn::parse(Some(b"godoxy-agent-stream/1")), Alpn::Stream);
        assert_eq!(Alpn::parse(Some(b"http/1.1")), Alpn::Http);
        assert_eq!(Alpn::parse(Some(b"h2")), Alpn::Http);
        assert_eq!(Alpn::parse(None), Alpn::Http);
    }
}
