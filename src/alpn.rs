//! The application protocols of the TLS port: the only place their ids are spelled.

/// What a TLS connection carries, decided by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// `godoxy-agent-stream/1`: a TCP stream tunnel.
    Stream,
    /// `http/1.1`, anything else, or no ALPN: the HTTP API.
    Http,
}

impl Alpn {
    /// The stream tunnel's protocol id.
    pub const STREAM: &'static [u8] = b"godoxy-agent-stream/1";
    /// HTTP/1.1's protocol id.
    pub const HTTP1: &'static [u8] = b"http/1.1";
    /// What the server offers, in preference order.
    pub const SERVER_OFFER: [&'static [u8]; 2] = [Self::STREAM, Self::HTTP1];

    /// Routes a negotiated protocol (or none).
    pub fn parse(negotiated: Option<&[u8]>) -> Self {
        match negotiated {
            Some(Self::STREAM) => Self::Stream,
            _ => Self::Http,
        }
    }

    /// For logs.
    pub fn as_str(self) -> &'static str {
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
