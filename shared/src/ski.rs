//! Key identifiers: the protocol's SKI (SHA-1 of the public key bit string) and the
//! SPKI SHA-256 pin shown by tools.

use std::fmt;
use std::str::FromStr;

use ring::digest;
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

/// Subject key identifier as the protocol uses it: SHA-1 of the contents of the
/// SubjectPublicKey BIT STRING (RFC 5280 §4.2.1.2 method 1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ski(pub [u8; 20]);

impl Ski {
    /// Computes the SKI of a DER `SubjectPublicKeyInfo`.
    pub fn from_spki_der(
        spki_der: &[u8],
    ) -> Result<Ski, x509_parser::nom::Err<x509_parser::error::X509Error>> {
        let (_, spki) = SubjectPublicKeyInfo::from_der(spki_der)?;
        Ok(Ski::from_public_key_bits(&spki.subject_public_key.data))
    }

    /// Computes the SKI from the public key bit string's contents.
    pub fn from_public_key_bits(bits: &[u8]) -> Ski {
        let d = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, bits);
        let mut out = [0u8; 20];
        out.copy_from_slice(d.as_ref());
        Ski(out)
    }
}

/// Computes the SKI of a DER `SubjectPublicKeyInfo` (see [`Ski::from_spki_der`]).
pub fn ski_from_spki_der(spki_der: &[u8]) -> Option<Ski> {
    Ski::from_spki_der(spki_der).ok()
}

/// SHA-256 of a DER `SubjectPublicKeyInfo` (the usual public-key pin).
pub fn spki_sha256(spki_der: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, spki_der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl fmt::Display for Ski {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Ski {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ski({self})")
    }
}

impl FromStr for Ski {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let clean: String = s.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(clean).map_err(|_| "SKI is not hex")?;
        let arr = <[u8; 20]>::try_from(bytes.as_slice()).map_err(|_| "SKI is not 20 bytes")?;
        Ok(Ski(arr))
    }
}

impl<'de> serde::Deserialize<'de> for Ski {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let ski = Ski([0xab; 20]);
        assert_eq!(ski.to_string().parse::<Ski>().unwrap(), ski);
        assert!("abcd".parse::<Ski>().is_err());
        assert!("zz".repeat(20).parse::<Ski>().is_err());
    }
}
