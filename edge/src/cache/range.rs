//! TEMPORARY (replaced by the range module in progress).
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
/// Answer.
pub enum RangeAnswer {
    /// Full.
    Full,
    /// Partial.
    Partial {
        /// ct
        content_type: Option<HeaderValue>,
        /// cr
        content_range: Option<HeaderValue>,
        /// body
        body: Vec<Bytes>,
        /// len
        len: u64,
    },
    /// 416.
    Unsatisfiable {
        /// cr
        content_range: HeaderValue,
    },
}
/// Answer.
pub fn answer(_m: &Method, _r: &HeaderMap, _s: &HeaderMap, _b: &Bytes) -> RangeAnswer {
    RangeAnswer::Full
}
