//! The record layer of an established DTLS 1.2 session, run by the task that owns the
//! session. webrtc-dtls does the handshake; then it hands over the keys
//! (`DTLSConn::record_keys`, our patch) and is dropped, with its three tasks, its channels and
//! its buffers. Each datagram is then opened or sealed in place with ring's AES-128-GCM,
//! with no task handoff and no copy (RFC 6347 §4.1, RFC 5288 for the nonce and the
//! additional data).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use webrtc_dtls::conn::RecordKeys;
use webrtc_util::replay_detector::{ReplayDetector, SlidingWindowDetector};

use crate::protocol::DTLS_READ_BUF;

/// Record header: type, version, epoch, sequence number, length.
pub(crate) const HEADER: usize = 13;
/// The explicit part of the GCM nonce, carried in each record.
const EXPLICIT_NONCE: usize = 8;
const TAG: usize = 16;
/// Where a record's payload starts.
pub(crate) const PAYLOAD_AT: usize = HEADER + EXPLICIT_NONCE;
/// Bytes a record adds to its payload.
pub(crate) const OVERHEAD: usize = PAYLOAD_AT + TAG;
/// Sequence numbers are 48 bits.
const MAX_SEQUENCE: u64 = (1 << 48) - 1;
/// RFC 6347 §4.1.2.6's default.
const REPLAY_WINDOW: usize = 64;
/// DTLS 1.2.
const VERSION: [u8; 2] = [0xfe, 0xfd];

/// Content types (RFC 5246 §6.2.1).
pub(crate) mod content {
    /// ChangeCipherSpec.
    pub(crate) const CHANGE_CIPHER_SPEC: u8 = 20;
    /// Alert.
    pub(crate) const ALERT: u8 = 21;
    /// Handshake.
    pub(crate) const HANDSHAKE: u8 = 22;
    /// Application data.
    pub(crate) const APPLICATION_DATA: u8 = 23;
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch buffer: room for a record header and nonce, the
/// largest datagram read ([`DTLS_READ_BUF`]) at [`PAYLOAD_AT`], and a tag. `f` cannot await,
/// so no task holds the buffer while it waits.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with_borrow_mut(|buf| {
        if buf.is_empty() {
            buf.resize(DTLS_READ_BUF + OVERHEAD, 0);
        }
        f(buf)
    })
}

/// Why a record was not opened or sealed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum RecordError {
    /// Keys of the wrong length (not AES-128-GCM).
    #[error("the negotiated keys are not AES-128-GCM keys")]
    Keys,
    /// Shorter than a header, a nonce and a tag, or than its length field says.
    #[error("truncated record")]
    Truncated,
    /// Not of the session's epoch (a handshake record from before the keys changed).
    #[error("record of epoch {0}")]
    Epoch(u16),
    /// A sequence number seen before, or too old for the window.
    #[error("replayed record")]
    Replay,
    /// The tag did not verify.
    #[error("record failed authentication")]
    Auth,
    /// 2^48 records sent: the session must end.
    #[error("record sequence numbers exhausted")]
    Exhausted,
}

/// The epoch and sequence number as they appear in a record and in its additional data.
fn sequence_field(epoch: u16, sequence: u64) -> [u8; 8] {
    (u64::from(epoch) << 48 | sequence).to_be_bytes()
}

fn nonce(iv: &[u8; 4], explicit: &[u8]) -> Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(iv);
    n[4..].copy_from_slice(explicit);
    Nonce::assume_unique_for_key(n)
}

fn additional_data(sequence: &[u8], content: u8, version: [u8; 2], len: usize) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(sequence);
    aad[8] = content;
    aad[9..11].copy_from_slice(&version);
    // A record's plaintext is far below 64 KiB (the caller's buffers bound it).
    aad[11..].copy_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
    aad
}

fn key(bytes: &[u8]) -> Result<LessSafeKey, RecordError> {
    UnboundKey::new(&AES_128_GCM, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| RecordError::Keys)
}

fn iv(bytes: &[u8]) -> Result<[u8; 4], RecordError> {
    bytes.try_into().map_err(|_| RecordError::Keys)
}

/// This side's direction. `seal_in_place` takes `&self`: a client may send from several
/// tasks at once.
pub(crate) struct Sealer {
    key: LessSafeKey,
    iv: [u8; 4],
    epoch: u16,
    next: AtomicU64,
}

/// The peer's direction, with its replay window.
pub(crate) struct Opener {
    key: LessSafeKey,
    iv: [u8; 4],
    epoch: u16,
    replay: SlidingWindowDetector,
}

/// Both directions of a session, from webrtc-dtls's keys.
pub(crate) fn split(keys: &RecordKeys) -> Result<(Sealer, Opener), RecordError> {
    let sealer = Sealer {
        key: key(&keys.local_key)?,
        iv: iv(&keys.local_iv)?,
        epoch: keys.epoch,
        next: AtomicU64::new(keys.next_sequence),
    };
    let opener = Opener {
        key: key(&keys.remote_key)?,
        iv: iv(&keys.remote_iv)?,
        epoch: keys.epoch,
        replay: SlidingWindowDetector::new(REPLAY_WINDOW, MAX_SEQUENCE),
    };
    Ok((sealer, opener))
}

impl Sealer {
    /// Makes `buf[..len + OVERHEAD]` one record of type `content` around the `len` payload
    /// bytes already at `buf[PAYLOAD_AT..]`; returns the record's length. `buf` must hold
    /// `len + OVERHEAD` bytes.
    pub(crate) fn seal_in_place(
        &self,
        content: u8,
        buf: &mut [u8],
        len: usize,
    ) -> Result<usize, RecordError> {
        let total = len + OVERHEAD;
        if buf.len() < total {
            return Err(RecordError::Truncated);
        }
        let sequence = self.next.fetch_add(1, Ordering::Relaxed);
        if sequence > MAX_SEQUENCE {
            return Err(RecordError::Exhausted);
        }
        let field = sequence_field(self.epoch, sequence);
        let length =
            u16::try_from(EXPLICIT_NONCE + len + TAG).map_err(|_| RecordError::Truncated)?;
        buf[0] = content;
        buf[1..3].copy_from_slice(&VERSION);
        buf[3..11].copy_from_slice(&field);
        buf[11..13].copy_from_slice(&length.to_be_bytes());
        // The explicit nonce is the record's own epoch and sequence number: unique per key.
        buf[HEADER..PAYLOAD_AT].copy_from_slice(&field);
        let aad = additional_data(&field, content, VERSION, len);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                nonce(&self.iv, &field),
                Aad::from(aad),
                &mut buf[PAYLOAD_AT..PAYLOAD_AT + len],
            )
            .map_err(|_| RecordError::Keys)?;
        buf[PAYLOAD_AT + len..total].copy_from_slice(tag.as_ref());
        Ok(total)
    }

    /// One record of type `content` carrying `payload`, in a new buffer.
    pub(crate) fn seal(&self, content: u8, payload: &[u8]) -> Result<Vec<u8>, RecordError> {
        let mut buf = vec![0u8; payload.len() + OVERHEAD];
        buf[PAYLOAD_AT..PAYLOAD_AT + payload.len()].copy_from_slice(payload);
        self.seal_in_place(content, &mut buf, payload.len())?;
        Ok(buf)
    }
}

impl Opener {
    /// Opens one record (`record` is exactly one record, header included) in place: its
    /// content type and plaintext.
    pub(crate) fn open<'a>(&mut self, record: &'a mut [u8]) -> Result<(u8, &'a [u8]), RecordError> {
        if record.len() < OVERHEAD {
            return Err(RecordError::Truncated);
        }
        let content = record[0];
        let version = [record[1], record[2]];
        let epoch = u16::from_be_bytes([record[3], record[4]]);
        if epoch != self.epoch {
            return Err(RecordError::Epoch(epoch));
        }
        let mut field = [0u8; 8];
        field.copy_from_slice(&record[3..11]);
        let sequence = u64::from_be_bytes(field) & MAX_SEQUENCE;
        if !self.replay.check(sequence) {
            return Err(RecordError::Replay);
        }
        let len = record.len() - OVERHEAD;
        let aad = additional_data(&field, content, version, len);
        let (head, sealed) = record.split_at_mut(PAYLOAD_AT);
        let plaintext = self
            .key
            .open_in_place(nonce(&self.iv, &head[HEADER..]), Aad::from(aad), sealed)
            .map_err(|_| RecordError::Auth)?;
        self.replay.accept();
        Ok((content, plaintext))
    }
}

/// The records of one datagram, each as a mutable slice; a trailing fragment too short for
/// its length field ends the iteration (and is ignored, as a receiver must).
pub(crate) fn records(datagram: &mut [u8]) -> Records<'_> {
    Records { rest: datagram }
}

/// See [`records`].
pub(crate) struct Records<'a> {
    rest: &'a mut [u8],
}

impl<'a> Iterator for Records<'a> {
    type Item = &'a mut [u8];

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.len() < HEADER {
            return None;
        }
        let len = HEADER + usize::from(u16::from_be_bytes([self.rest[11], self.rest[12]]));
        if self.rest.len() < len {
            self.rest = &mut [];
            return None;
        }
        let (record, rest) = std::mem::take(&mut self.rest).split_at_mut(len);
        self.rest = rest;
        Some(record)
    }
}

/// Whether a datagram that passed the pre-authentication check carries protected records for
/// the session's own record layer (application data, or an alert after the keys changed)
/// rather than handshake records for webrtc-dtls.
pub(crate) fn is_protected(datagram: &[u8]) -> bool {
    match datagram {
        [content::APPLICATION_DATA, ..] => true,
        [content::ALERT, _, _, e0, e1, ..] => [*e0, *e1] != [0, 0],
        _ => false,
    }
}

/// Keys of a session whose two directions share one fixed key, epoch 1 (tests and fuzzing):
/// what one side seals, the other opens.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn fixed_keys(next_sequence: u64) -> RecordKeys {
    RecordKeys {
        local_key: vec![0x42; 16],
        local_iv: vec![1, 2, 3, 4],
        remote_key: vec![0x42; 16],
        remote_iv: vec![1, 2, 3, 4],
        epoch: 1,
        next_sequence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Sealer, Opener) {
        let keys = fixed_keys(5);
        let (sealer, _) = split(&keys).unwrap();
        let (_, opener) = split(&keys).unwrap();
        (sealer, opener)
    }

    #[test]
    fn sealed_records_open_once_and_in_any_order() {
        let (sealer, mut opener) = pair();
        let mut first = sealer.seal(content::APPLICATION_DATA, b"hello").unwrap();
        let mut second = sealer.seal(content::APPLICATION_DATA, b"world").unwrap();
        let mut replay = second.clone();
        assert_eq!(&second[3..11], &[0, 1, 0, 0, 0, 0, 0, 6]);
        assert_eq!(opener.open(&mut second).unwrap(), (23, &b"world"[..]));
        assert_eq!(opener.open(&mut first).unwrap(), (23, &b"hello"[..]));
        assert_eq!(opener.open(&mut replay), Err(RecordError::Replay));
    }

    #[test]
    fn a_changed_bit_fails_authentication() {
        let (sealer, mut opener) = pair();
        let mut record = sealer.seal(content::APPLICATION_DATA, b"hello").unwrap();
        record[PAYLOAD_AT] ^= 1;
        assert_eq!(opener.open(&mut record), Err(RecordError::Auth));
        let mut header = sealer.seal(content::APPLICATION_DATA, b"hello").unwrap();
        header[0] = content::ALERT; // the type is authenticated too
        assert_eq!(opener.open(&mut header), Err(RecordError::Auth));
        let mut short = [23u8, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 9, 0, 3, 1, 2, 3];
        assert_eq!(opener.open(&mut short), Err(RecordError::Truncated));
    }

    #[test]
    fn records_split_a_datagram_and_stop_at_a_short_tail() {
        let (sealer, mut opener) = pair();
        let mut datagram = sealer.seal(content::APPLICATION_DATA, b"a").unwrap();
        datagram.extend(sealer.seal(content::ALERT, &[1, 0]).unwrap());
        datagram.extend([23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 0, 200, 0]);
        let opened: Vec<(u8, Vec<u8>)> = records(&mut datagram)
            .map(|r| opener.open(r).map(|(c, p)| (c, p.to_vec())).unwrap())
            .collect();
        assert_eq!(opened, vec![(23, b"a".to_vec()), (21, vec![1, 0])]);
        assert!(is_protected(&datagram));
        assert!(is_protected(&[21, 0xfe, 0xfd, 0, 1]));
        assert!(!is_protected(&[21, 0xfe, 0xfd, 0, 0]));
        assert!(!is_protected(&[22, 0xfe, 0xfd, 0, 1]));
    }
}
