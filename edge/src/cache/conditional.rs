//! TEMPORARY (replaced by the conditional module in progress).
use http::{HeaderMap, Method};
/// P.
pub enum Precondition {
    /// a
    Proceed,
    /// b
    NotModified,
    /// c
    Failed,
}
/// E.
pub fn evaluate(_m: &Method, _r: &HeaderMap, _s: &HeaderMap) -> Precondition {
    Precondition::Proceed
}
/// H.
pub fn not_modified_headers(s: &HeaderMap) -> HeaderMap {
    s.clone()
}
