//! Server nonces of the enrollment API: random, single use, valid for
//! [`NONCE_LIFETIME`], at most [`MAX_NONCES`] outstanding (the oldest is dropped for a
//! new one), so a client asking for nonces in a loop costs bounded memory.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use keyless_shared::enroll::SECRET_LEN;
use ring::rand::{SecureRandom, SystemRandom};

/// How long a nonce may be used.
pub(crate) const NONCE_LIFETIME: Duration = Duration::from_secs(60);
/// Outstanding nonces at most.
pub(crate) const MAX_NONCES: usize = 10_000;

type Nonce = [u8; SECRET_LEN];

/// The outstanding nonces and their expiry, oldest first.
#[derive(Debug)]
pub(crate) struct Nonces {
    live: HashMap<Nonce, Instant>,
    /// Issue order; may hold nonces already used (skipped when reached).
    order: VecDeque<Nonce>,
    capacity: usize,
    lifetime: Duration,
}

impl Nonces {
    pub(crate) fn new(capacity: usize, lifetime: Duration) -> Nonces {
        Nonces {
            live: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            lifetime,
        }
    }

    /// A fresh nonce, remembered until used or expired; `None` if the system random
    /// number generator fails.
    pub(crate) fn issue(&mut self, now: Instant) -> Option<Nonce> {
        let mut nonce = [0u8; SECRET_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        // Drop the expired and, at capacity, the oldest outstanding ones.
        while let Some(oldest) = self.order.front() {
            match self.live.get(oldest) {
                Some(expiry) if *expiry > now && self.live.len() < self.capacity => break,
                _ => {
                    if let Some(oldest) = self.order.pop_front() {
                        self.live.remove(&oldest);
                    }
                }
            }
        }
        // Used nonces linger in `order` until reached; keep it within a bound too.
        if self.order.len() >= 2 * self.capacity {
            let live = &self.live;
            self.order.retain(|n| live.contains_key(n));
        }
        self.live.insert(nonce, now + self.lifetime);
        self.order.push_back(nonce);
        Some(nonce)
    }

    /// Consumes `nonce`: whether it was issued, unused and unexpired. It cannot be used
    /// again either way.
    pub(crate) fn take(&mut self, nonce: &[u8], now: Instant) -> bool {
        let Ok(key) = Nonce::try_from(nonce) else {
            return false;
        };
        self.live.remove(&key).is_some_and(|expiry| expiry > now)
    }

    #[cfg(test)]
    fn outstanding(&self) -> usize {
        self.live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_single_use_and_expire() {
        let mut n = Nonces::new(10, Duration::from_secs(60));
        let t0 = Instant::now();
        let a = n.issue(t0).unwrap();
        let b = n.issue(t0).unwrap();
        assert_ne!(a, b);
        assert!(n.take(&a, t0));
        assert!(!n.take(&a, t0), "used twice");
        assert!(!n.take(&[0; 32], t0), "never issued");
        assert!(!n.take(&a[..5], t0), "wrong length");
        assert!(!n.take(&b, t0 + Duration::from_secs(61)), "expired");
        assert!(!n.take(&b, t0), "an expired nonce is consumed too");
    }

    #[test]
    fn the_oldest_nonce_makes_room() {
        let mut n = Nonces::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let first = n.issue(t0).unwrap();
        for _ in 0..3 {
            n.issue(t0).unwrap();
        }
        assert_eq!(n.outstanding(), 3);
        assert!(!n.take(&first, t0), "the oldest was dropped");
        // Many issued and used: the order queue stays bounded.
        for _ in 0..100 {
            let x = n.issue(t0).unwrap();
            assert!(n.take(&x, t0));
        }
        assert!(n.order.len() <= 6, "{}", n.order.len());
    }
}
