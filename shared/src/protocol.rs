//! The numbers of the Keyless protocol v1: tags, opcodes and error codes.
//!
//! Values below 0x40 are the reference protocol's; 0x40 and above (and error codes from
//! 0x80) are keyless extensions that a reference peer ignores or reports as unknown.

use std::fmt;

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
    }
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
}
