//! Session tickets sealed with keys the whole group shares (`keyless_shared::tickets`),
//! so that a ticket made by one edge resumes on any other edge of the group.
//!
//! A ticket is `key id (8) ‖ nonce (12) ‖ ChaCha20-Poly1305(state)`, the key id as
//! associated data. New tickets are sealed with the newest key in its encrypt window;
//! a ticket is opened only while its key is within its decrypt window, so a ticket's
//! life ends with its key (rustls: "lifetime must be implemented by key rolling and
//! erasure"). Keys are held as raw bytes that are zeroized when replaced; the AEAD key
//! schedule is made per use and dropped with it. With no usable key, no ticket is
//! issued and every ticket is refused: handshakes are then full ones.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use keyless_shared::tickets::TicketKey;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

/// Bytes of the key id at the start of a ticket.
const ID_LEN: usize = 8;

/// The group's ticket keys, replaced as the key service rotates them.
#[derive(Debug)]
pub struct SharedTicketer {
    keys: RwLock<Arc<[TicketKey]>>,
    rng: SystemRandom,
}

impl Default for SharedTicketer {
    fn default() -> Self {
        SharedTicketer {
            keys: RwLock::new(Arc::from(Vec::new())),
            rng: SystemRandom::new(),
        }
    }
}

impl SharedTicketer {
    /// Replaces the keys (the old ones are zeroized once no ticket operation uses them).
    pub fn install(&self, keys: Vec<TicketKey>) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::from(keys);
    }

    /// Whether any key is held (installed and not yet past its window).
    pub fn has_keys(&self) -> bool {
        let now = SystemTime::now();
        self.keys().iter().any(|k| now < k.decrypt_until)
    }

    /// The keys held now (the session store seals its entries with keys derived from
    /// them).
    pub(crate) fn keys(&self) -> Arc<[TicketKey]> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The key new tickets are sealed with at `now`: the newest in its encrypt window.
    pub(crate) fn sealing_key(keys: &[TicketKey], now: SystemTime) -> Option<&TicketKey> {
        keys.iter()
            .filter(|k| k.not_before <= now && now < k.encrypt_until)
            .max_by_key(|k| k.not_before)
    }

    fn aead(key: &TicketKey) -> Option<LessSafeKey> {
        UnboundKey::new(&CHACHA20_POLY1305, key.secret.as_ref())
            .ok()
            .map(LessSafeKey::new)
    }

    fn seal_at(&self, plain: &[u8], now: SystemTime) -> Option<Vec<u8>> {
        let keys = self.keys();
        let key = Self::sealing_key(&keys, now)?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(ID_LEN + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        Self::aead(key)?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key.id),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn open_at(&self, ticket: &[u8], now: SystemTime) -> Option<Vec<u8>> {
        if ticket.len() < ID_LEN + NONCE_LEN + aead::CHACHA20_POLY1305.tag_len() {
            return None;
        }
        let (id, rest) = ticket.split_at(ID_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let keys = self.keys();
        let key = keys
            .iter()
            .find(|k| k.id == id && k.not_before <= now && now < k.decrypt_until)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = sealed.to_vec();
        let plain = Self::aead(key)?
            .open_in_place(nonce, Aad::from(key.id), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }

    /// The id of the key new tickets are sealed with, and its age, for metrics.
    pub fn current(&self) -> Option<([u8; ID_LEN], Duration)> {
        let now = SystemTime::now();
        let keys = self.keys();
        Self::sealing_key(&keys, now).map(|k| {
            (
                k.id,
                now.duration_since(k.not_before).unwrap_or(Duration::ZERO),
            )
        })
    }
}

impl ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    /// What clients are told: the time left in the sealing key's decrypt window (rustls
    /// asks before sealing; at most a day, and none when there is no key).
    fn lifetime(&self) -> u32 {
        let now = SystemTime::now();
        let keys = self.keys();
        Self::sealing_key(&keys, now)
            .and_then(|k| k.decrypt_until.duration_since(now).ok())
            .map(|d| u32::try_from(d.as_secs().min(86_400)).unwrap_or(0))
            .unwrap_or(0)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal_at(plain, SystemTime::now())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open_at(cipher, SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    fn key(n: u8, from: SystemTime, seal_for: u64, open_for: u64) -> TicketKey {
        TicketKey {
            id: [n; 8],
            not_before: from,
            encrypt_until: from + Duration::from_secs(seal_for),
            decrypt_until: from + Duration::from_secs(open_for),
            secret: Zeroizing::new([n; 32]),
        }
    }

    #[test]
    fn another_edge_with_the_same_keys_opens_the_ticket() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let keys = || vec![key(1, t0, 3600, 3 * 3600)];
        let (a, b) = (SharedTicketer::default(), SharedTicketer::default());
        a.install(keys());
        b.install(keys());
        let ticket = a.seal_at(b"session state", t0).unwrap();
        assert_eq!(&ticket[..8], &[1; 8]);
        assert_eq!(b.open_at(&ticket, t0).unwrap(), b"session state");
        // Another group's keys (same id, other secret) refuse it.
        let other = SharedTicketer::default();
        let mut foreign = key(1, t0, 3600, 3 * 3600);
        foreign.secret = Zeroizing::new([9; 32]);
        other.install(vec![foreign]);
        assert!(other.open_at(&ticket, t0).is_none());
        // Any changed byte is refused.
        for i in [0, 8, 20, ticket.len() - 1] {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert!(b.open_at(&bad, t0).is_none(), "byte {i}");
        }
        assert!(b.open_at(&ticket[..10], t0).is_none());
    }

    #[test]
    fn rotation_seals_with_the_newest_and_opens_until_the_window_ends() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let hour = Duration::from_secs(3600);
        let t = SharedTicketer::default();
        t.install(vec![key(1, t0, 3600, 3 * 3600)]);
        let old = t.seal_at(b"old", t0).unwrap();
        // Rotation: a new key; the old one still opens within its window.
        t.install(vec![
            key(2, t0 + hour, 3600, 3 * 3600),
            key(1, t0, 3600, 3 * 3600),
        ]);
        let new = t.seal_at(b"new", t0 + hour).unwrap();
        assert_eq!(&new[..8], &[2; 8]);
        assert!(t.open_at(&old, t0 + 2 * hour).is_some());
        assert!(t.open_at(&old, t0 + 3 * hour).is_none(), "past its window");
        assert!(t.open_at(&new, t0 + 3 * hour).is_some());
        // Keys gone: nothing sealed, nothing opened.
        t.install(Vec::new());
        assert!(t.seal_at(b"x", t0 + hour).is_none());
        assert!(t.open_at(&new, t0 + hour).is_none());
    }
}
