//! Edge enrollment (`ENROLL.md` beside this crate): the token format, the proof of
//! possession an edge computes over a server nonce, and the JSON bodies of the
//! enrollment API. Both sides compute the proof here, so they cannot disagree on it.

use ring::hmac;
use serde::{Deserialize, Serialize};

/// Domain separation of the proof's MAC input.
const PROOF_LABEL: &[u8] = b"keyless-enroll-v1";
/// Prefix of every token, so that a token is recognisable in a file or a paste.
pub const TOKEN_PREFIX: &str = "klt1";
/// Random bytes in a token's secret and in nonces.
pub const SECRET_LEN: usize = 32;

/// Path prefix of the enrollment API (RFC 7030 `/.well-known/est`).
pub const EST_PREFIX: &str = "/.well-known/est";

/// A bootstrap token as the operator handles it: `klt1.<id>.<secret>`, the id naming
/// the token's record at the key server and the secret (base64url, 32 bytes) keying the
/// proof. Only a hash of the secret is stored by the key server; the secret is never
/// sent over the network.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// Public id of the token (hex).
    pub id: String,
    /// The secret.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret, not even in a debug print.
        f.debug_struct("Token")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Why a token string cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not an enrollment token (expected {TOKEN_PREFIX}.<id>.<secret>)")]
pub struct TokenFormatError;

impl Token {
    /// Parses `klt1.<id>.<secret>` (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Token, TokenFormatError> {
        let mut parts = text.trim().split('.');
        let (Some(TOKEN_PREFIX), Some(id), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenFormatError);
        };
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenFormatError);
        }
        let secret = base64url_decode(secret).ok_or(TokenFormatError)?;
        if secret.len() != SECRET_LEN {
            return Err(TokenFormatError);
        }
        Ok(Token {
            id: id.to_ascii_lowercase(),
            secret,
        })
    }

    /// The text form.
    pub fn to_text(&self) -> String {
        format!(
            "{TOKEN_PREFIX}.{}.{}",
            self.id,
            base64url_encode(&self.secret)
        )
    }

    /// What the key server stores instead of the secret: SHA-256 of it, hex.
    pub fn secret_hash(&self) -> String {
        hex::encode(self.proof_key())
    }

    /// The key of the proof of possession: SHA-256 of the secret, the value the key
    /// server keeps (so the stored hash is as sensitive as the token while the token is
    /// valid; it is worthless once the token is used, revoked or expired).
    pub fn proof_key(&self) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, &self.secret)
            .as_ref()
            .to_vec()
    }
}

/// What the proof of possession covers.
#[derive(Clone, Debug)]
pub struct ProofInput<'a> {
    /// The token's id.
    pub token_id: &'a str,
    /// The nonce the key server handed out.
    pub server_nonce: &'a [u8],
    /// A fresh nonce of the edge.
    pub edge_nonce: &'a [u8],
    /// The id the edge enrolls as.
    pub edge_id: &'a str,
    /// SHA-256 of the CSR's DER.
    pub csr_digest: &'a [u8],
    /// The edge's clock, milliseconds since the Unix epoch.
    pub edge_time_ms: u64,
}

impl ProofInput<'_> {
    /// The MAC input: the label, then each field as a u32 big-endian length and its
    /// bytes (the time as 8 bytes big-endian), so that no two inputs share an encoding.
    fn message(&self) -> Vec<u8> {
        let time = self.edge_time_ms.to_be_bytes();
        let fields: [&[u8]; 7] = [
            PROOF_LABEL,
            self.token_id.as_bytes(),
            self.server_nonce,
            self.edge_nonce,
            self.edge_id.as_bytes(),
            self.csr_digest,
            &time,
        ];
        let mut m = Vec::with_capacity(fields.iter().map(|f| f.len() + 4).sum());
        for f in fields {
            m.extend_from_slice(&u32::try_from(f.len()).unwrap_or(u32::MAX).to_be_bytes());
            m.extend_from_slice(f);
        }
        m
    }

    /// HMAC-SHA256 of the input, keyed with the token's secret.
    pub fn sign(&self, secret: &[u8]) -> Vec<u8> {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        hmac::sign(&key, &self.message()).as_ref().to_vec()
    }

    /// Whether `mac` is the input's MAC under `secret`, compared in constant time.
    pub fn verify(&self, secret: &[u8], mac: &[u8]) -> bool {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        hmac::verify(&key, &self.message(), mac).is_ok()
    }
}

/// `POST /.well-known/est/nonce` → a server nonce, single use, valid for a short time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NonceResponse {
    /// The nonce, base64url.
    pub nonce: String,
    /// The key server's clock, milliseconds since the Unix epoch.
    pub server_time_ms: u64,
    /// Seconds the nonce may be used.
    pub expires_in: u64,
}

/// `POST /.well-known/est/simpleenroll` body (JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The token's id.
    pub token_id: String,
    /// The edge id asked for.
    pub edge_id: String,
    /// The server nonce, base64url.
    pub server_nonce: String,
    /// The edge's nonce, base64url.
    pub edge_nonce: String,
    /// The edge's clock, ms since the Unix epoch.
    pub edge_time_ms: u64,
    /// The CSR (PKCS#10), PEM.
    pub csr: String,
    /// The proof ([`ProofInput::sign`]), base64url.
    pub mac: String,
}

/// `POST /.well-known/est/simplereenroll` body (JSON), over mTLS with the current
/// certificate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReenrollRequest {
    /// The CSR (PKCS#10) of the new key pair, PEM.
    pub csr: String,
}

/// A successful enrollment or renewal.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The group the edge belongs to.
    pub group: String,
    /// The edge id in the certificate.
    pub edge_id: String,
    /// The new client certificate, PEM.
    pub certificate: String,
    /// The group's CA certificate(s), PEM: what key servers check edge certificates
    /// against.
    pub ca_bundle: String,
    /// The certificate's end, seconds since the Unix epoch.
    pub not_after: u64,
}

/// A refusal: a stable machine-readable code and a message for people.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollError {
    /// One of the codes listed in `ENROLL.md` (`token-unknown`, `token-used`, ...).
    pub error: String,
    /// What went wrong, for the operator.
    pub message: String,
}

/// base64url without padding.
pub fn base64url_encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// Decodes base64url without padding; `None` if malformed.
pub fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_round_trips() {
        for n in 0..70 {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let text = base64url_encode(&data);
            assert!(!text.contains(['+', '/', '=']));
            assert_eq!(base64url_decode(&text).unwrap(), data, "{n}");
        }
        assert_eq!(base64url_encode(b"hello"), "aGVsbG8");
        assert!(base64url_decode("a").is_none());
        assert!(base64url_decode("a+b/").is_none());
    }

    #[test]
    fn tokens_parse_and_hide_their_secret() {
        let t = Token {
            id: "00ff".into(),
            secret: vec![7; SECRET_LEN],
        };
        let text = t.to_text();
        assert!(text.starts_with("klt1.00ff."));
        assert_eq!(Token::parse(&format!(" {text}\n")).unwrap(), t);
        assert!(!format!("{t:?}").contains(&base64url_encode(&t.secret)));
        for bad in [
            "",
            "klt1.00ff",
            "klt2.00ff.AAAA",
            "klt1.xyz.AAAA",
            "klt1.00ff.AAAA",
        ] {
            assert_eq!(Token::parse(bad), Err(TokenFormatError), "{bad}");
        }
    }

    #[test]
    fn the_proof_covers_every_field() {
        let input = ProofInput {
            token_id: "ab",
            server_nonce: b"server",
            edge_nonce: b"edge",
            edge_id: "edge-1",
            csr_digest: &[1; 32],
            edge_time_ms: 1_700_000_000_000,
        };
        let secret = [9u8; SECRET_LEN];
        let mac = input.sign(&secret);
        assert!(input.verify(&secret, &mac));
        assert!(!input.verify(&[8u8; SECRET_LEN], &mac));
        let changed = [
            ProofInput {
                token_id: "ac",
                ..input.clone()
            },
            ProofInput {
                server_nonce: b"serveR",
                ..input.clone()
            },
            ProofInput {
                edge_nonce: b"edgE",
                ..input.clone()
            },
            ProofInput {
                edge_id: "edge-2",
                ..input.clone()
            },
            ProofInput {
                csr_digest: &[2; 32],
                ..input.clone()
            },
            ProofInput {
                edge_time_ms: 1_700_000_000_001,
                ..input.clone()
            },
            // Moving a byte between fields changes the encoding too.
            ProofInput {
                server_nonce: b"serve",
                edge_nonce: b"redge",
                ..input.clone()
            },
        ];
        for c in changed {
            assert!(!c.verify(&secret, &mac), "{c:?}");
        }
    }
}
