//! The numbers of the Keyless protocol v1: tags, opcodes and error codes; and the
//! payloads of the get-certificate-chain extension (key preference bytes, chain list).
//!
//! Values below 0x40 are the reference protocol's; 0x40 and above (and error codes from
//! 0x80) are keyless extensions that a reference peer ignores or reports as unknown.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

/// Major version carried in every header.
pub const VERSION_MAJOR: u8 = 0x01;
/// Minor version carried in every header.
pub const VERSION_MINOR: u8 = 0x00;

macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $label:literal, )* }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
            /// A value this implementation does not know.
            Unknown(u8),
        }

        impl $name {
            /// Every known value, in wire order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The byte on the wire.
            pub fn to_u8(self) -> u8 {
                match self {
                    $( $name::$variant => $value, )*
                    $name::Unknown(v) => v,
                }
            }

            /// The short name used in logs, metrics and `PROTOCOL.md`.
            pub fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $label, )*
                    $name::Unknown(_) => "unknown",
                }
            }
        }

        impl From<u8> for $name {
            fn from(v: u8) -> Self {
                match v {
                    $( $value => $name::$variant, )*
                    other => $name::Unknown(other),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $name::Unknown(v) => write!(f, "unknown(0x{v:02x})"),
                    other => f.write_str(other.name()),
                }
            }
        }
    };
}

wire_enum! {
    /// TLV item tags.
    pub enum Tag {
        /// SHA-256 of the certificate (32 bytes).
        CertificateDigest = 0x01 => "certificate-digest",
        /// Server name (SNI) the client asked for.
        ServerName = 0x02 => "server-name",
        /// Client IP address (4 or 16 bytes).
        ClientIp = 0x03 => "client-ip",
        /// Subject key identifier: SHA-1 of the public key bit string (20 bytes).
        SubjectKeyIdentifier = 0x04 => "ski",
        /// Server IP address (4 or 16 bytes).
        ServerIp = 0x05 => "server-ip",
        /// Opaque certificate id.
        CertId = 0x06 => "cert-id",
        /// Operation code (1 byte).
        Opcode = 0x11 => "opcode",
        /// Operation payload (digest, ciphertext, result...).
        Payload = 0x12 => "payload",
        /// Custom function name (reference RPC; unused here).
        CustomFuncName = 0x13 => "custom-func-name",
        /// Extra data (reference; unused here).
        Extra = 0x14 => "extra",
        /// Padding to 1024 bytes.
        Padding = 0x20 => "padding",
        /// Extension: the whole to-be-signed handshake message.
        SignedMessage = 0x40 => "signed-message",
        /// Extension: the key server's clock in a pong, milliseconds since the Unix
        /// epoch (8 bytes, big-endian).
        ServerTime = 0x41 => "server-time",
        /// Extension: in a pong, the key server is draining (1 byte, 0x01).
        Draining = 0x42 => "draining",
        /// Extension: the trace context of the request (W3C trace context, binary: 26
        /// bytes, see [`crate::TraceContext`]).
        TraceContext = 0x43 => "trace-context",
    }
}

wire_enum! {
    /// Operation codes.
    pub enum Opcode {
        /// Raw RSA private-key operation (padding is the caller's to check).
        RsaDecrypt = 0x01 => "rsa-decrypt",
        /// RSA PKCS#1 v1.5 over an MD5‖SHA-1 digest (no DigestInfo).
        RsaSignMd5Sha1 = 0x02 => "rsa-sign-md5sha1",
        /// RSA PKCS#1 v1.5, SHA-1.
        RsaSignSha1 = 0x03 => "rsa-sign-sha1",
        /// RSA PKCS#1 v1.5, SHA-224.
        RsaSignSha224 = 0x04 => "rsa-sign-sha224",
        /// RSA PKCS#1 v1.5, SHA-256.
        RsaSignSha256 = 0x05 => "rsa-sign-sha256",
        /// RSA PKCS#1 v1.5, SHA-384.
        RsaSignSha384 = 0x06 => "rsa-sign-sha384",
        /// RSA PKCS#1 v1.5, SHA-512.
        RsaSignSha512 = 0x07 => "rsa-sign-sha512",
        /// ECDSA over an MD5‖SHA-1 digest.
        EcdsaSignMd5Sha1 = 0x12 => "ecdsa-sign-md5sha1",
        /// ECDSA, SHA-1.
        EcdsaSignSha1 = 0x13 => "ecdsa-sign-sha1",
        /// ECDSA, SHA-224.
        EcdsaSignSha224 = 0x14 => "ecdsa-sign-sha224",
        /// ECDSA, SHA-256.
        EcdsaSignSha256 = 0x15 => "ecdsa-sign-sha256",
        /// ECDSA, SHA-384.
        EcdsaSignSha384 = 0x16 => "ecdsa-sign-sha384",
        /// ECDSA, SHA-512.
        EcdsaSignSha512 = 0x17 => "ecdsa-sign-sha512",
        /// Ed25519 over the whole message.
        Ed25519Sign = 0x18 => "ed25519-sign",
        /// RSA-PSS, SHA-256, salt length 32.
        RsaPssSignSha256 = 0x35 => "rsa-pss-sign-sha256",
        /// RSA-PSS, SHA-384, salt length 48.
        RsaPssSignSha384 = 0x36 => "rsa-pss-sign-sha384",
        /// RSA-PSS, SHA-512, salt length 64.
        RsaPssSignSha512 = 0x37 => "rsa-pss-sign-sha512",
        /// Extension: certificate chain for the SNI in the request.
        GetCertificateChain = 0x40 => "get-certificate-chain",
        /// Extension: sent unsolicited (request id 0) by a key server that starts
        /// draining: finish what is in flight, send nothing new on this connection.
        GoAway = 0x41 => "go-away",
        /// Extension: the session-ticket keys of the client's group (payload:
        /// [`crate::tickets`]).
        GetTicketKeys = 0x42 => "get-ticket-keys",
        /// Successful response.
        Response = 0xF0 => "response",
        /// Ping: the payload is echoed back in a pong.
        Ping = 0xF1 => "ping",
        /// Pong.
        Pong = 0xF2 => "pong",
        /// Error response: the payload is one [`ErrorCode`] byte.
        Error = 0xFF => "error",
    }
}

wire_enum! {
    /// Error codes (1-byte payload of an [`Opcode::Error`] reply).
    pub enum ErrorCode {
        /// No error.
        None = 0x00 => "none",
        /// The cryptographic operation failed.
        Crypto = 0x01 => "crypto",
        /// No key with that SKI.
        KeyNotFound = 0x02 => "key-not-found",
        /// Read error (disk).
        Read = 0x03 => "read",
        /// Unsupported protocol version.
        VersionMismatch = 0x04 => "version-mismatch",
        /// The opcode is unknown or not supported by the key.
        BadOpcode = 0x05 => "bad-opcode",
        /// The opcode is not expected here (e.g. a response sent as a request).
        UnexpectedOpcode = 0x06 => "unexpected-opcode",
        /// Malformed request.
        Format = 0x07 => "format",
        /// Internal error of the server.
        Internal = 0x08 => "internal",
        /// No certificate for that name.
        CertNotFound = 0x09 => "cert-not-found",
        /// Expired.
        Expired = 0x0A => "expired",
        /// Remote configuration error.
        RemoteConfiguration = 0x0B => "remote-configuration",
        /// Extension: the client identity may not use this key (ACL).
        NotAuthorized = 0x80 => "not-authorized",
        /// Extension: the signing policy refused the request.
        PolicyRefused = 0x81 => "policy-refused",
        /// Extension: the key server is overloaded (its worker queue is full or the
        /// request waited past its deadline); the request was not performed, so trying
        /// another key server is safe.
        Overloaded = 0x82 => "overloaded",
        /// Extension: the key is not one the client's group may use (ENROLL.md).
        NotInGroup = 0x83 => "not-in-group",
        /// Extension: the key's store (a PKCS#11 token) is unavailable now; the request
        /// was not performed, so trying another key server is safe.
        KeyUnavailable = 0x84 => "key-unavailable",
    }
}

/// A key class a TLS client can use, as one byte of a get-certificate-chain request
/// payload (extension). The payload lists the classes in the edge's order of preference;
/// bytes this implementation does not know are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyPreference {
    /// An RSA key (PKCS#1 v1.5 or PSS signatures).
    Rsa,
    /// An ECDSA key (P-256 or P-384).
    Ecdsa,
    /// An Ed25519 key.
    Ed25519,
}

impl KeyPreference {
    /// Every value, in wire order.
    pub const ALL: &'static [KeyPreference] = &[
        KeyPreference::Rsa,
        KeyPreference::Ecdsa,
        KeyPreference::Ed25519,
    ];

    /// The byte on the wire.
    pub fn to_u8(self) -> u8 {
        match self {
            KeyPreference::Rsa => 0x01,
            KeyPreference::Ecdsa => 0x02,
            KeyPreference::Ed25519 => 0x03,
        }
    }

    /// The value of a wire byte; `None` for a byte this implementation does not know.
    pub fn from_u8(b: u8) -> Option<Self> {
        KeyPreference::ALL.iter().copied().find(|p| p.to_u8() == b)
    }

    /// The short name used in logs and `PROTOCOL.md`.
    pub fn name(self) -> &'static str {
        match self {
            KeyPreference::Rsa => "rsa",
            KeyPreference::Ecdsa => "ecdsa",
            KeyPreference::Ed25519 => "ed25519",
        }
    }
}

impl From<KeyPreference> for u8 {
    fn from(p: KeyPreference) -> u8 {
        p.to_u8()
    }
}

impl TryFrom<u8> for KeyPreference {
    /// The unknown byte.
    type Error = u8;

    fn try_from(b: u8) -> Result<Self, u8> {
        KeyPreference::from_u8(b).ok_or(b)
    }
}

impl fmt::Display for KeyPreference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Largest certificate a chain payload can carry: its length is a u24.
pub const MAX_CHAIN_CERT_LEN: usize = (1 << 24) - 1;
/// Length of the length prefix of each certificate of a chain payload.
const CHAIN_LEN_PREFIX: usize = 3;

/// Why a certificate chain payload could not be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// Fewer than 3 bytes left where a certificate length was due.
    #[error("truncated length")]
    TruncatedLength {
        /// Offset of the length in the payload.
        offset: usize,
    },
    /// A certificate runs past the end of the payload.
    #[error("truncated certificate")]
    TruncatedCertificate {
        /// Offset of the certificate's length in the payload.
        offset: usize,
        /// The length it announces.
        len: usize,
    },
    /// A certificate longer than [`MAX_CHAIN_CERT_LEN`] cannot be encoded.
    #[error("certificate too large")]
    CertificateTooLarge {
        /// Its length.
        len: usize,
    },
}

/// Encodes a get-certificate-chain reply payload: each certificate (leaf first) as
/// `u24 length ‖ DER`, concatenated, without an outer length. Fails, encoding nothing,
/// when a certificate is longer than [`MAX_CHAIN_CERT_LEN`].
pub fn encode_chain<I>(certs: I) -> Result<Bytes, ChainError>
where
    I: IntoIterator,
    I::Item: AsRef<[u8]>,
{
    let mut out = BytesMut::new();
    for der in certs {
        let der = der.as_ref();
        if der.len() > MAX_CHAIN_CERT_LEN {
            return Err(ChainError::CertificateTooLarge { len: der.len() });
        }
        // At most 2^24 - 1, checked above: fits the 3-byte prefix.
        out.put_uint(der.len() as u64, CHAIN_LEN_PREFIX);
        out.put_slice(der);
    }
    Ok(out.freeze())
}

/// Decodes a get-certificate-chain reply payload into its certificates (leaf first),
/// borrowed from `payload`. Never reads past the payload and allocates at most one
/// slice per 3 bytes of it; a truncated length or certificate is an error. The DER is
/// not parsed: that is the caller's to do.
pub fn decode_chain(payload: &[u8]) -> Result<Vec<&[u8]>, ChainError> {
    let mut certs = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let offset = payload.len() - rest.len();
        let [a, b, c, tail @ ..] = rest else {
            return Err(ChainError::TruncatedLength { offset });
        };
        let len = usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c);
        if tail.len() < len {
            return Err(ChainError::TruncatedCertificate { offset, len });
        }
        let (der, tail) = tail.split_at(len);
        certs.push(der);
        rest = tail;
    }
    Ok(certs)
}

/// Hash algorithm of a sign opcode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HashAlg {
    /// MD5 ‖ SHA-1 (36 bytes; TLS 1.0/1.1).
    Md5Sha1,
    /// SHA-1.
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// Digest length in bytes.
    #[allow(clippy::len_without_is_empty)] // a hash is never empty
    pub fn len(self) -> usize {
        match self {
            HashAlg::Md5Sha1 => 36,
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }
}

/// The kind of key an opcode needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// RSA PKCS#1 v1.5 signature.
    RsaPkcs1,
    /// RSA-PSS signature (salt = hash length).
    RsaPss,
    /// ECDSA signature (DER).
    Ecdsa,
    /// Ed25519 signature.
    Ed25519,
    /// Raw RSA private operation.
    RsaRaw,
}

impl Opcode {
    /// For a sign or decrypt opcode: the key kind it needs and its hash (none for
    /// Ed25519 and RSA decrypt). `None` for every other opcode.
    pub fn key_op(self) -> Option<(KeyKind, Option<HashAlg>)> {
        use HashAlg::*;
        use KeyKind::*;
        Some(match self {
            Opcode::RsaDecrypt => (RsaRaw, None),
            Opcode::RsaSignMd5Sha1 => (RsaPkcs1, Some(Md5Sha1)),
            Opcode::RsaSignSha1 => (RsaPkcs1, Some(Sha1)),
            Opcode::RsaSignSha224 => (RsaPkcs1, Some(Sha224)),
            Opcode::RsaSignSha256 => (RsaPkcs1, Some(Sha256)),
            Opcode::RsaSignSha384 => (RsaPkcs1, Some(Sha384)),
            Opcode::RsaSignSha512 => (RsaPkcs1, Some(Sha512)),
            Opcode::EcdsaSignMd5Sha1 => (Ecdsa, Some(Md5Sha1)),
            Opcode::EcdsaSignSha1 => (Ecdsa, Some(Sha1)),
            Opcode::EcdsaSignSha224 => (Ecdsa, Some(Sha224)),
            Opcode::EcdsaSignSha256 => (Ecdsa, Some(Sha256)),
            Opcode::EcdsaSignSha384 => (Ecdsa, Some(Sha384)),
            Opcode::EcdsaSignSha512 => (Ecdsa, Some(Sha512)),
            Opcode::Ed25519Sign => (Ed25519, None),
            Opcode::RsaPssSignSha256 => (RsaPss, Some(Sha256)),
            Opcode::RsaPssSignSha384 => (RsaPss, Some(Sha384)),
            Opcode::RsaPssSignSha512 => (RsaPss, Some(Sha512)),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_are_distinct() {
        for all in [
            Tag::ALL.iter().map(|t| t.to_u8()).collect::<Vec<_>>(),
            Opcode::ALL.iter().map(|t| t.to_u8()).collect(),
            ErrorCode::ALL.iter().map(|t| t.to_u8()).collect(),
        ] {
            let mut sorted = all.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), all.len(), "duplicate wire value");
        }
        for op in Opcode::ALL {
            assert_eq!(Opcode::from(op.to_u8()), *op);
        }
        assert_eq!(Opcode::from(0x99), Opcode::Unknown(0x99));
        assert_eq!(Opcode::Unknown(0x99).to_string(), "unknown(0x99)");
    }

    #[test]
    fn key_preferences_round_trip() {
        for p in KeyPreference::ALL {
            assert_eq!(KeyPreference::from_u8(p.to_u8()), Some(*p));
            assert_eq!(KeyPreference::try_from(u8::from(*p)), Ok(*p));
        }
        assert_eq!(KeyPreference::Rsa.to_u8(), 1);
        assert_eq!(KeyPreference::Ecdsa.to_u8(), 2);
        assert_eq!(KeyPreference::Ed25519.to_u8(), 3);
        assert_eq!(KeyPreference::from_u8(0), None);
        assert_eq!(KeyPreference::try_from(4), Err(4));
    }

    #[test]
    fn chain_encoding_is_u24_length_and_der() {
        let payload = encode_chain([&b"abc"[..], b"", b"de"]).unwrap();
        assert_eq!(&payload[..], b"\0\0\x03abc\0\0\0\0\0\x02de");
        assert_eq!(decode_chain(&payload).unwrap(), [&b"abc"[..], b"", b"de"]);
        assert_eq!(decode_chain(b"").unwrap(), Vec::<&[u8]>::new());
        let big = vec![0u8; MAX_CHAIN_CERT_LEN + 1];
        assert_eq!(
            encode_chain([&big]),
            Err(ChainError::CertificateTooLarge { len: big.len() })
        );
        assert!(encode_chain([&big[1..]]).is_ok());
    }

    #[test]
    fn malformed_chains_are_errors() {
        assert_eq!(
            decode_chain(b"\0\0"),
            Err(ChainError::TruncatedLength { offset: 0 })
        );
        assert_eq!(
            decode_chain(b"\0\0\x01a\0"),
            Err(ChainError::TruncatedLength { offset: 4 })
        );
        assert_eq!(
            decode_chain(b"\0\0\x01a\xff\xff\xffabc"),
            Err(ChainError::TruncatedCertificate {
                offset: 4,
                len: 0xff_ffff
            })
        );
        assert_eq!(
            ChainError::TruncatedLength { offset: 0 }.to_string(),
            "truncated length"
        );
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn chain_round_trip(certs in proptest::collection::vec(
                proptest::collection::vec(any::<u8>(), 0..300), 0..8)
            ) {
                let payload = encode_chain(&certs).unwrap();
                let decoded = decode_chain(&payload).unwrap();
                prop_assert_eq!(decoded, certs.iter().map(Vec::as_slice).collect::<Vec<_>>());
            }

            #[test]
            fn chain_garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
                if let Ok(certs) = decode_chain(&data) {
                    // What decodes re-encodes to the same bytes.
                    prop_assert_eq!(&encode_chain(certs).unwrap()[..], &data[..]);
                }
            }
        }
    }
}
