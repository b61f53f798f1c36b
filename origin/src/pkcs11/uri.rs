//! PKCS#11 URIs (RFC 7512) naming the keys of a `[[keys.store]]`: which module, which
//! token, which objects, and where the PIN comes from.
//!
//! ```text
//! pkcs11:token=sites;object=example.com;id=%01?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/keyless/hsm.pin
//! ```
//!
//! Path attributes: `token` (the token label, required), `object` (a key label) and
//! `id` (the `CKA_ID` bytes, percent-encoded); without `object` and `id` every private
//! key of the token is used. `type`, if given, must be `private`. Query attributes:
//! `module-path` (required), `pin-source` = `file:/path` (RFC 7512) or `env:NAME` (an
//! environment variable: our extension). An inline `pin-value` is refused: a URI ends
//! up in configuration files, process listings and logs.

use std::fmt;
use std::path::PathBuf;

/// Where the token's user PIN comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PinSource {
    /// A file holding the PIN (one line; a trailing newline is dropped).
    File(PathBuf),
    /// An environment variable of the key server's process.
    Env(String),
}

/// A parsed `pkcs11:` URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Pkcs11Uri {
    pub(crate) token: String,
    pub(crate) object: Option<String>,
    pub(crate) id: Option<Vec<u8>>,
    pub(crate) module_path: PathBuf,
    pub(crate) pin: PinSource,
}

/// Why a URI was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("PKCS#11 URI: {0}")]
pub(crate) struct UriError(String);

fn err(s: impl Into<String>) -> UriError {
    UriError(s.into())
}

impl Pkcs11Uri {
    pub(crate) fn parse(text: &str) -> Result<Pkcs11Uri, UriError> {
        let rest = text
            .strip_prefix("pkcs11:")
            .ok_or_else(|| err("must start with \"pkcs11:\""))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut token = None;
        let mut object = None;
        let mut id = None;
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| err(format!("path attribute {attr:?} has no value")))?;
            let value = decode(value)?;
            match name {
                "token" => token = Some(utf8(value, "token")?),
                "object" => object = Some(utf8(value, "object")?),
                "id" => id = Some(value),
                "type" if value == b"private" => {}
                "type" => return Err(err("type must be \"private\" (the key to sign with)")),
                // Selecting by manufacturer, model, serial or slot is not needed to
                // find a token by label; refuse rather than ignore them.
                other => return Err(err(format!("unsupported path attribute {other:?}"))),
            }
        }
        let mut module_path = None;
        let mut pin = None;
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| err(format!("query attribute {attr:?} has no value")))?;
            let value = utf8(decode(value)?, name)?;
            match name {
                "module-path" => module_path = Some(PathBuf::from(value)),
                "pin-source" => pin = Some(pin_source(&value)?),
                "pin-value" => {
                    return Err(err(
                        "an inline pin-value is refused (URIs end up in logs); use \
                         pin-source=file:/path or pin-source=env:NAME",
                    ))
                }
                other => return Err(err(format!("unsupported query attribute {other:?}"))),
            }
        }
        Ok(Pkcs11Uri {
            token: token.ok_or_else(|| err("token=LABEL is required"))?,
            object,
            id,
            module_path: module_path
                .ok_or_else(|| err("module-path=/path/to/module.so is required"))?,
            pin: pin.ok_or_else(|| err("pin-source=file:/path or env:NAME is required"))?,
        })
    }
}

impl fmt::Display for Pkcs11Uri {
    /// The URI without its PIN source, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pkcs11:token={}", keyless_shared::log_safe(&self.token))?;
        if let Some(o) = &self.object {
            write!(f, ";object={}", keyless_shared::log_safe(o))?;
        }
        if let Some(id) = &self.id {
            write!(
                f,
                ";id={}",
                id.iter().map(|b| format!("%{b:02x}")).collect::<String>()
            )?;
        }
        Ok(())
    }
}

fn pin_source(value: &str) -> Result<PinSource, UriError> {
    if let Some(path) = value.strip_prefix("file:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err(err("pin-source=file: needs a path"));
        }
        return Ok(PinSource::File(PathBuf::from(path)));
    }
    if let Some(name) = value.strip_prefix("env:") {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(err("pin-source=env:NAME needs a variable name"));
        }
        return Ok(PinSource::Env(name.to_owned()));
    }
    Err(err("pin-source must be file:/path or env:NAME"))
}

/// Percent-decodes a URI attribute value.
fn decode(s: &str) -> Result<Vec<u8>, UriError> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let hex = [bytes.next(), bytes.next()];
        let [Some(h), Some(l)] = hex else {
            return Err(err(format!("bad percent escape in {s:?}")));
        };
        let byte = std::str::from_utf8(&[h, l])
            .ok()
            .and_then(|x| u8::from_str_radix(x, 16).ok())
            .ok_or_else(|| err(format!("bad percent escape in {s:?}")))?;
        out.push(byte);
    }
    Ok(out)
}

fn utf8(v: Vec<u8>, what: &str) -> Result<String, UriError> {
    String::from_utf8(v).map_err(|_| err(format!("{what} is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_uri() {
        let u = Pkcs11Uri::parse(
            "pkcs11:token=sites;object=example.com%20ecdsa;id=%01%ff;type=private\
             ?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/k/pin",
        )
        .unwrap();
        assert_eq!(u.token, "sites");
        assert_eq!(u.object.as_deref(), Some("example.com ecdsa"));
        assert_eq!(u.id, Some(vec![1, 0xff]));
        assert_eq!(
            u.module_path,
            PathBuf::from("/usr/lib/softhsm/libsofthsm2.so")
        );
        assert_eq!(u.pin, PinSource::File("/etc/k/pin".into()));
        // Shown escaped: log_safe quotes a value with a space.
        assert_eq!(
            u.to_string(),
            "pkcs11:token=sites;object=\"example.com ecdsa\";id=%01%ff"
        );
    }

    #[test]
    fn a_whole_token_with_the_pin_in_the_environment() {
        let u =
            Pkcs11Uri::parse("pkcs11:token=t?module-path=/m.so&pin-source=env:HSM_PIN").unwrap();
        assert_eq!(u.object, None);
        assert_eq!(u.id, None);
        assert_eq!(u.pin, PinSource::Env("HSM_PIN".into()));
    }

    #[test]
    fn refusals_say_why() {
        for (uri, why) in [
            ("token=t", "pkcs11:"),
            ("pkcs11:object=o?module-path=/m&pin-source=env:P", "token"),
            ("pkcs11:token=t?pin-source=env:P", "module-path"),
            ("pkcs11:token=t?module-path=/m", "pin-source"),
            (
                "pkcs11:token=t?module-path=/m&pin-value=1234",
                "inline pin-value",
            ),
            (
                "pkcs11:token=t;type=cert?module-path=/m&pin-source=env:P",
                "private",
            ),
            (
                "pkcs11:token=t;slot-id=1?module-path=/m&pin-source=env:P",
                "unsupported",
            ),
            (
                "pkcs11:token=t;id=%zz?module-path=/m&pin-source=env:P",
                "percent",
            ),
            (
                "pkcs11:token=t?module-path=/m&pin-source=http://x",
                "file:/path or env",
            ),
        ] {
            let e = Pkcs11Uri::parse(uri).unwrap_err().to_string();
            assert!(e.contains(why), "{uri}: {e}");
        }
    }
}
