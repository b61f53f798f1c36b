//! TEMPORARY (replaced by the disk module in progress).
use super::object::CachedObject;
/// D.
pub struct DiskTier;
impl DiskTier {
    /// o
    pub fn open(_d: &std::path::Path, _m: u64) -> std::io::Result<DiskTier> {
        Ok(DiskTier)
    }
    /// g
    pub async fn get(&self, _k: &str) -> Option<CachedObject> {
        None
    }
    /// p
    pub async fn put(&self, _o: &CachedObject) {}
    /// r
    pub fn remove(&self, _k: &str) -> bool {
        false
    }
    /// r
    pub fn remove_matching(&self, _p: &dyn Fn(&str) -> bool) -> usize {
        0
    }
    /// r
    pub fn remove_tag(&self, _t: &str) -> usize {
        0
    }
    /// b
    pub fn bytes(&self) -> u64 {
        0
    }
    /// l
    pub fn len(&self) -> usize {
        0
    }
    /// e
    pub fn evictions(&self) -> u64 {
        0
    }
}
