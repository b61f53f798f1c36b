//! Checks that a to-be-signed message is a TLS server handshake signature input, so
//! that a key server can refuse to act as a signing oracle for arbitrary data.

use ring::digest;

use crate::protocol::{HashAlg, KeyKind, Opcode};

/// The context string of a TLS 1.3 server CertificateVerify (RFC 8446 §4.4.3).
pub const TLS13_SERVER_CONTEXT: &[u8] = b"TLS 1.3, server CertificateVerify";

/// What a checked message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeContext {
    /// 64 spaces ‖ context string ‖ 0 ‖ transcript hash.
    Tls13CertificateVerify,
    /// client_random ‖ server_random ‖ ServerECDHParams.
    Tls12ServerKeyExchange,
}

impl HandshakeContext {
    /// Short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            HandshakeContext::Tls13CertificateVerify => "tls13-certificate-verify",
            HandshakeContext::Tls12ServerKeyExchange => "tls12-server-key-exchange",
        }
    }
}

/// Why the signing policy refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The request carries no to-be-signed message and policy requires one.
    #[error("request carries no handshake message and policy requires one")]
    MissingMessage,
    /// The digest in the payload is not the hash of the message.
    #[error("digest does not match the handshake message")]
    DigestMismatch,
    /// The message is neither a TLS 1.3 CertificateVerify nor a TLS 1.2 ECDHE
    /// ServerKeyExchange input.
    #[error("message is not a TLS server handshake signature input")]
    NotHandshake,
    /// The opcode's hash is too weak for a TLS 1.2+ handshake, or not allowed there.
    #[error("signature algorithm not allowed for this handshake")]
    Algorithm,
    /// The operation cannot be tied to a handshake (raw RSA decrypt).
    #[error("operation cannot be checked against a handshake")]
    Unverifiable,
}

/// Hashes `message` with `hash`, for the hashes a TLS 1.2+ handshake uses.
pub fn digest_for(hash: HashAlg, message: &[u8]) -> Option<digest::Digest> {
    let alg = match hash {
        HashAlg::Sha256 => &digest::SHA256,
        HashAlg::Sha384 => &digest::SHA384,
        HashAlg::Sha512 => &digest::SHA512,
        HashAlg::Sha1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
        HashAlg::Md5Sha1 | HashAlg::Sha224 => return None,
    };
    Some(digest::digest(alg, message))
}

/// Checks a sign request: `payload` is the digest (or, for Ed25519, the message) and
/// `message` is the full to-be-signed message from the extension tag.
pub fn check_signing_context(
    opcode: Opcode,
    payload: &[u8],
    message: &[u8],
) -> Result<HandshakeContext, PolicyError> {
    let (kind, hash) = opcode.key_op().ok_or(PolicyError::Algorithm)?;
    match (kind, hash) {
        (KeyKind::RsaRaw, _) => return Err(PolicyError::Unverifiable),
        (KeyKind::Ed25519, _) => {
            if payload != message {
                return Err(PolicyError::DigestMismatch);
            }
        }
        (_, Some(h @ (HashAlg::Sha256 | HashAlg::Sha384 | HashAlg::Sha512))) => {
            let d = digest_for(h, message).ok_or(PolicyError::Algorithm)?;
            if d.as_ref() != payload {
                return Err(PolicyError::DigestMismatch);
            }
        }
        _ => return Err(PolicyError::Algorithm),
    }
    let ctx = classify(message).ok_or(PolicyError::NotHandshake)?;
    if ctx == HandshakeContext::Tls13CertificateVerify && kind == KeyKind::RsaPkcs1 {
        // RFC 8446 §4.2.3: RSA PKCS#1 v1.5 never signs a TLS 1.3 CertificateVerify.
        return Err(PolicyError::Algorithm);
    }
    Ok(ctx)
}

fn classify(message: &[u8]) -> Option<HandshakeContext> {
    if is_tls13_server_certificate_verify(message) {
        Some(HandshakeContext::Tls13CertificateVerify)
    } else if is_tls12_ecdhe_params(message) {
        Some(HandshakeContext::Tls12ServerKeyExchange)
    } else {
        None
    }
}

fn is_tls13_server_certificate_verify(m: &[u8]) -> bool {
    let prefix_len = 64 + TLS13_SERVER_CONTEXT.len() + 1;
    if m.len() < prefix_len {
        return false;
    }
    let (prefix, transcript_hash) = m.split_at(prefix_len);
    prefix[..64].iter().all(|b| *b == 0x20)
        && &prefix[64..64 + TLS13_SERVER_CONTEXT.len()] == TLS13_SERVER_CONTEXT
        && prefix[prefix_len - 1] == 0
        // TLS 1.3 cipher suites hash with SHA-256 or SHA-384.
        && matches!(transcript_hash.len(), 32 | 48)
}

fn is_tls12_ecdhe_params(m: &[u8]) -> bool {
    // client_random(32) ‖ server_random(32) ‖ curve_type(1) = named_curve(3) ‖
    // named group(2) ‖ point length(1) ‖ point
    let Some(params) = m.get(64..) else {
        return false;
    };
    let [3, g0, g1, len, point @ ..] = params else {
        return false;
    };
    let expected = match u16::from_be_bytes([*g0, *g1]) {
        0x0017 => 65,  // secp256r1, uncompressed
        0x0018 => 97,  // secp384r1
        0x0019 => 133, // secp521r1
        0x001d => 32,  // x25519
        0x001e => 56,  // x448
        _ => return false,
    };
    usize::from(*len) == expected && point.len() == expected
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls13(hash_len: usize) -> Vec<u8> {
        let mut m = vec![0x20; 64];
        m.extend_from_slice(TLS13_SERVER_CONTEXT);
        m.push(0);
        m.extend(std::iter::repeat_n(7u8, hash_len));
        m
    }

    fn tls12_x25519() -> Vec<u8> {
        let mut m = vec![1u8; 64];
        m.extend_from_slice(&[3, 0, 0x1d, 32]);
        m.extend_from_slice(&[9u8; 32]);
        m
    }

    fn sha256(m: &[u8]) -> Vec<u8> {
        digest_for(HashAlg::Sha256, m).unwrap().as_ref().to_vec()
    }

    #[test]
    fn accepts_real_handshake_inputs() {
        let m = tls13(32);
        assert_eq!(
            check_signing_context(Opcode::EcdsaSignSha256, &sha256(&m), &m),
            Ok(HandshakeContext::Tls13CertificateVerify)
        );
        assert_eq!(
            check_signing_context(Opcode::Ed25519Sign, &m, &m),
            Ok(HandshakeContext::Tls13CertificateVerify)
        );
        let m = tls12_x25519();
        assert_eq!(
            check_signing_context(Opcode::RsaSignSha256, &sha256(&m), &m),
            Ok(HandshakeContext::Tls12ServerKeyExchange)
        );
    }

    #[test]
    fn ed25519_signs_only_a_handshake_message_given_twice() {
        // The edge sends the message as payload and in the signed-message tag.
        let m = tls12_x25519();
        assert_eq!(
            check_signing_context(Opcode::Ed25519Sign, &m, &m),
            Ok(HandshakeContext::Tls12ServerKeyExchange)
        );
        let junk = b"pay 1000 to mallory".to_vec();
        assert_eq!(
            check_signing_context(Opcode::Ed25519Sign, &junk, &junk),
            Err(PolicyError::NotHandshake)
        );
        let m13 = tls13(48);
        assert_eq!(
            check_signing_context(Opcode::Ed25519Sign, &junk, &m13),
            Err(PolicyError::DigestMismatch)
        );
    }

    #[test]
    fn refuses_everything_else() {
        let m = tls13(32);
        let mut wrong = sha256(&m);
        wrong[0] ^= 1;
        assert_eq!(
            check_signing_context(Opcode::EcdsaSignSha256, &wrong, &m),
            Err(PolicyError::DigestMismatch)
        );
        assert_eq!(
            check_signing_context(Opcode::RsaSignSha256, &sha256(&m), &m),
            Err(PolicyError::Algorithm)
        );
        let junk = b"pay 1000 to mallory".to_vec();
        assert_eq!(
            check_signing_context(Opcode::EcdsaSignSha256, &sha256(&junk), &junk),
            Err(PolicyError::NotHandshake)
        );
        let mut bad12 = tls12_x25519();
        bad12.push(0);
        assert_eq!(
            check_signing_context(Opcode::EcdsaSignSha256, &sha256(&bad12), &bad12),
            Err(PolicyError::NotHandshake)
        );
        assert_eq!(
            check_signing_context(Opcode::RsaDecrypt, &m, &m),
            Err(PolicyError::Unverifiable)
        );
        assert_eq!(
            check_signing_context(Opcode::EcdsaSignSha1, &m[..20], &m),
            Err(PolicyError::Algorithm)
        );
    }
}
