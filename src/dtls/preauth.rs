//! The pre-authentication check: every datagram a peer sends before its DTLS handshake has
//! completed passes here, bounds-checked and without allocating, before webrtc-dtls parses it.
//!
//! webrtc-dtls 0.12 indexes past the end of short input in its handshake parsers (the
//! extension loop of `ClientHello`, `ClientKeyExchange`) and reassembles fragments
//! recursively. This check admits only what a DTLS 1.2 client legitimately sends before it is
//! authenticated, in a shape those parsers read without going out of bounds:
//!
//! - records: a 13-byte header, content type handshake, change_cipher_spec or alert in epoch
//!   0 (plus application data in epoch 1), DTLS 1.0 or 1.2 version bytes, epoch 0 or 1, a
//!   non-zero length within the datagram; the datagram at most webrtc-dtls's 8192-byte read;
//! - epoch 0 handshake records: whole messages only (`fragment_offset` 0 and
//!   `fragment_length == length`), exactly filling the record, of the four types a client
//!   sends before the server has verified it: ClientHello (every field, the extension block
//!   and the bodies of the extensions webrtc-dtls parses), Certificate, ClientKeyExchange and
//!   CertificateVerify, each exactly as long as its own length fields say;
//! - change_cipher_spec exactly `[1]`, alert exactly 2 bytes;
//! - epoch 1 records are ciphertext (AES-128-GCM, the one suite): length bounds only, and a
//!   handshake record there is the Finished message, whose size is fixed (an alert may also
//!   be the two plaintext bytes webrtc-dtls and pion send when their handshake fails).
//!
//! Refusing fragmented handshake messages is safe for GoDoxy: its pion client, the agent's own
//! webrtc-dtls client and `openssl s_client` send each of these messages whole (they fragment
//! only above their path MTU, 1200 bytes for pion and webrtc-dtls, and a GoDoxy ClientHello,
//! P-256 client certificate, key exchange or signature is a few hundred bytes). A client
//! certificate chain that does not fit one datagram is refused; tests/it/dtls.rs shows all
//! three clients completing handshakes through this check.

/// webrtc-dtls reads each datagram into a buffer of this size and cuts the rest off
/// (`INBOUND_BUFFER_SIZE`): a longer datagram is never a whole handshake flight.
pub(crate) const MAX_PREAUTH_DATAGRAM: usize = 8192;

const RECORD_HEADER: usize = 13;
const HANDSHAKE_HEADER: usize = 12;

const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;

const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const HANDSHAKE_CERTIFICATE: u8 = 11;
const HANDSHAKE_CERTIFICATE_VERIFY: u8 = 15;
const HANDSHAKE_CLIENT_KEY_EXCHANGE: u8 = 16;

/// DTLS 1.0 and 1.2 on the wire (254.255 and 254.253); webrtc-dtls accepts only these.
const DTLS_1_0: [u8; 2] = [254, 255];
const DTLS_1_2: [u8; 2] = [254, 253];

/// AES-128-GCM's per-record overhead in DTLS 1.2: an 8-byte explicit nonce and a 16-byte tag.
/// The agent offers only that suite (`protocol::DTLS_CIPHER_SUITE`).
const GCM_OVERHEAD: usize = 8 + 16;
/// An encrypted Finished: its handshake header and 12 bytes of verify_data, sealed.
const FINISHED_CIPHERTEXT: usize = GCM_OVERHEAD + HANDSHAKE_HEADER + 12;
/// An encrypted alert: two bytes, sealed.
const ALERT_CIPHERTEXT: usize = GCM_OVERHEAD + 2;

/// The extensions webrtc-dtls parses (its `ExtensionValue`); others it skips by length.
const EXT_SERVER_NAME: u16 = 0;
const EXT_SUPPORTED_GROUPS: u16 = 10;
const EXT_EC_POINT_FORMATS: u16 = 11;
const EXT_SIGNATURE_ALGORITHMS: u16 = 13;
const EXT_USE_SRTP: u16 = 14;
const EXT_EXTENDED_MASTER_SECRET: u16 = 23;
const EXT_RENEGOTIATION_INFO: u16 = 65281;

/// Why a datagram was dropped before authentication. `name` is the short form counted and
/// logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
pub(crate) enum Refusal {
    /// Longer than webrtc-dtls reads at once.
    #[error("datagram larger than 8192 bytes")]
    Oversize,
    /// A record header cut short, or a record longer than what is left of the datagram.
    #[error("record truncated")]
    RecordTruncated,
    /// A record with no content (webrtc-dtls drops the whole datagram).
    #[error("empty record")]
    RecordEmpty,
    /// Version bytes other than DTLS 1.0 or 1.2.
    #[error("record version is not DTLS 1.0 or 1.2")]
    Version,
    /// An epoch above 1: no such epoch exists before the handshake ends.
    #[error("record epoch above 1")]
    Epoch,
    /// A content type the epoch does not carry before authentication.
    #[error("content type not expected before authentication")]
    ContentType,
    /// An epoch 1 (encrypted) record of a length its content cannot have.
    #[error("ciphertext record of impossible length")]
    CiphertextLength,
    /// More encrypted records before the handshake ended than any client sends.
    #[error("too many ciphertext records before the handshake ended")]
    CiphertextFlood,
    /// A handshake message header or body past the end of its record, or bytes left over.
    #[error("handshake message does not fill its record exactly")]
    HandshakeLength,
    /// A handshake message in fragments.
    #[error("fragmented handshake message")]
    Fragmented,
    /// A handshake message type a client does not send before it is authenticated.
    #[error("handshake message type not expected from a client")]
    HandshakeType,
    /// A ClientHello field out of bounds, or a non-empty session id.
    #[error("malformed ClientHello")]
    ClientHello,
    /// The ClientHello's extension block: a header or length out of bounds, or a sum that is
    /// not the block's length.
    #[error("malformed ClientHello extension block")]
    Extensions,
    /// A parsed extension whose body disagrees with its own lengths.
    #[error("malformed ClientHello extension body")]
    ExtensionBody,
    /// A Certificate message whose lengths do not add up.
    #[error("malformed Certificate")]
    Certificate,
    /// A ClientKeyExchange that is not one length-prefixed public key.
    #[error("malformed ClientKeyExchange")]
    ClientKeyExchange,
    /// A CertificateVerify whose signature length is not the rest of the message.
    #[error("malformed CertificateVerify")]
    CertificateVerify,
    /// A change_cipher_spec record that is not exactly `[1]`.
    #[error("malformed change_cipher_spec")]
    ChangeCipherSpec,
    /// An alert record that is not exactly two bytes.
    #[error("malformed alert")]
    Alert,
    /// A ClientHello returning a cookie this agent did not make for that address lately.
    #[error("ClientHello with a cookie not made for it")]
    Cookie,
}

impl Refusal {
    /// Every reason, in `name` order of declaration (for counting by index).
    pub(crate) const ALL: [Refusal; 20] = [
        Self::Oversize,
        Self::RecordTruncated,
        Self::RecordEmpty,
        Self::Version,
        Self::Epoch,
        Self::ContentType,
        Self::CiphertextLength,
        Self::CiphertextFlood,
        Self::HandshakeLength,
        Self::Fragmented,
        Self::HandshakeType,
        Self::ClientHello,
        Self::Extensions,
        Self::ExtensionBody,
        Self::Certificate,
        Self::ClientKeyExchange,
        Self::CertificateVerify,
        Self::ChangeCipherSpec,
        Self::Alert,
        Self::Cookie,
    ];

    /// Short name, for counts and log fields.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Oversize => "oversize",
            Self::RecordTruncated => "record_truncated",
            Self::RecordEmpty => "record_empty",
            Self::Version => "version",
            Self::Epoch => "epoch",
            Self::ContentType => "content_type",
            Self::CiphertextLength => "ciphertext_length",
            Self::CiphertextFlood => "ciphertext_flood",
            Self::HandshakeLength => "handshake_length",
            Self::Fragmented => "fragmented",
            Self::HandshakeType => "handshake_type",
            Self::ClientHello => "client_hello",
            Self::Extensions => "extensions",
            Self::ExtensionBody => "extension_body",
            Self::Certificate => "certificate",
            Self::ClientKeyExchange => "client_key_exchange",
            Self::CertificateVerify => "certificate_verify",
            Self::ChangeCipherSpec => "change_cipher_spec",
            Self::Alert => "alert",
            Self::Cookie => "cookie",
        }
    }

    /// Position in [`Refusal::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// What a datagram that passed holds, as far as the demultiplexer cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admitted {
    /// Its first record is an epoch 0 handshake record whose first message is a ClientHello:
    /// the only thing that may open a session for an unknown peer.
    pub(crate) client_hello: bool,
    /// Epoch 1 (encrypted) records in it.
    pub(crate) ciphertext_records: usize,
}

/// Checks one datagram from a peer whose handshake has not completed.
pub(crate) fn check(datagram: &[u8]) -> Result<Admitted, Refusal> {
    if datagram.len() > MAX_PREAUTH_DATAGRAM {
        return Err(Refusal::Oversize);
    }
    let mut admitted = Admitted {
        client_hello: false,
        ciphertext_records: 0,
    };
    let mut rest = datagram;
    let mut first = true;
    // An empty datagram is no record at all: webrtc-dtls reads nothing from it, and it opens
    // nothing; refuse it as truncated so it is counted like other junk.
    if rest.is_empty() {
        return Err(Refusal::RecordTruncated);
    }
    while !rest.is_empty() {
        let (header, after) = split(rest, RECORD_HEADER).ok_or(Refusal::RecordTruncated)?;
        let content_type = header[0];
        let version = [header[1], header[2]];
        let epoch = u16::from_be_bytes([header[3], header[4]]);
        let length = usize::from(u16::from_be_bytes([header[11], header[12]]));
        if version != DTLS_1_0 && version != DTLS_1_2 {
            return Err(Refusal::Version);
        }
        if length == 0 {
            return Err(Refusal::RecordEmpty);
        }
        let (fragment, after) = split(after, length).ok_or(Refusal::RecordTruncated)?;
        match epoch {
            0 => {
                let hello = check_plaintext(content_type, fragment)?;
                if first {
                    admitted.client_hello = hello;
                }
            }
            1 => {
                check_ciphertext(content_type, fragment.len())?;
                admitted.ciphertext_records += 1;
            }
            _ => return Err(Refusal::Epoch),
        }
        first = false;
        rest = after;
    }
    Ok(admitted)
}

/// An epoch 0 record's content. Returns whether its first message is a ClientHello.
fn check_plaintext(content_type: u8, fragment: &[u8]) -> Result<bool, Refusal> {
    match content_type {
        CONTENT_HANDSHAKE => check_handshake_record(fragment),
        CONTENT_CHANGE_CIPHER_SPEC if fragment == [1] => Ok(false),
        CONTENT_CHANGE_CIPHER_SPEC => Err(Refusal::ChangeCipherSpec),
        CONTENT_ALERT if fragment.len() == 2 => Ok(false),
        CONTENT_ALERT => Err(Refusal::Alert),
        _ => Err(Refusal::ContentType),
    }
}

/// An epoch 1 record: only its length says anything before decryption.
fn check_ciphertext(content_type: u8, length: usize) -> Result<(), Refusal> {
    let fits = match content_type {
        CONTENT_HANDSHAKE => length == FINISHED_CIPHERTEXT,
        // webrtc-dtls and pion send an alert unencrypted, in the epoch they are in, when the
        // handshake fails after their ChangeCipherSpec.
        CONTENT_ALERT => length == ALERT_CIPHERTEXT || length == 2,
        CONTENT_APPLICATION_DATA => length >= GCM_OVERHEAD,
        _ => return Err(Refusal::ContentType),
    };
    if fits {
        Ok(())
    } else {
        Err(Refusal::CiphertextLength)
    }
}

/// The messages of an epoch 0 handshake record: each whole, together exactly the record.
fn check_handshake_record(mut rest: &[u8]) -> Result<bool, Refusal> {
    let mut first_is_hello = None;
    while !rest.is_empty() {
        let (header, after) = split(rest, HANDSHAKE_HEADER).ok_or(Refusal::HandshakeLength)?;
        let msg_type = header[0];
        let length = u24(&header[1..4]);
        let fragment_offset = u24(&header[6..9]);
        let fragment_length = u24(&header[9..12]);
        if fragment_offset != 0 || fragment_length != length {
            return Err(Refusal::Fragmented);
        }
        let (body, after) = split(after, length).ok_or(Refusal::HandshakeLength)?;
        match msg_type {
            HANDSHAKE_CLIENT_HELLO => check_client_hello(body)?,
            HANDSHAKE_CERTIFICATE => check_certificate(body)?,
            HANDSHAKE_CLIENT_KEY_EXCHANGE => check_client_key_exchange(body)?,
            HANDSHAKE_CERTIFICATE_VERIFY => check_certificate_verify(body)?,
            _ => return Err(Refusal::HandshakeType),
        }
        first_is_hello.get_or_insert(msg_type == HANDSHAKE_CLIENT_HELLO);
        rest = after;
    }
    Ok(first_is_hello.unwrap_or(false))
}

/// A ClientHello body, read in the order webrtc-dtls reads it, and to its last byte.
fn check_client_hello(body: &[u8]) -> Result<(), Refusal> {
    let bad = Refusal::ClientHello;
    // client_version and random.
    let (_, rest) = split(body, 2 + 32).ok_or(bad)?;
    // webrtc-dtls reads the session id's length byte and then not the session id: only an
    // empty one (what a client sends without resumption, which DTLS here never has) is read
    // the same way by both.
    let (session_id_len, rest) = take_u8(rest).ok_or(bad)?;
    if session_id_len != 0 {
        return Err(bad);
    }
    let (cookie_len, rest) = take_u8(rest).ok_or(bad)?;
    let (_, rest) = split(rest, usize::from(cookie_len)).ok_or(bad)?;
    // Cipher suites: webrtc-dtls reads len/2 of them, so the length must be even.
    let (suites_len, rest) = take_u16(rest).ok_or(bad)?;
    if suites_len == 0 || suites_len % 2 != 0 {
        return Err(bad);
    }
    let (_, rest) = split(rest, usize::from(suites_len)).ok_or(bad)?;
    let (methods, rest) = take_u8(rest).ok_or(bad)?;
    if methods == 0 {
        return Err(bad);
    }
    let (_, rest) = split(rest, usize::from(methods)).ok_or(bad)?;
    // The extension block: required (Extended Master Secret is), and the message's end.
    let (block_len, rest) = take_u16(rest).ok_or(Refusal::Extensions)?;
    if usize::from(block_len) != rest.len() {
        return Err(Refusal::Extensions);
    }
    check_extensions(rest)
}

/// The extension block: every header and body in bounds and the lengths summing to exactly
/// the block, so webrtc-dtls's loop (which indexes `offset + 2` and `offset + 3` of whatever
/// is left) never runs past it.
fn check_extensions(mut block: &[u8]) -> Result<(), Refusal> {
    while !block.is_empty() {
        let (ext_type, rest) = take_u16(block).ok_or(Refusal::Extensions)?;
        let (ext_len, rest) = take_u16(rest).ok_or(Refusal::Extensions)?;
        let (body, rest) = split(rest, usize::from(ext_len)).ok_or(Refusal::Extensions)?;
        if !extension_body_consistent(ext_type, body) {
            return Err(Refusal::ExtensionBody);
        }
        block = rest;
    }
    Ok(())
}

/// The bodies webrtc-dtls parses (from the extension's start, past its own length if that
/// lies) agree with their own lengths; the others are skipped by length and may hold
/// anything.
fn extension_body_consistent(ext_type: u16, body: &[u8]) -> bool {
    match ext_type {
        // server_name: a list of one host_name entry (webrtc-dtls reads only the first).
        EXT_SERVER_NAME => (|| {
            let (list_len, rest) = take_u16(body)?;
            let (name_type, rest) = take_u8(rest)?;
            let (name_len, rest) = take_u16(rest)?;
            (usize::from(list_len) == 3 + usize::from(name_len)
                && name_type == 0
                && rest.len() == usize::from(name_len))
            .then_some(())
        })()
        .is_some(),
        // supported_groups and signature_algorithms: a u16-length list of two-byte entries.
        EXT_SUPPORTED_GROUPS | EXT_SIGNATURE_ALGORITHMS => {
            take_u16(body).is_some_and(|(len, rest)| len % 2 == 0 && usize::from(len) == rest.len())
        }
        // ec_point_formats: a u8-length list of one-byte entries.
        EXT_EC_POINT_FORMATS => {
            take_u8(body).is_some_and(|(len, rest)| usize::from(len) == rest.len())
        }
        // use_srtp: a u16-length list of two-byte profiles, then the MKI (u8 length).
        EXT_USE_SRTP => (|| {
            let (len, rest) = take_u16(body)?;
            if len % 2 != 0 {
                return None;
            }
            let (_, rest) = split(rest, usize::from(len))?;
            let (mki_len, rest) = take_u8(rest)?;
            (usize::from(mki_len) == rest.len()).then_some(())
        })()
        .is_some(),
        EXT_EXTENDED_MASTER_SECRET => body.is_empty(),
        // renegotiation_info on a first handshake: an empty renegotiated_connection.
        EXT_RENEGOTIATION_INFO => body == [0],
        _ => true,
    }
}

/// Certificate: a u24-length list of u24-length certificates, exactly.
fn check_certificate(body: &[u8]) -> Result<(), Refusal> {
    let bad = Refusal::Certificate;
    let (list, rest) = split(body, 3).ok_or(bad)?;
    if u24(list) != rest.len() {
        return Err(bad);
    }
    let mut rest = rest;
    while !rest.is_empty() {
        let (len, after) = split(rest, 3).ok_or(bad)?;
        let (_, after) = split(after, u24(len)).ok_or(bad)?;
        rest = after;
    }
    Ok(())
}

/// ClientKeyExchange for ECDHE: one u8-length public key, exactly (webrtc-dtls reads the first
/// two bytes unconditionally).
fn check_client_key_exchange(body: &[u8]) -> Result<(), Refusal> {
    match body.split_first() {
        Some((&len, key)) if len != 0 && usize::from(len) == key.len() => Ok(()),
        _ => Err(Refusal::ClientKeyExchange),
    }
}

/// CertificateVerify: hash, signature algorithm, a u16-length signature, exactly.
fn check_certificate_verify(body: &[u8]) -> Result<(), Refusal> {
    let bad = Refusal::CertificateVerify;
    let (_, rest) = split(body, 2).ok_or(bad)?;
    let (len, rest) = take_u16(rest).ok_or(bad)?;
    if usize::from(len) == rest.len() {
        Ok(())
    } else {
        Err(bad)
    }
}

fn split(bytes: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
    (n <= bytes.len()).then(|| bytes.split_at(n))
}

fn take_u8(bytes: &[u8]) -> Option<(u8, &[u8])> {
    bytes.split_first().map(|(&b, rest)| (b, rest))
}

fn take_u16(bytes: &[u8]) -> Option<(u16, &[u8])> {
    let (head, rest) = split(bytes, 2)?;
    Some((u16::from_be_bytes([head[0], head[1]]), rest))
}

/// A 3-byte big-endian integer; callers pass exactly three bytes.
fn u24(b: &[u8]) -> usize {
    b.iter().fold(0, |n, &byte| (n << 8) | usize::from(byte))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of `content_type` in `epoch` holding `fragment`.
    fn record(content_type: u8, epoch: u16, fragment: &[u8]) -> Vec<u8> {
        let mut out = vec![content_type, 254, 253];
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 7]);
        out.extend_from_slice(&u16::try_from(fragment.len()).unwrap().to_be_bytes());
        out.extend_from_slice(fragment);
        out
    }

    /// A whole handshake message.
    fn message(msg_type: u8, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut out = vec![msg_type, len[1], len[2], len[3], 0, 0, 0, 0, 0];
        out.extend_from_slice(&len[1..]);
        out.extend_from_slice(body);
        out
    }

    fn ext(ext_type: u16, body: &[u8]) -> Vec<u8> {
        let mut out = ext_type.to_be_bytes().to_vec();
        out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// A ClientHello body like the agent's client sends, with `extensions` as its block.
    fn hello_body(cookie: &[u8], extensions: &[u8]) -> Vec<u8> {
        let mut out = vec![254, 253];
        out.extend_from_slice(&[7; 32]);
        out.push(0);
        out.push(u8::try_from(cookie.len()).unwrap());
        out.extend_from_slice(cookie);
        out.extend_from_slice(&[0, 2, 0xc0, 0x2b, 1, 0]);
        out.extend_from_slice(&u16::try_from(extensions.len()).unwrap().to_be_bytes());
        out.extend_from_slice(extensions);
        out
    }

    fn good_extensions() -> Vec<u8> {
        [
            ext(EXT_SUPPORTED_GROUPS, &[0, 4, 0, 0x1d, 0, 0x17]),
            ext(EXT_EC_POINT_FORMATS, &[1, 0]),
            ext(EXT_SIGNATURE_ALGORITHMS, &[0, 2, 4, 3]),
            ext(EXT_RENEGOTIATION_INFO, &[0]),
            ext(EXT_EXTENDED_MASTER_SECRET, &[]),
            ext(
                EXT_SERVER_NAME,
                &[
                    0, 15, 0, 0, 12, b'g', b'o', b'd', b'o', b'x', b'y', b'.', b'a', b'g', b'e',
                    b'n', b't',
                ],
            ),
            ext(EXT_USE_SRTP, &[0, 2, 0, 1, 0]),
            ext(35, &[]),
            ext(22, &[]),
        ]
        .concat()
    }

    fn hello(extensions: &[u8]) -> Vec<u8> {
        record(22, 0, &message(1, &hello_body(&[], extensions)))
    }

    #[test]
    fn a_well_formed_client_hello_opens() {
        let admitted = check(&hello(&good_extensions())).unwrap();
        assert!(admitted.client_hello);
        assert_eq!(admitted.ciphertext_records, 0);
        let with_cookie = record(
            22,
            0,
            &message(1, &hello_body(&[9; 20], &good_extensions())),
        );
        assert!(check(&with_cookie).unwrap().client_hello);
    }

    #[test]
    fn a_flight_five_passes_without_opening() {
        let cert = [vec![0, 0, 6, 0, 0, 3], vec![1, 2, 3]].concat();
        let mut cke = vec![65, 4];
        cke.extend_from_slice(&[1; 64]);
        let cv = [vec![4, 3, 0, 3], vec![1, 2, 3]].concat();
        let handshake = [message(11, &cert), message(16, &cke), message(15, &cv)].concat();
        let datagram = [
            record(22, 0, &handshake),
            record(20, 0, &[1]),
            record(22, 1, &[0; FINISHED_CIPHERTEXT]),
        ]
        .concat();
        let admitted = check(&datagram).unwrap();
        assert!(!admitted.client_hello);
        assert_eq!(admitted.ciphertext_records, 1);
        // An empty Certificate (a client without one) is well formed too.
        assert!(check(&record(22, 0, &message(11, &[0, 0, 0]))).is_ok());
    }

    #[test]
    fn records_are_bounded() {
        let good = hello(&good_extensions());
        for cut in [1, 5, 12, 13, 20, good.len() - 1] {
            assert_eq!(
                check(&good[..cut]),
                Err(Refusal::RecordTruncated),
                "cut at {cut}"
            );
        }
        assert_eq!(check(&[]), Err(Refusal::RecordTruncated));
        let mut long = good.clone();
        long.push(0);
        assert_eq!(check(&long), Err(Refusal::RecordTruncated));
        assert_eq!(check(&record(22, 0, &[])), Err(Refusal::RecordEmpty));
        let mut version = good.clone();
        version[2] = 0xfc;
        assert_eq!(check(&version), Err(Refusal::Version));
        assert_eq!(check(&record(22, 2, &[0; 48])), Err(Refusal::Epoch));
        assert_eq!(check(&record(23, 0, &[0; 30])), Err(Refusal::ContentType));
        assert_eq!(check(&record(24, 0, &[0; 30])), Err(Refusal::ContentType));
        assert_eq!(
            check(&vec![22; MAX_PREAUTH_DATAGRAM + 1]),
            Err(Refusal::Oversize)
        );
    }

    #[test]
    fn ciphertext_has_only_length_bounds() {
        assert!(check(&record(23, 1, &[0; GCM_OVERHEAD])).is_ok());
        assert!(check(&record(21, 1, &[0; ALERT_CIPHERTEXT])).is_ok());
        assert!(check(&record(21, 1, &[2, 42])).is_ok());
        assert_eq!(
            check(&record(23, 1, &[0; 23])),
            Err(Refusal::CiphertextLength)
        );
        assert_eq!(
            check(&record(22, 1, &[0; 49])),
            Err(Refusal::CiphertextLength)
        );
        assert_eq!(
            check(&record(21, 1, &[0; 27])),
            Err(Refusal::CiphertextLength)
        );
        assert_eq!(check(&record(20, 1, &[1])), Err(Refusal::ContentType));
    }

    #[test]
    fn change_cipher_spec_and_alert_are_exact() {
        assert!(check(&record(20, 0, &[1])).is_ok());
        assert_eq!(check(&record(20, 0, &[2])), Err(Refusal::ChangeCipherSpec));
        assert_eq!(
            check(&record(20, 0, &[1, 1])),
            Err(Refusal::ChangeCipherSpec)
        );
        assert!(check(&record(21, 0, &[2, 40])).is_ok());
        assert_eq!(check(&record(21, 0, &[2])), Err(Refusal::Alert));
        assert_eq!(check(&record(21, 0, &[2, 40, 0])), Err(Refusal::Alert));
    }

    #[test]
    fn handshake_messages_fill_their_record_whole() {
        let msg = message(1, &hello_body(&[], &good_extensions()));
        let mut trailing = msg.clone();
        trailing.push(0);
        assert_eq!(
            check(&record(22, 0, &trailing)),
            Err(Refusal::HandshakeLength)
        );
        assert_eq!(
            check(&record(22, 0, &msg[..msg.len() - 1])),
            Err(Refusal::HandshakeLength)
        );
        assert_eq!(
            check(&record(22, 0, &msg[..11])),
            Err(Refusal::HandshakeLength)
        );
        let mut offset = msg.clone();
        offset[8] = 1;
        assert_eq!(check(&record(22, 0, &offset)), Err(Refusal::Fragmented));
        let mut short = msg.clone();
        short[11] -= 1;
        assert_eq!(check(&record(22, 0, &short)), Err(Refusal::Fragmented));
        for msg_type in [0, 2, 3, 12, 13, 14, 20, 99] {
            assert_eq!(
                check(&record(22, 0, &message(msg_type, &[0; 4]))),
                Err(Refusal::HandshakeType),
                "type {msg_type}"
            );
        }
    }

    #[test]
    fn client_hello_fields_are_bounded() {
        let good = hello_body(&[], &good_extensions());
        // Every truncation of the body is refused, whatever field it cuts.
        for cut in 0..good.len() {
            let refused = check(&record(22, 0, &message(1, &good[..cut])));
            assert!(
                matches!(
                    refused,
                    Err(Refusal::ClientHello | Refusal::Extensions | Refusal::ExtensionBody)
                ),
                "cut at {cut}: {refused:?}"
            );
        }
        let mut session = good.clone();
        session[34] = 1;
        assert_eq!(
            check(&record(22, 0, &message(1, &session))),
            Err(Refusal::ClientHello)
        );
        let mut odd = good.clone();
        odd[37] = 3;
        assert_eq!(
            check(&record(22, 0, &message(1, &odd))),
            Err(Refusal::ClientHello)
        );
        // No extension block at all.
        let bare = &good[..good.len() - good_extensions().len() - 2];
        assert_eq!(
            check(&record(22, 0, &message(1, bare))),
            Err(Refusal::Extensions)
        );
    }

    #[test]
    fn extension_block_sums_exactly() {
        // The fuzzer's first find: a block ending in a partial extension header.
        for tail in [&[0u8][..], &[0, 0], &[0, 0, 0]] {
            let block = [good_extensions(), tail.to_vec()].concat();
            assert_eq!(
                check(&hello(&block)),
                Err(Refusal::Extensions),
                "tail {tail:?}"
            );
        }
        let mut over = ext(35, &[0; 4]);
        over[3] = 5;
        assert_eq!(check(&hello(&over)), Err(Refusal::Extensions));
    }

    #[test]
    fn parsed_extension_bodies_match_their_lengths() {
        for (ext_type, body) in [
            (EXT_SERVER_NAME, &[0, 4, 0, 0, 2, b'a'][..]),
            (EXT_SERVER_NAME, &[0, 4, 1, 0, 1, b'a']),
            (EXT_SERVER_NAME, &[0]),
            (EXT_SUPPORTED_GROUPS, &[0, 3, 0, 0x1d, 0]),
            (EXT_SUPPORTED_GROUPS, &[0, 4, 0, 0x1d]),
            (EXT_SIGNATURE_ALGORITHMS, &[0]),
            (EXT_EC_POINT_FORMATS, &[2, 0]),
            (EXT_EC_POINT_FORMATS, &[]),
            (EXT_USE_SRTP, &[0, 2, 0, 1]),
            (EXT_USE_SRTP, &[0, 2, 0, 1, 1]),
            (EXT_EXTENDED_MASTER_SECRET, &[0]),
            (EXT_RENEGOTIATION_INFO, &[]),
            (EXT_RENEGOTIATION_INFO, &[1, 0]),
        ] {
            assert_eq!(
                check(&hello(&ext(ext_type, body))),
                Err(Refusal::ExtensionBody),
                "extension {ext_type} body {body:?}"
            );
        }
        // Unknown extensions may hold anything.
        assert!(check(&hello(&ext(0xfafa, &[1, 2, 3]))).is_ok());
    }

    #[test]
    fn flight_five_messages_are_exact() {
        for (msg_type, body, reason) in [
            (16, &[][..], Refusal::ClientKeyExchange),
            (16, &[1], Refusal::ClientKeyExchange),
            (16, &[0], Refusal::ClientKeyExchange),
            (16, &[2, 1], Refusal::ClientKeyExchange),
            (11, &[0, 0], Refusal::Certificate),
            (11, &[0, 0, 5, 0, 0, 1, 9], Refusal::Certificate),
            (11, &[0, 0, 4, 0, 0, 2, 9], Refusal::Certificate),
            (11, &[0, 0, 2, 0, 0], Refusal::Certificate),
            (15, &[4, 3, 0], Refusal::CertificateVerify),
            (15, &[4, 3, 0, 2, 1], Refusal::CertificateVerify),
        ] {
            assert_eq!(
                check(&record(22, 0, &message(msg_type, body))),
                Err(reason),
                "type {msg_type} body {body:?}"
            );
        }
    }

    #[test]
    fn names_are_unique_and_indexed() {
        for (i, reason) in Refusal::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
        let names: std::collections::HashSet<_> = Refusal::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), Refusal::ALL.len());
    }
}
