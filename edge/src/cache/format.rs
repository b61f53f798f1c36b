//! The pieces of the disk tier's file formats that both share (`KLC1` in
//! [`super::disk`], `KLC2` in [`super::blocks`]): the metadata section, its bounds and
//! decoder, and why a file is refused.

use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// Largest metadata section accepted.
pub(super) const MAX_META: usize = 1 << 20;
/// Most header fields (and, separately, Vary entries) accepted in one file.
pub(super) const MAX_FIELDS: u32 = 1000;
/// Why a stored file was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum FormatError {
    /// Reading the file failed.
    #[error("reading cache file: {0}")]
    Io(#[from] io::Error),
    /// The file does not start with the format's magic.
    #[error("bad magic (not a cache file, or another format version)")]
    Magic,
    /// The file ends before a field it announces.
    #[error("truncated cache file")]
    Truncated,
    /// The file's length does not match the lengths it declares.
    #[error("cache file length {actual} does not match the declared {declared}")]
    Length {
        /// What the file says.
        declared: u64,
        /// What is on disk.
        actual: u64,
    },
    /// A declared count or length exceeds its bound.
    #[error("cache file field {0} over its bound")]
    Bound(&'static str),
    /// A field holds an invalid value.
    #[error("invalid {0} in cache file")]
    Invalid(&'static str),
    /// The trailing checksum does not match.
    #[error("cache file checksum mismatch")]
    Checksum,
    /// The file holds another key than the one its name is derived from.
    #[error("cache file holds another key")]
    WrongKey,
}

/// Everything in a file but the body.
pub(crate) struct Meta {
    pub(super) key: String,
    pub(super) status: StatusCode,
    pub(super) request_time: SystemTime,
    pub(super) response_time: SystemTime,
    pub(super) headers: HeaderMap,
    pub(super) vary: Vec<(HeaderName, Option<HeaderValue>)>,
}

/// Mode of the tier's files: the edge's user only.
pub(super) const FILE_MODE: u32 = 0o600;

pub(super) fn put_bytes(out: &mut Vec<u8>, b: &[u8]) -> Result<(), FormatError> {
    let len = u32::try_from(b.len()).map_err(|_| FormatError::Bound("field length"))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(b);
    Ok(())
}

pub(super) fn put_time(out: &mut Vec<u8>, t: SystemTime) {
    let (sign, d) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (0u8, d),
        Err(e) => (1u8, e.duration()),
    };
    out.push(sign);
    out.extend_from_slice(&d.as_secs().to_le_bytes());
    out.extend_from_slice(&d.subsec_nanos().to_le_bytes());
}

/// A cursor over untrusted bytes: every read is bounds-checked.
pub(super) struct Reader<'a> {
    pub(super) buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let (a, b) = self.buf.split_at_checked(n).ok_or(FormatError::Truncated)?;
        self.buf = b;
        Ok(a)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        self.take(N)?.try_into().map_err(|_| FormatError::Truncated)
    }

    pub(super) fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.array::<1>()?[0])
    }

    pub(super) fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(super) fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(super) fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(super) fn bytes(&mut self) -> Result<&'a [u8], FormatError> {
        let n = self.u32()?;
        self.take(usize::try_from(n).map_err(|_| FormatError::Truncated)?)
    }

    pub(super) fn time(&mut self) -> Result<SystemTime, FormatError> {
        let sign = self.u8()?;
        let secs = self.u64()?;
        let nanos = self.u32()?;
        if nanos >= 1_000_000_000 {
            return Err(FormatError::Invalid("time"));
        }
        let d = Duration::new(secs, nanos);
        match sign {
            0 => UNIX_EPOCH.checked_add(d),
            1 => UNIX_EPOCH.checked_sub(d),
            _ => None,
        }
        .ok_or(FormatError::Invalid("time"))
    }
}

pub(super) fn decode_meta(buf: &[u8]) -> Result<Meta, FormatError> {
    let mut r = Reader { buf };
    let key = std::str::from_utf8(r.bytes()?)
        .map_err(|_| FormatError::Invalid("key"))?
        .to_owned();
    let status = StatusCode::from_u16(r.u16()?).map_err(|_| FormatError::Invalid("status"))?;
    let request_time = r.time()?;
    let response_time = r.time()?;
    let n = r.u32()?;
    if n > MAX_FIELDS {
        return Err(FormatError::Bound("header count"));
    }
    let mut headers = HeaderMap::new();
    for _ in 0..n {
        let name =
            HeaderName::from_bytes(r.bytes()?).map_err(|_| FormatError::Invalid("header name"))?;
        let value = HeaderValue::from_bytes(r.bytes()?)
            .map_err(|_| FormatError::Invalid("header value"))?;
        headers.append(name, value);
    }
    let n = r.u32()?;
    if n > MAX_FIELDS {
        return Err(FormatError::Bound("vary count"));
    }
    let mut vary = Vec::new();
    for _ in 0..n {
        let name =
            HeaderName::from_bytes(r.bytes()?).map_err(|_| FormatError::Invalid("vary name"))?;
        let value = match r.u8()? {
            0 => None,
            1 => Some(
                HeaderValue::from_bytes(r.bytes()?)
                    .map_err(|_| FormatError::Invalid("vary value"))?,
            ),
            _ => return Err(FormatError::Invalid("vary flag")),
        };
        vary.push((name, value));
    }
    if !r.buf.is_empty() {
        return Err(FormatError::Invalid("metadata length"));
    }
    Ok(Meta {
        key,
        status,
        request_time,
        response_time,
        headers,
        vary,
    })
}

/// An early end of file read as a truncated cache file.
pub(super) fn eof_truncated(e: io::Error) -> FormatError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        FormatError::Truncated
    } else {
        FormatError::Io(e)
    }
}
