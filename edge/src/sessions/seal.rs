//! Session-store entries sealed with the group's keys, so that Redis never holds a
//! session secret in clear and an entry copied under another session id, or into
//! another group, does not open.
//!
//! Entry: `version (1) = 1 ‖ key id (8) ‖ nonce (12) ‖ ChaCha20-Poly1305(expires ‖ state)`,
//! `expires` in milliseconds since the Unix epoch (u64, big-endian). The AEAD key is
//! derived (HKDF-SHA256) from the group's session-ticket key of that id, so a ticket key
//! and a store key are never the same bytes; the associated data binds the entry to
//! its group, key id and session id.

use std::time::{Duration, SystemTime};

use keyless_shared::tickets::TicketKey;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

use crate::tickets::SharedTicketer;

const VERSION: u8 = 1;
const ID_LEN: usize = 8;
const HEADER_LEN: usize = 1 + ID_LEN + NONCE_LEN;
const TAG_LEN: usize = 16;

/// Why a stored entry was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Not an entry of this format.
    Malformed,
    /// Sealed with a key this edge does not hold (another group, or past its window).
    UnknownKey,
    /// The tag does not verify: modified, or made for another session or group.
    Forged,
    /// Its lifetime is over.
    Expired,
}

impl Refused {
    /// Metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::UnknownKey => "unknown-key",
            Refused::Forged => "forged",
            Refused::Expired => "expired",
        }
    }
}

/// The group's keys as the store uses them.
pub(crate) struct Sealer<'a> {
    pub(crate) group: &'a str,
    pub(crate) keys: &'a SharedTicketer,
}

fn store_key(key: &TicketKey) -> LessSafeKey {
    let prk =
        hkdf::Salt::new(hkdf::HKDF_SHA256, b"keyless session store v1").extract(&key.secret[..]);
    // Expanding one ChaCha20 key with SHA-256 cannot fail.
    let okm = prk
        .expand(&[b"entry"], &CHACHA20_POLY1305)
        .unwrap_or_else(|_| unreachable!("32 bytes from HKDF-SHA256"));
    LessSafeKey::new(UnboundKey::from(okm))
}

fn aad(group: &str, id: &[u8], session: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(24 + group.len() + ID_LEN + session.len());
    aad.extend_from_slice(b"keyless-session-v1");
    aad.extend_from_slice(&(group.len() as u32).to_be_bytes());
    aad.extend_from_slice(group.as_bytes());
    aad.extend_from_slice(id);
    aad.extend_from_slice(session);
    aad
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Sealer<'_> {
    /// Seals `state` of `session` to be resumable for `lifetime` (shortened to the end
    /// of the sealing key's window). Returns the entry and its time to live; `None`
    /// when the group has no key to seal with now.
    pub(crate) fn seal(
        &self,
        session: &[u8],
        state: &[u8],
        lifetime: Duration,
        now: SystemTime,
    ) -> Option<(Vec<u8>, Duration)> {
        let keys = self.keys.keys();
        let key = SharedTicketer::sealing_key(&keys, now)?;
        let ttl = lifetime.min(key.decrypt_until.duration_since(now).ok()?);
        if ttl < Duration::from_secs(1) {
            return None;
        }
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let mut body = Vec::with_capacity(8 + state.len() + TAG_LEN);
        body.extend_from_slice(&ms(now + ttl).to_be_bytes());
        body.extend_from_slice(state);
        store_key(key)
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(self.group, &key.id, session)),
                &mut body,
            )
            .ok()?;
        let mut entry = Vec::with_capacity(HEADER_LEN + body.len());
        entry.push(VERSION);
        entry.extend_from_slice(&key.id);
        entry.extend_from_slice(&nonce);
        entry.extend_from_slice(&body);
        Some((entry, ttl))
    }

    /// Opens `entry` stored for `session`.
    pub(crate) fn open(
        &self,
        session: &[u8],
        entry: &[u8],
        now: SystemTime,
    ) -> Result<Vec<u8>, Refused> {
        if entry.len() < HEADER_LEN + 8 + TAG_LEN || entry[0] != VERSION {
            return Err(Refused::Malformed);
        }
        let (id, rest) = entry[1..].split_at(ID_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let keys = self.keys.keys();
        let key = keys
            .iter()
            .find(|k| k.id == id && k.not_before <= now && now < k.decrypt_until)
            .ok_or(Refused::UnknownKey)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| Refused::Malformed)?;
        let mut body = sealed.to_vec();
        let plain = store_key(key)
            .open_in_place(nonce, Aad::from(aad(self.group, id, session)), &mut body)
            .map_err(|_| Refused::Forged)?;
        let (expires, state) = plain.split_at(8);
        let expires = u64::from_be_bytes(expires.try_into().map_err(|_| Refused::Malformed)?);
        if expires <= ms(now) {
            return Err(Refused::Expired);
        }
        Ok(state.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    fn ticketer(secret: u8, t0: SystemTime) -> SharedTicketer {
        let t = SharedTicketer::default();
        t.install(vec![TicketKey {
            id: [7; 8],
            not_before: t0,
            encrypt_until: t0 + Duration::from_secs(3600),
            decrypt_until: t0 + Duration::from_secs(3 * 3600),
            secret: Zeroizing::new([secret; 32]),
        }]);
        t
    }

    #[test]
    fn an_entry_opens_only_for_its_session_group_and_keys_until_it_expires() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let keys = ticketer(1, t0);
        let a = Sealer {
            group: "g",
            keys: &keys,
        };
        let (entry, ttl) = a
            .seal(b"sid-1", b"secret state", Duration::from_secs(600), t0)
            .unwrap();
        assert_eq!(ttl, Duration::from_secs(600));
        assert!(
            !entry.windows(12).any(|w| w == b"secret state"),
            "sealed, not in clear"
        );
        // Another edge of the group (same keys) opens it.
        let other_edge = ticketer(1, t0);
        let b = Sealer {
            group: "g",
            keys: &other_edge,
        };
        assert_eq!(b.open(b"sid-1", &entry, t0).unwrap(), b"secret state");
        // Copied under another session id, or into another group: refused.
        assert_eq!(b.open(b"sid-2", &entry, t0), Err(Refused::Forged));
        let h = Sealer {
            group: "h",
            keys: &other_edge,
        };
        assert_eq!(h.open(b"sid-1", &entry, t0), Err(Refused::Forged));
        // Other keys with the same id (another group's secret): refused.
        let foreign = ticketer(2, t0);
        let f = Sealer {
            group: "g",
            keys: &foreign,
        };
        assert_eq!(f.open(b"sid-1", &entry, t0), Err(Refused::Forged));
        // Any modified byte: refused.
        for i in [0, 1, 9, 21, entry.len() - 1] {
            let mut bad = entry.clone();
            bad[i] ^= 1;
            assert!(b.open(b"sid-1", &bad, t0).is_err(), "byte {i}");
        }
        assert_eq!(b.open(b"sid-1", &entry[..20], t0), Err(Refused::Malformed));
        // Past its lifetime, or its key's window: refused.
        let later = t0 + Duration::from_secs(601);
        assert_eq!(b.open(b"sid-1", &entry, later), Err(Refused::Expired));
        let gone = t0 + Duration::from_secs(3 * 3600);
        assert_eq!(b.open(b"sid-1", &entry, gone), Err(Refused::UnknownKey));
    }

    #[test]
    fn the_lifetime_ends_with_the_key_and_no_key_seals_nothing() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let keys = ticketer(1, t0);
        let s = Sealer {
            group: "g",
            keys: &keys,
        };
        let near_end = t0 + Duration::from_secs(3000);
        let (_, ttl) = s
            .seal(b"sid", b"x", Duration::from_secs(86_400), near_end)
            .unwrap();
        assert_eq!(ttl, Duration::from_secs(3 * 3600 - 3000));
        let none = SharedTicketer::default();
        let n = Sealer {
            group: "g",
            keys: &none,
        };
        assert!(n.seal(b"sid", b"x", Duration::from_secs(60), t0).is_none());
    }
}
