//! Session-ticket keys as a key server hands them to the edges of a group (the payload
//! of the ticket-keys extension): every edge of the group encrypts and decrypts
//! tickets with the same keys, so any edge resumes a session another one made.
//!
//! Payload: the keys, newest first, each 64 bytes:
//! `id (8) ‖ not_before (u64 ms) ‖ encrypt_until (u64 ms) ‖ decrypt_until (u64 ms) ‖ key (32)`,
//! times in milliseconds since the Unix epoch, big-endian.

use std::time::{Duration, SystemTime};

use zeroize::Zeroizing;

/// Bytes of one key entry in the payload.
pub const TICKET_KEY_ENTRY_LEN: usize = 64;
/// Most keys in one payload.
pub const MAX_TICKET_KEYS: usize = 16;

/// One session-ticket key and when it may be used.
#[derive(Clone)]
pub struct TicketKey {
    /// Names the key in every ticket it sealed.
    pub id: [u8; 8],
    /// Not used to encrypt before this time.
    pub not_before: SystemTime,
    /// New tickets are sealed with it until this time.
    pub encrypt_until: SystemTime,
    /// Tickets sealed with it are accepted until this time; after it, the key is gone.
    pub decrypt_until: SystemTime,
    /// The AEAD key (ChaCha20-Poly1305); zeroized when dropped.
    pub secret: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("TicketKey")
            .field("id", &hex::encode(self.id))
            .field("encrypt_until", &self.encrypt_until)
            .field("decrypt_until", &self.decrypt_until)
            .finish_non_exhaustive()
    }
}

/// Why a ticket-keys payload cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketKeysError {
    /// The length is not a whole number of entries, or there are too many.
    #[error("ticket-keys payload of {0} bytes is not 1 to {MAX_TICKET_KEYS} entries of {TICKET_KEY_ENTRY_LEN} bytes")]
    Length(usize),
    /// An entry's times are out of order.
    #[error("ticket key {0}: times out of order")]
    Times(String),
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn at(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// Encodes `keys` as the extension's payload (kept in a zeroizing buffer).
pub fn encode_ticket_keys(keys: &[TicketKey]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(keys.len() * TICKET_KEY_ENTRY_LEN));
    for k in keys {
        out.extend_from_slice(&k.id);
        for t in [k.not_before, k.encrypt_until, k.decrypt_until] {
            out.extend_from_slice(&ms(t).to_be_bytes());
        }
        out.extend_from_slice(k.secret.as_ref());
    }
    out
}

/// Decodes the extension's payload.
pub fn decode_ticket_keys(payload: &[u8]) -> Result<Vec<TicketKey>, TicketKeysError> {
    if payload.is_empty()
        || payload.len() % TICKET_KEY_ENTRY_LEN != 0
        || payload.len() / TICKET_KEY_ENTRY_LEN > MAX_TICKET_KEYS
    {
        return Err(TicketKeysError::Length(payload.len()));
    }
    payload
        .chunks_exact(TICKET_KEY_ENTRY_LEN)
        .map(|e| {
            let mut id = [0u8; 8];
            id.copy_from_slice(&e[..8]);
            let time = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&e[8 + 8 * i..16 + 8 * i]);
                at(u64::from_be_bytes(b))
            };
            let mut secret = Zeroizing::new([0u8; 32]);
            secret.copy_from_slice(&e[32..]);
            let key = TicketKey {
                id,
                not_before: time(0),
                encrypt_until: time(1),
                decrypt_until: time(2),
                secret,
            };
            if key.not_before > key.encrypt_until || key.encrypt_until > key.decrypt_until {
                return Err(TicketKeysError::Times(hex::encode(id)));
            }
            Ok(key)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8, start_ms: u64) -> TicketKey {
        TicketKey {
            id: [n; 8],
            not_before: at(start_ms),
            encrypt_until: at(start_ms + 3_600_000),
            decrypt_until: at(start_ms + 3 * 3_600_000),
            secret: Zeroizing::new([n; 32]),
        }
    }

    #[test]
    fn payload_round_trips_and_hides_secrets() {
        let keys = vec![key(2, 1_700_003_600_000), key(1, 1_700_000_000_000)];
        let payload = encode_ticket_keys(&keys);
        assert_eq!(payload.len(), 2 * TICKET_KEY_ENTRY_LEN);
        let back = decode_ticket_keys(&payload).unwrap();
        for (a, b) in keys.iter().zip(&back) {
            assert_eq!(a.id, b.id);
            assert_eq!(a.not_before, b.not_before);
            assert_eq!(a.encrypt_until, b.encrypt_until);
            assert_eq!(a.decrypt_until, b.decrypt_until);
            assert_eq!(*a.secret, *b.secret);
        }
        assert!(!format!("{:?}", keys[0]).contains("[2, 2, 2, 2, 2, 2, 2, 2, 2"));
    }

    #[test]
    fn malformed_payloads_are_refused() {
        assert!(matches!(
            decode_ticket_keys(&[]),
            Err(TicketKeysError::Length(0))
        ));
        assert!(decode_ticket_keys(&[0; 63]).is_err());
        assert!(decode_ticket_keys(&vec![0; 17 * TICKET_KEY_ENTRY_LEN]).is_err());
        let mut bad = key(3, 1_700_000_000_000);
        bad.decrypt_until = at(1);
        let payload = encode_ticket_keys(&[bad]);
        assert!(matches!(
            decode_ticket_keys(&payload),
            Err(TicketKeysError::Times(_))
        ));
    }
}
