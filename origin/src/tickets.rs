//! Session-ticket keys for the edges of each group (the ticket-keys extension,
//! `shared/PROTOCOL.md`): derived from a per-group secret and the time, so that every key
//! server holding the group's secret hands out the same keys without talking to the
//! others, and the keys rotate by themselves every `rotate_every`.
//!
//! Key of epoch `e` (= ⌊now / rotate_every⌋): HKDF-SHA256(salt "keyless ticket keys v1",
//! ikm = the group's secret, info = `e` as u64 big-endian), 32 bytes; its id is `e`. It
//! seals during its epoch and opens for `previous` more epochs. A request gets the keys
//! of the next epoch (so that edges have it before it is needed), the current one and
//! the `previous` ones before it.
//!
//! The secret of group G is `<secret_dir>/G.key` (32 random bytes, 0600), made on first
//! use; key servers of one group must share it (copy the file). It never leaves the key
//! server; only derived keys do, and only to edges of that group.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use keyless_shared::tickets::TicketKey;
use ring::hkdf;
use zeroize::Zeroizing;

/// The group name tickets of `[tls] client_ca` edges (no group URI) are kept under.
pub(crate) const IMPLICIT_GROUP: &str = "default";

/// Per-group ticket secrets and the schedule.
#[derive(Debug)]
pub(crate) struct TicketKeys {
    dir: PathBuf,
    rotate_every: Duration,
    previous: u32,
    secrets: Mutex<HashMap<String, Zeroizing<[u8; 32]>>>,
}

struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

impl TicketKeys {
    pub(crate) fn new(dir: PathBuf, rotate_every: Duration, previous: u32) -> TicketKeys {
        TicketKeys {
            dir,
            rotate_every: rotate_every.max(Duration::from_secs(1)),
            previous,
            secrets: Mutex::new(HashMap::new()),
        }
    }

    /// The keys for `group` at `now`, newest first.
    pub(crate) fn keys(&self, group: &str, now: SystemTime) -> std::io::Result<Vec<TicketKey>> {
        let secret = self.secret(group)?;
        let period = self.rotate_every.as_millis().max(1) as u64;
        let now_ms = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let current = now_ms / period;
        let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        let first = current.saturating_sub(u64::from(self.previous));
        Ok((first..=current + 1)
            .rev()
            .map(|epoch| TicketKey {
                id: epoch.to_be_bytes(),
                not_before: at(epoch * period),
                encrypt_until: at((epoch + 1) * period),
                decrypt_until: at((epoch + 1 + u64::from(self.previous)) * period),
                secret: derive(&secret, epoch),
            })
            .collect())
    }

    /// The group's secret, read or made (0600, written atomically) on first use.
    fn secret(&self, group: &str) -> std::io::Result<Zeroizing<[u8; 32]>> {
        let mut secrets = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = secrets.get(group) {
            return Ok(s.clone());
        }
        let path = self.dir.join(format!("{group}.key"));
        let secret = match std::fs::read(&path) {
            Ok(bytes) => {
                let mut s = Zeroizing::new([0u8; 32]);
                if bytes.len() != 32 {
                    return Err(std::io::Error::other(format!(
                        "{}: a ticket secret is 32 bytes, not {}",
                        path.display(),
                        bytes.len()
                    )));
                }
                s.copy_from_slice(&bytes);
                s
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use ring::rand::SecureRandom;
                let mut s = Zeroizing::new([0u8; 32]);
                ring::rand::SystemRandom::new()
                    .fill(s.as_mut())
                    .map_err(|_| std::io::Error::other("no randomness"))?;
                std::fs::create_dir_all(&self.dir)?;
                crate::state::replace_file(&path, s.as_ref(), 0o600).map_err(|(_, e)| e)?;
                tracing::info!(group, file = %path.display(), "ticket secret created; copy it to the group's other key servers");
                s
            }
            Err(e) => return Err(e),
        };
        secrets.insert(group.to_owned(), secret.clone());
        Ok(secret)
    }
}

fn derive(secret: &[u8; 32], epoch: u64) -> Zeroizing<[u8; 32]> {
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"keyless ticket keys v1");
    let prk = salt.extract(secret);
    let info = epoch.to_be_bytes();
    let mut out = Zeroizing::new([0u8; 32]);
    // Expanding 32 bytes with SHA-256 cannot fail.
    if let Ok(okm) = prk.expand(&[&info], Len32) {
        let _ = okm.fill(out.as_mut());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_key_servers_with_one_secret_hand_out_the_same_keys() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let a = TicketKeys::new(dir.path().to_owned(), hour, 2);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_123);
        let keys = a.keys("acme", now).unwrap();
        assert_eq!(keys.len(), 4, "next, current, two previous");
        let b = TicketKeys::new(dir.path().to_owned(), hour, 2);
        let again = b.keys("acme", now).unwrap();
        for (x, y) in keys.iter().zip(&again) {
            assert_eq!((x.id, *x.secret), (y.id, *y.secret));
        }
        // Windows: the current key seals now; the oldest still opens.
        let current = &keys[1];
        assert!(current.not_before <= now && now < current.encrypt_until);
        assert!(now < keys[3].decrypt_until);
        assert!(keys[0].not_before > now, "the next key is for later");
        // Another group, another secret; the file is private.
        let other = a.keys("bank", now).unwrap();
        assert_ne!(*other[1].secret, *current.secret);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("acme.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // An hour later the keys have moved by one.
        let later = a.keys("acme", now + hour).unwrap();
        assert_eq!(later[2].id, current.id);
    }
}
