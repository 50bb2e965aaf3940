//! The HelloVerifyRequest exchange, run statelessly by the demultiplexer before any per-peer
//! state exists (RFC 6347 §4.2.1): a ClientHello without a cookie is answered with a
//! HelloVerifyRequest carrying `HMAC(secret, period, address, port, client random)`, and only a
//! ClientHello that returns a cookie this agent made, for that address, within the last one or
//! two periods, opens a handshake. A spoofed source never receives its cookie, so it holds no
//! slot and no memory; webrtc-dtls is told (`hello_verified_by_caller`) that the exchange is
//! done and answers the verified ClientHello with its ServerHello flight.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ring::hmac;
use ring::rand::{SecureRandom as _, SystemRandom};

/// The cookie's length: webrtc-dtls's own (`COOKIE_LENGTH`).
const COOKIE_LEN: usize = 20;
/// A cookie is valid in the period it was made in and the next one.
const PERIOD: Duration = Duration::from_secs(30);

const RECORD_HEADER: usize = 13;
const HANDSHAKE_HEADER: usize = 12;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_HELLO_VERIFY_REQUEST: u8 = 3;
const DTLS_1_2: [u8; 2] = [254, 253];

/// What the demultiplexer does with a well-formed ClientHello from an unknown peer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// No cookie: send this HelloVerifyRequest datagram back, keep nothing.
    Challenge(Vec<u8>),
    /// A cookie this agent made for this peer: open a handshake.
    Verified,
    /// A cookie this agent did not make (for this address, lately), or not as message 1.
    BadCookie,
}

/// The secret and the clock the cookies are made from.
pub(crate) struct Cookies {
    key: hmac::Key,
    started: Instant,
}

/// The fields of a ClientHello the exchange needs. The datagram has passed `preauth::check`,
/// so the structure is known good; every read is still bounds-checked.
struct Hello<'a> {
    message_seq: u16,
    random: &'a [u8],
    cookie: &'a [u8],
}

impl<'a> Hello<'a> {
    fn parse(datagram: &'a [u8]) -> Option<Self> {
        let handshake = datagram.get(RECORD_HEADER..)?;
        let message_seq = u16::from_be_bytes([*handshake.get(4)?, *handshake.get(5)?]);
        let body = handshake.get(HANDSHAKE_HEADER..)?;
        let random = body.get(2..34)?;
        let session_id_len = usize::from(*body.get(34)?);
        let cookie_at = 35 + session_id_len;
        let cookie_len = usize::from(*body.get(cookie_at)?);
        let cookie = body.get(cookie_at + 1..cookie_at + 1 + cookie_len)?;
        Some(Self {
            message_seq,
            random,
            cookie,
        })
    }
}

impl Cookies {
    /// A fresh secret from the system's CSPRNG.
    pub(crate) fn new() -> anyhow::Result<Self> {
        let mut secret = [0u8; 32];
        SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| anyhow::anyhow!("no randomness for the DTLS cookie secret"))?;
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            started: Instant::now(),
        })
    }

    /// Judges a ClientHello (a datagram that passed `preauth::check` as a ClientHello).
    pub(crate) fn judge(&self, datagram: &[u8], peer: SocketAddr) -> Verdict {
        let Some(hello) = Hello::parse(datagram) else {
            return Verdict::BadCookie;
        };
        let period = self.period();
        if hello.cookie.is_empty() {
            let cookie = self.cookie(period, peer, hello.random);
            return Verdict::Challenge(hello_verify_request(&cookie));
        }
        // The answer to our HelloVerifyRequest (message 0) is message 1.
        if hello.message_seq != 1 {
            return Verdict::BadCookie;
        }
        let valid = [period, period.saturating_sub(1)]
            .iter()
            .any(|&p| equal(&self.cookie(p, peer, hello.random), hello.cookie));
        if valid {
            Verdict::Verified
        } else {
            Verdict::BadCookie
        }
    }

    fn period(&self) -> u64 {
        self.started.elapsed().as_secs() / PERIOD.as_secs()
    }

    fn cookie(&self, period: u64, peer: SocketAddr, random: &[u8]) -> [u8; COOKIE_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&period.to_be_bytes());
        match peer.ip() {
            IpAddr::V4(v4) => ctx.update(&v4.octets()),
            IpAddr::V6(v6) => ctx.update(&v6.octets()),
        }
        ctx.update(&peer.port().to_be_bytes());
        ctx.update(random);
        let tag = ctx.sign();
        let mut cookie = [0u8; COOKIE_LEN];
        cookie.copy_from_slice(&tag.as_ref()[..COOKIE_LEN]);
        cookie
    }
}

/// Whether a ClientHello has the shape of the answer to a HelloVerifyRequest (a cookie, as
/// message 1): what the fuzz target admits in place of a cookie it cannot forge.
#[cfg(feature = "fuzzing")]
pub(crate) fn answers_a_challenge(datagram: &[u8]) -> bool {
    Hello::parse(datagram).is_some_and(|h| h.message_seq == 1 && !h.cookie.is_empty())
}

/// Compares in time independent of where the first difference is.
fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A HelloVerifyRequest record: epoch 0, record 0 and message 0, as webrtc-dtls would have
/// sent it (RFC 6347 §4.2.1 suggests the ClientHello's record number; webrtc-dtls, told that
/// the exchange is done, numbers its own records from 1, and a client drops a record number it
/// has seen, so this one is always 0).
fn hello_verify_request(cookie: &[u8; COOKIE_LEN]) -> Vec<u8> {
    let body_len = 2 + 1 + COOKIE_LEN;
    let handshake_len = HANDSHAKE_HEADER + body_len;
    let mut out = Vec::with_capacity(RECORD_HEADER + handshake_len);
    out.push(CONTENT_HANDSHAKE);
    out.extend_from_slice(&DTLS_1_2);
    out.extend_from_slice(&[0; 8]); // epoch and record sequence number
    out.extend_from_slice(&u16::try_from(handshake_len).unwrap_or(0).to_be_bytes());
    out.push(HANDSHAKE_HELLO_VERIFY_REQUEST);
    let len24 = u32::try_from(body_len).unwrap_or(0).to_be_bytes();
    out.extend_from_slice(&len24[1..]);
    out.extend_from_slice(&[0, 0]); // message_seq
    out.extend_from_slice(&[0, 0, 0]); // fragment_offset
    out.extend_from_slice(&len24[1..]); // fragment_length
    out.extend_from_slice(&DTLS_1_2);
    out.push(u8::try_from(COOKIE_LEN).unwrap_or(u8::MAX));
    out.extend_from_slice(cookie);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello datagram: record header, handshake header, body with `cookie`.
    fn hello(message_seq: u16, cookie: &[u8]) -> Vec<u8> {
        let mut body = vec![254, 253];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.push(u8::try_from(cookie.len()).unwrap());
        body.extend_from_slice(cookie);
        body.extend_from_slice(&[0, 2, 0xc0, 0x2b, 1, 0, 0, 0]);
        let mut hs = vec![1];
        hs.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        hs.extend_from_slice(&message_seq.to_be_bytes());
        hs.extend_from_slice(&[0, 0, 0]);
        hs.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 254, 255, 0, 0, 0, 0, 0, 0, 0, 9];
        rec.extend_from_slice(&u16::try_from(hs.len()).unwrap().to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    fn cookie_of(challenge: &[u8]) -> Vec<u8> {
        challenge[RECORD_HEADER + HANDSHAKE_HEADER + 3..].to_vec()
    }

    #[test]
    fn the_cookie_round_trips_for_its_peer_only() {
        let cookies = Cookies::new().unwrap();
        let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let Verdict::Challenge(hvr) = cookies.judge(&hello(0, &[]), peer) else {
            panic!("no challenge");
        };
        // Record: handshake, DTLS 1.2, epoch 0, record 0.
        assert_eq!(&hvr[..11], &[22, 254, 253, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(hvr[RECORD_HEADER], HANDSHAKE_HELLO_VERIFY_REQUEST);
        assert_eq!(hvr.len(), RECORD_HEADER + HANDSHAKE_HEADER + 3 + COOKIE_LEN);
        let cookie = cookie_of(&hvr);
        assert_eq!(cookies.judge(&hello(1, &cookie), peer), Verdict::Verified);
        let other: SocketAddr = "192.0.2.1:5001".parse().unwrap();
        assert_eq!(cookies.judge(&hello(1, &cookie), other), Verdict::BadCookie);
        assert_eq!(cookies.judge(&hello(0, &cookie), peer), Verdict::BadCookie);
        let mut forged = cookie.clone();
        forged[0] ^= 1;
        assert_eq!(cookies.judge(&hello(1, &forged), peer), Verdict::BadCookie);
        // Another agent's secret.
        let stranger = Cookies::new().unwrap();
        assert_eq!(stranger.judge(&hello(1, &cookie), peer), Verdict::BadCookie);
    }

    #[test]
    fn truncated_input_is_a_bad_cookie_not_a_panic() {
        let cookies = Cookies::new().unwrap();
        let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let full = hello(1, &[1; 20]);
        for n in 0..full.len() {
            let _ = cookies.judge(&full[..n], peer);
        }
    }
}
