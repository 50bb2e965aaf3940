// godoxy-agent patch: hands the record keys of an established connection to a caller that
// protects application data itself (its own record layer, without this crate's tasks).

use std::io::BufWriter;
use std::sync::atomic::Ordering;

use super::DTLSConn;
use crate::cipher_suite::{CipherSuiteHash, CipherSuiteId};
use crate::error::{Error, Result};
use crate::prf::prf_encryption_keys;

/// The AES-128-GCM keys and write IVs of both directions, and where this side's record
/// numbering stands.
pub struct RecordKeys {
    /// This side's write key (16 bytes).
    pub local_key: Vec<u8>,
    /// This side's implicit nonce part (4 bytes).
    pub local_iv: Vec<u8>,
    /// The peer's write key.
    pub remote_key: Vec<u8>,
    /// The peer's implicit nonce part.
    pub remote_iv: Vec<u8>,
    /// The epoch both sides protect records with.
    pub epoch: u16,
    /// The next sequence number this side may use in that epoch.
    pub next_sequence: u64,
}

impl DTLSConn {
    /// The record keys, once the handshake has completed with an AES-128-GCM-SHA256 suite.
    /// The caller takes over record protection: it must not use `read`/`write` afterwards.
    pub async fn record_keys(&self) -> Result<RecordKeys> {
        if !self.is_handshake_completed_successfully() {
            return Err(Error::ErrHandshakeInProgress);
        }
        let id = match &*self.state.cipher_suite.lock().await {
            Some(suite) => suite.id(),
            None => return Err(Error::ErrCipherSuiteUnset),
        };
        if !matches!(
            id,
            CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Gcm_Sha256
                | CipherSuiteId::Tls_Ecdhe_Rsa_With_Aes_128_Gcm_Sha256
        ) {
            return Err(Error::ErrInvalidCipherSuite);
        }
        let mut local_random = vec![];
        self.state
            .local_random
            .marshal(&mut BufWriter::<&mut Vec<u8>>::new(local_random.as_mut()))?;
        let mut remote_random = vec![];
        self.state
            .remote_random
            .marshal(&mut BufWriter::<&mut Vec<u8>>::new(remote_random.as_mut()))?;
        let (client_random, server_random) = if self.state.is_client {
            (&local_random, &remote_random)
        } else {
            (&remote_random, &local_random)
        };
        let keys = prf_encryption_keys(
            &self.state.master_secret,
            client_random,
            server_random,
            0,
            16,
            4,
            CipherSuiteHash::Sha256,
        )?;
        let epoch = self.state.local_epoch.load(Ordering::SeqCst);
        let next_sequence = self
            .state
            .local_sequence_number
            .lock()
            .await
            .get(usize::from(epoch))
            .copied()
            .unwrap_or(0);
        let (local_key, local_iv, remote_key, remote_iv) = if self.state.is_client {
            (
                keys.client_write_key,
                keys.client_write_iv,
                keys.server_write_key,
                keys.server_write_iv,
            )
        } else {
            (
                keys.server_write_key,
                keys.server_write_iv,
                keys.client_write_key,
                keys.client_write_iv,
            )
        };
        Ok(RecordKeys {
            local_key,
            local_iv,
            remote_key,
            remote_iv,
            epoch,
            next_sequence,
        })
    }
}
