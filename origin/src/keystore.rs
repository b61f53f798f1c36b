//! The keystore: every site key in `keys.dir`, indexed by SKI, and the certificate
//! chains that go with them, indexed by the names they cover (exact and `*.` wildcard).
//!
//! A keystore is immutable once loaded; a reload builds a new one and swaps it in, so
//! requests in flight finish with the key they started with.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use keyless_shared::{encode_chain, ChainError, DomainMap, KeyPreference, Ski};
use x509_parser::prelude::*;
use zeroize::Zeroizing;

use crate::config::{AclEntry, DefaultAcl, KeysConfig, PolicyEntry, StoreConfig, StoreKind};
use crate::keys::{Algorithm, KeyError, SiteKey};
use crate::metrics::{CertExpiry, Metrics, TokenHealth};
use crate::pkcs11::Token;

/// Size limit of a key or chain file.
const MAX_PEM_FILE: usize = 1 << 20;

/// Extensions of the files the keystore reads; others are ignored.
const PEM_EXTENSIONS: &[&str] = &["pem", "key", "crt", "cer", "cert"];

/// Why the keys directory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeystoreError {
    #[error("cannot read keys directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    PemSyntax { path: PathBuf, source: PemError },
    #[error("{path}: {source}")]
    Key { path: PathBuf, source: KeyError },
    #[error("{path}: certificate is not valid X.509: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("{path}: certificate is not valid X.509: {source}")]
    Chain { path: PathBuf, source: ChainError },
    #[error("PKCS#11 store: {0}")]
    Token(#[from] crate::pkcs11::TokenError),
}

/// A certificate chain, leaf first.
#[derive(Debug)]
pub(crate) struct Chain {
    /// DNS names the leaf covers (lowercase; `*.` wildcards kept as such).
    pub(crate) names: Vec<String>,
    /// Leaf `notAfter`, seconds since the epoch.
    pub(crate) not_after: i64,
    /// Wire form of the get-certificate-chain payload: `u24 length ‖ DER` per cert.
    pub(crate) encoded: Bytes,
}

/// A key with what belongs to it.
#[derive(Debug)]
pub(crate) struct KeyEntry {
    /// File stem of the key file (the name ACLs use).
    pub(crate) name: String,
    pub(crate) key: SiteKey,
    pub(crate) chain: Option<Chain>,
    /// Identities allowed to use the key; `None` = every authenticated client (a key
    /// with no ACL entry under `default_acl = "allow"`).
    pub(crate) allow: Option<Vec<String>>,
    /// `[[keys.policy]]`: whether the raw RSA private operation is allowed.
    pub(crate) allow_rsa_decrypt: bool,
    /// The token holding the key, for a key on a PKCS#11 token: its own threads run
    /// the key's operations.
    pub(crate) token: Option<Arc<Token>>,
}

impl KeyEntry {
    pub(crate) fn allows(&self, identity: &str) -> bool {
        self.allow
            .as_ref()
            .is_none_or(|ids| ids.iter().any(|id| id == identity))
    }
}

/// Whether a key of algorithm `a` is of the class a get-certificate-chain request
/// prefers.
fn prefers(pref: KeyPreference, a: Algorithm) -> bool {
    matches!(
        (pref, a),
        (KeyPreference::Rsa, Algorithm::Rsa { .. })
            | (
                KeyPreference::Ecdsa,
                Algorithm::EcdsaP256 | Algorithm::EcdsaP384
            )
            | (KeyPreference::Ed25519, Algorithm::Ed25519)
    )
}

/// Default preference when the request states none: ECDSA, then Ed25519, then RSA.
const DEFAULT_PREFERENCE: &[KeyPreference] = &[
    KeyPreference::Ecdsa,
    KeyPreference::Ed25519,
    KeyPreference::Rsa,
];

#[derive(Debug, Default)]
pub(crate) struct Keystore {
    keys: HashMap<Ski, Arc<KeyEntry>>,
    /// The keys whose certificate covers a name, in load order.
    by_name: DomainMap<Vec<Ski>>,
}

impl Keystore {
    /// Loads every PEM file of `keys.dir` and applies its ACL and policy. Any unreadable
    /// file fails the whole load, so a reload never half-applies.
    pub(crate) fn load(config: &KeysConfig) -> Result<Keystore, KeystoreError> {
        let paths = pem_paths(&config.dir)?;
        let (keys, mut chains) = read_keys_and_chains(&paths)?;
        let mut store = Keystore::default();
        for (name, path, key) in keys {
            let ski = key.ski;
            if store.keys.contains_key(&ski) {
                tracing::warn!(path = %path.display(), %ski, "keystore: duplicate key ignored");
                continue;
            }
            let chain = chains.remove(&ski);
            if chain.is_none() {
                tracing::info!(path = %path.display(), %ski, "keystore: key has no certificate; usable by SKI only");
            }
            store.insert(entry(config, name, key, chain));
        }
        for config_store in &config.store {
            store.load_token(config, config_store, &mut chains)?;
        }
        for (ski, _) in chains {
            tracing::warn!(%ski, "keystore: certificate without its private key is not served");
        }
        store.warn_unused_entries(config);
        Ok(store)
    }

    /// Adds the private keys of a PKCS#11 token, each with its chain from `keys.dir`
    /// (matched by public key) or else the certificate stored on the token.
    fn load_token(
        &mut self,
        config: &KeysConfig,
        token: &StoreConfig,
        chains: &mut HashMap<Ski, Chain>,
    ) -> Result<(), KeystoreError> {
        let found = match token.kind {
            StoreKind::Pkcs11 => Token::load(token)?,
        };
        if found.is_empty() {
            tracing::warn!(uri = %token.uri.split('?').next().unwrap_or(""), "keystore: the PKCS#11 URI selects no private key");
        }
        for key in found {
            let ski = key.ski;
            if self.keys.contains_key(&ski) {
                tracing::warn!(label = %key.label, %ski, "keystore: duplicate key on a token ignored");
                continue;
            }
            let origin = PathBuf::from(format!("token key {}", key.label));
            let chain = match chains.remove(&ski) {
                Some(chain) => Some(chain),
                None => key
                    .certificates
                    .first()
                    .map(|der| parse_chain(&origin, std::slice::from_ref(der)))
                    .transpose()?
                    .map(|(_, chain)| chain),
            };
            if chain.is_none() {
                tracing::info!(label = %key.label, %ski, "keystore: token key has no certificate; usable by SKI only");
            }
            let name = key.label.clone();
            let token = key.key.token().clone();
            let site_key = SiteKey::held(ski, key.algorithm, Box::new(key.key));
            let mut entry = entry(config, name, site_key, chain);
            entry.token = Some(token);
            self.insert(entry);
        }
        Ok(())
    }

    /// Files `entry` by SKI and by the names its certificate covers.
    fn insert(&mut self, entry: KeyEntry) {
        let ski = entry.key.ski;
        if let Some(chain) = &entry.chain {
            for n in &chain.names {
                self.by_name.entry(n).or_default().push(ski);
            }
        }
        self.keys.insert(ski, Arc::new(entry));
    }

    /// Warns about ACL and policy entries that name no loaded key (a typo, or a key
    /// that failed to be added).
    fn warn_unused_entries(&self, config: &KeysConfig) {
        let names_a_key = |key: &Option<String>, ski: &Option<Ski>| {
            self.keys
                .values()
                .any(|k| key.as_deref() == Some(k.name.as_str()) || *ski == Some(k.key.ski))
        };
        for entry in &config.acl {
            if !names_a_key(&entry.key, &entry.ski) {
                tracing::warn!(key = ?entry.key, ski = ?entry.ski, "acl entry names no loaded key");
            }
        }
        for entry in &config.policy {
            if !names_a_key(&entry.key, &entry.ski) {
                tracing::warn!(key = ?entry.key, ski = ?entry.ski, "policy entry names no loaded key");
            }
        }
    }

    pub(crate) fn get(&self, ski: &Ski) -> Option<&Arc<KeyEntry>> {
        self.keys.get(ski)
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    pub(crate) fn entries(&self) -> impl Iterator<Item = &Arc<KeyEntry>> {
        self.keys.values()
    }

    /// Gives `metrics` this keystore's state (once it is installed): the number of
    /// keys, each token once, and each certificate's expiry.
    pub(crate) fn report(&self, metrics: &Metrics) {
        let mut tokens: Vec<&Arc<Token>> = Vec::new();
        for t in self.entries().filter_map(|e| e.token.as_ref()) {
            if !tokens.iter().any(|seen| Arc::ptr_eq(seen, t)) {
                tokens.push(t);
            }
        }
        let tokens = tokens
            .into_iter()
            .map(|t| Arc::downgrade(t) as std::sync::Weak<dyn TokenHealth>)
            .collect();
        let certs = self.entries().filter_map(|e| {
            e.chain.as_ref().map(|chain| CertExpiry {
                key: e.name.clone(),
                ski: e.key.ski.to_string(),
                not_after: chain.not_after,
            })
        });
        metrics.keystore(self.len(), tokens, certs);
    }

    /// The key whose certificate covers `sni` (exact names before wildcards), picked by
    /// `preference` (or ECDSA, Ed25519, RSA when empty) among the keys of the client's
    /// group (`in_group`) that `identity` may use: a key the client may not use is never
    /// chosen. When none qualifies, a key of the group refused by its ACL makes the
    /// answer `NotAuthorized`, else a key outside the group `NotInGroup`.
    pub(crate) fn by_name(
        &self,
        sni: &str,
        preference: &[KeyPreference],
        identity: &str,
        in_group: impl Fn(&KeyEntry) -> bool,
    ) -> NameLookup<'_> {
        let preference = if preference.is_empty() {
            DEFAULT_PREFERENCE
        } else {
            preference
        };
        let mut refused = false;
        let mut outside = false;
        for candidates in self.by_name.matches(sni) {
            for pref in preference {
                for entry in candidates.iter().filter_map(|ski| self.keys.get(ski)) {
                    if !prefers(*pref, entry.key.algorithm) {
                        continue;
                    }
                    if !in_group(entry) {
                        outside = true;
                    } else if entry.allows(identity) {
                        return NameLookup::Found(entry);
                    } else {
                        refused = true;
                    }
                }
            }
        }
        if refused {
            NameLookup::NotAuthorized
        } else if outside {
            NameLookup::NotInGroup
        } else {
            NameLookup::NotFound
        }
    }
}

/// What [`Keystore::by_name`] found.
#[derive(Debug)]
pub(crate) enum NameLookup<'a> {
    Found(&'a Arc<KeyEntry>),
    /// Keys of the client's group cover the name, but the client may use none of them.
    NotAuthorized,
    /// Only keys outside the client's group cover the name.
    NotInGroup,
    NotFound,
}

/// The key and chain files of `dir` (by extension, hidden files skipped), sorted.
fn pem_paths(dir: &Path) -> Result<Vec<PathBuf>, KeystoreError> {
    let dir_err = |source| KeystoreError::Dir {
        path: dir.to_owned(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(dir_err)? {
        let entry = entry.map_err(dir_err)?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        let ext_ok = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| PEM_EXTENSIONS.contains(&e));
        if !hidden && ext_ok && path.is_file() {
            paths.push(path);
        } else {
            tracing::debug!(path = %path.display(), "keystore: ignoring file");
        }
    }
    paths.sort();
    Ok(paths)
}

/// A private key read from a file: the file stem (the key's name), the path, the key.
type LoadedKey = (String, PathBuf, SiteKey);

/// Every private key of `paths`, in order, and the first chain found for each key.
fn read_keys_and_chains(
    paths: &[PathBuf],
) -> Result<(Vec<LoadedKey>, HashMap<Ski, Chain>), KeystoreError> {
    let mut keys = Vec::new();
    let mut chain_files: Vec<(&PathBuf, Vec<Vec<u8>>)> = Vec::new();
    for path in paths {
        let (file_keys, file_certs) = read_pem_file(path)?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        for der in file_keys {
            let key = SiteKey::from_der(&der).map_err(|source| KeystoreError::Key {
                path: path.clone(),
                source,
            })?;
            keys.push((stem.clone(), path.clone(), key));
        }
        if !file_certs.is_empty() {
            chain_files.push((path, file_certs));
        }
    }

    let mut chains: HashMap<Ski, Chain> = HashMap::new();
    for (path, certs) in chain_files {
        let (ski, chain) = parse_chain(path, &certs)?;
        if chains.contains_key(&ski) {
            tracing::warn!(path = %path.display(), %ski, "keystore: second chain for the same key ignored");
            continue;
        }
        chains.insert(ski, chain);
    }
    Ok((keys, chains))
}

/// A key with its chain, its ACL (or the default one) and its policy.
fn entry(config: &KeysConfig, name: String, key: SiteKey, chain: Option<Chain>) -> KeyEntry {
    let ski = key.ski;
    let allow = acl_for(&config.acl, &name, ski).or(match config.default_acl {
        DefaultAcl::Allow => None,
        DefaultAcl::Deny => Some(Vec::new()),
    });
    let allow_rsa_decrypt = policy_for(&config.policy, &name, ski).any(|p| p.allow_rsa_decrypt)
        && matches!(key.algorithm, Algorithm::Rsa { .. });
    tracing::info!(
        key = %name,
        %ski,
        algorithm = %key.algorithm.name(),
        names = ?chain.as_ref().map(|c| c.names.as_slice()).unwrap_or_default(),
        acl = ?allow,
        allow_rsa_decrypt,
        "keystore: key loaded"
    );
    KeyEntry {
        name,
        key,
        chain,
        allow,
        allow_rsa_decrypt,
        token: None,
    }
}

fn acl_for(acl: &[AclEntry], name: &str, ski: Ski) -> Option<Vec<String>> {
    let ids: Vec<String> = acl
        .iter()
        .filter(|e| e.key.as_deref() == Some(name) || e.ski == Some(ski))
        .flat_map(|e| e.allow.iter().cloned())
        .collect();
    let listed = acl
        .iter()
        .any(|e| e.key.as_deref() == Some(name) || e.ski == Some(ski));
    listed.then_some(ids)
}

fn policy_for<'a>(
    policy: &'a [PolicyEntry],
    name: &'a str,
    ski: Ski,
) -> impl Iterator<Item = &'a PolicyEntry> + 'a {
    policy
        .iter()
        .filter(move |e| e.key.as_deref() == Some(name) || e.ski == Some(ski))
}

type PemContents = (Vec<Zeroizing<Vec<u8>>>, Vec<Vec<u8>>);

/// Reads the private keys and certificates of a PEM file. Every buffer that holds key
/// bytes (the file, the base64 text, the DER) is zeroized when dropped: the file is
/// decoded here rather than by a general PEM reader, whose line and base64 buffers
/// would be freed with the key still in them.
fn read_pem_file(path: &Path) -> Result<PemContents, KeystoreError> {
    let data = Zeroizing::new(std::fs::read(path).map_err(|source| KeystoreError::Read {
        path: path.to_owned(),
        source,
    })?);
    let pem_err = |message: String| KeystoreError::Pem {
        path: path.to_owned(),
        message,
    };
    if data.len() > MAX_PEM_FILE {
        return Err(pem_err(format!(
            "{} bytes: larger than any key or chain file ({MAX_PEM_FILE} bytes at most)",
            data.len()
        )));
    }
    if data.windows(9).any(|w| w == b"ENCRYPTED") {
        return Err(pem_err(
            "encrypted private keys are not supported; store the key unencrypted with mode 0600"
                .into(),
        ));
    }
    let mut keys = Vec::new();
    let mut certs = Vec::new();
    let sections = pem_sections(&data).map_err(|source| KeystoreError::PemSyntax {
        path: path.to_owned(),
        source,
    })?;
    for section in sections {
        let (label, der) = section;
        match label {
            "PRIVATE KEY" | "RSA PRIVATE KEY" | "EC PRIVATE KEY" => keys.push(der),
            "CERTIFICATE" => certs.push(der.to_vec()),
            _ => {}
        }
    }
    if keys.is_empty() && certs.is_empty() {
        return Err(pem_err("holds no PEM private key or certificate".into()));
    }
    Ok((keys, certs))
}

/// Why the PEM text of a file does not split into sections.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PemError {
    #[error("line {line}: not text")]
    NotText { line: usize },
    #[error("line {line}: END {end} closes BEGIN {begin}")]
    MismatchedEnd {
        line: usize,
        end: String,
        begin: String,
    },
    #[error("line {line}: BEGIN inside a section")]
    NestedBegin { line: usize },
    // No cause: the base64 text is key material, and OpenSSL's error adds nothing.
    #[error("section {label}: invalid base64")]
    Base64 { label: String },
    #[error("section {label} has no END line")]
    NoEnd { label: String },
}

/// A PEM section's label and decoded bytes.
type PemSection<'a> = (&'a str, Zeroizing<Vec<u8>>);

/// The `-----BEGIN L-----` … `-----END L-----` sections of `data`: label and decoded
/// bytes. Text outside sections is ignored; a section without its end, with another
/// label at its end, or with invalid base64 is an error.
fn pem_sections(data: &[u8]) -> Result<Vec<PemSection<'_>>, PemError> {
    let mut out = Vec::new();
    let mut open: Option<(&str, Zeroizing<String>)> = None;
    for (n, raw) in data.split(|b| *b == b'\n').enumerate() {
        let line = std::str::from_utf8(raw)
            .map_err(|_| PemError::NotText { line: n + 1 })?
            .trim();
        let marker = |prefix: &str| {
            line.strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix("-----"))
        };
        match (&mut open, marker("-----BEGIN "), marker("-----END ")) {
            (None, Some(label), _) => {
                // Room for the whole file: the base64 text never reallocates, so no
                // copy of it is left behind unzeroized.
                open = Some((label, Zeroizing::new(String::with_capacity(data.len()))));
            }
            (None, _, _) => {}
            (Some((label, _)), _, Some(end)) => {
                if end != *label {
                    return Err(PemError::MismatchedEnd {
                        line: n + 1,
                        end: end.to_owned(),
                        begin: (*label).to_owned(),
                    });
                }
                if let Some((label, b64)) = open.take() {
                    let der = openssl::base64::decode_block(&b64)
                        .map(Zeroizing::new)
                        .map_err(|_| PemError::Base64 {
                            label: label.to_owned(),
                        })?;
                    out.push((label, der));
                }
            }
            (Some(_), Some(_), _) => return Err(PemError::NestedBegin { line: n + 1 }),
            (Some((_, b64)), None, None) => b64.push_str(line),
        }
    }
    if let Some((label, _)) = open {
        return Err(PemError::NoEnd {
            label: label.to_owned(),
        });
    }
    Ok(out)
}

fn parse_chain(path: &Path, certs: &[Vec<u8>]) -> Result<(Ski, Chain), KeystoreError> {
    let cert_err = |message: String| KeystoreError::Cert {
        path: path.to_owned(),
        message,
    };
    let leaf_der = certs
        .first()
        .ok_or_else(|| cert_err("empty chain".into()))?;
    let (_, leaf) = X509Certificate::from_der(leaf_der).map_err(|e| cert_err(e.to_string()))?;
    let ski = Ski::from_public_key_bits(&leaf.public_key().subject_public_key.data);
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for gn in &san.value.general_names {
            if let GeneralName::DNSName(n) = gn {
                names.push(n.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in leaf.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                names.push(cn.to_ascii_lowercase());
            }
        }
    }
    for der in certs {
        X509Certificate::from_der(der).map_err(|e| cert_err(e.to_string()))?;
    }
    let encoded = encode_chain(certs).map_err(|source| KeystoreError::Chain {
        path: path.to_owned(),
        source,
    })?;
    Ok((
        ski,
        Chain {
            names,
            not_after: leaf.validity().not_after.timestamp(),
            encoded,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_sections_decode_keys_and_certificates_and_skip_the_rest() {
        let text = b"junk before\n-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\r\n\
-----BEGIN PRIVATE KEY-----\r\nAAEC\r\nAwQF\r\n-----END PRIVATE KEY-----\n";
        let sections = pem_sections(text).unwrap();
        assert_eq!(sections.len(), 2);
        assert_eq!(sections[0].0, "EC PARAMETERS");
        assert_eq!(sections[1].0, "PRIVATE KEY");
        assert_eq!(sections[1].1.as_slice(), &[0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn pem_sections_refuse_broken_sections() {
        for bad in [
            &b"-----BEGIN PRIVATE KEY-----\nAAEC\n"[..],
            b"-----BEGIN PRIVATE KEY-----\nAAEC\n-----END CERTIFICATE-----\n",
            b"-----BEGIN PRIVATE KEY-----\n-----BEGIN PRIVATE KEY-----\n",
            b"-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n",
            b"-----BEGIN PRIVATE KEY-----\n\xff\n-----END PRIVATE KEY-----\n",
        ] {
            assert!(
                pem_sections(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
