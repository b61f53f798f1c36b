//! The enrollment state in `state_dir` (`ENROLL.md`): bootstrap tokens (`tokens.json`,
//! hashes only), enrolled edges (`edges.json`) and revoked edges (`revoked.json`).
//!
//! The files are shared by the running key server and the `token` / `edges` commands:
//! every read-modify-write holds an exclusive `flock` on `<state_dir>/.lock`, and every
//! write goes to a temporary file that is fsynced and renamed over the old one (then the
//! directory is fsynced), so a reader sees the old or the new file, never half of one,
//! and a crash loses no acknowledged update. The key server re-reads `tokens.json` on
//! each enrollment, so tokens created after it started are seen at once.

use std::collections::HashSet;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyless_shared::enroll::{Token, SECRET_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Mode of the state directory and its files: they name every edge and token.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;
/// Size limit of a state file read into memory.
const MAX_STATE_FILE: u64 = 64 << 20;

pub(crate) const TOKENS_FILE: &str = "tokens.json";
pub(crate) const EDGES_FILE: &str = "edges.json";
pub(crate) const REVOKED_FILE: &str = "revoked.json";

/// Why the state could not be read or written; each names its file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum StateError {
    #[error("state {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("state {path}: not valid: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0}")]
    Refused(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Seconds since the Unix epoch, now.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Replaces `path` atomically with `contents`: written to `.<name>.tmp` beside it with
/// `mode`, fsynced, renamed over `path`, then the directory fsynced. A reader sees the
/// old file or the new one, never half of one, and a crash loses no completed write.
/// The error names the file that failed.
pub(crate) fn replace_file(
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), (PathBuf, io::Error)> {
    let fail = |p: &Path| {
        let p = p.to_owned();
        move |e| (p, e)
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        (
            path.to_owned(),
            io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
        )
    })?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    // A leftover from a crash is replaced: it was never renamed into place.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err((tmp, e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(fail(&tmp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(fail(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(fail(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail(dir))
}

/// A token's record: never the secret, only its SHA-256.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenRecord {
    pub(crate) id: String,
    /// SHA-256 of the secret, hex.
    pub(crate) secret_sha256: String,
    pub(crate) group: String,
    /// The only edge id the token may enroll, when bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) edge_id: Option<String>,
    /// Seconds since the Unix epoch.
    pub(crate) created: u64,
    pub(crate) expires: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) used: Option<TokenUse>,
    /// When the token was revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) revoked: Option<u64>,
}

/// When and by which edge a token was used.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenUse {
    pub(crate) at: u64,
    pub(crate) edge_id: String,
}

impl TokenRecord {
    /// `active`, `used`, `revoked` or `expired`, at `now`.
    pub(crate) fn status(&self, now: u64) -> &'static str {
        if self.revoked.is_some() {
            "revoked"
        } else if self.used.is_some() {
            "used"
        } else if now >= self.expires {
            "expired"
        } else {
            "active"
        }
    }
}

/// An enrolled edge (`edges.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct EdgeRecord {
    pub(crate) group: String,
    pub(crate) edge_id: String,
    /// Serial of its latest certificate, hex.
    pub(crate) serial: String,
    /// End of its latest certificate, seconds since the Unix epoch.
    pub(crate) not_after: u64,
    /// First enrollment (with a token).
    pub(crate) enrolled: u64,
    /// Latest enrollment or renewal.
    pub(crate) last_seen: u64,
}

/// A revoked edge (`revoked.json`): in one group, or in every group when `group` is
/// absent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct RevokedRecord {
    pub(crate) edge_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) group: Option<String>,
    pub(crate) revoked_at: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: Vec<TokenRecord>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EdgesFile {
    edges: Vec<EdgeRecord>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokedFile {
    revoked: Vec<RevokedRecord>,
}

/// The revoked edges, for lookups.
#[derive(Debug, Default)]
pub(crate) struct RevokedSet {
    /// (group or `None` for every group, edge id).
    entries: HashSet<(Option<String>, String)>,
}

impl RevokedSet {
    pub(crate) fn contains(&self, group: &str, edge_id: &str) -> bool {
        self.entries.contains(&(None, edge_id.to_owned()))
            || self
                .entries
                .contains(&(Some(group.to_owned()), edge_id.to_owned()))
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// An exclusive hold on the state directory; released on drop (the lock file closes).
#[derive(Debug)]
pub(crate) struct StateLock {
    _file: File,
}

/// The state directory.
#[derive(Clone, Debug)]
pub(crate) struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub(crate) fn new(dir: &Path) -> StateDir {
        StateDir {
            dir: dir.to_owned(),
        }
    }

    pub(crate) fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Creates the directory (mode 0700) if it is missing.
    pub(crate) fn ensure(&self) -> Result<(), StateError> {
        match DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&self.dir)
        {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && self.dir.is_dir() => Ok(()),
            Err(e) => Err(io_err(&self.dir)(e)),
        }
    }

    /// Waits for the exclusive lock on the state (blocking: call from a blocking
    /// thread in async code).
    pub(crate) fn lock(&self) -> Result<StateLock, StateError> {
        self.ensure()?;
        let path = self.path(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(io_err(&path))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_err(&path)(e.into()))?;
        Ok(StateLock { _file: file })
    }

    fn read<T: DeserializeOwned + Default>(&self, name: &str) -> Result<T, StateError> {
        let path = self.path(name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(T::default()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let len = file.metadata().map_err(io_err(&path))?.len();
        if len > MAX_STATE_FILE {
            return Err(StateError::Invalid {
                path,
                message: format!("{len} bytes, more than {MAX_STATE_FILE}"),
            });
        }
        serde_json::from_reader(io::BufReader::new(file)).map_err(|e| StateError::Invalid {
            path,
            message: e.to_string(),
        })
    }

    /// Replaces `name` atomically with `value` as JSON (temporary file, fsync, rename,
    /// fsync of the directory), mode 0600.
    fn write<T: Serialize>(
        &self,
        name: &str,
        value: &T,
        _lock: &StateLock,
    ) -> Result<(), StateError> {
        let path = self.path(name);
        let mut text = serde_json::to_vec_pretty(value).map_err(|e| StateError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        text.push(b'\n');
        replace_file(&path, &text, FILE_MODE)
            .map_err(|(path, source)| StateError::Io { path, source })
    }

    pub(crate) fn tokens(&self) -> Result<Vec<TokenRecord>, StateError> {
        Ok(self.read::<TokensFile>(TOKENS_FILE)?.tokens)
    }

    pub(crate) fn write_tokens(
        &self,
        tokens: Vec<TokenRecord>,
        lock: &StateLock,
    ) -> Result<(), StateError> {
        self.write(TOKENS_FILE, &TokensFile { tokens }, lock)
    }

    pub(crate) fn edges(&self) -> Result<Vec<EdgeRecord>, StateError> {
        Ok(self.read::<EdgesFile>(EDGES_FILE)?.edges)
    }

    pub(crate) fn revoked(&self) -> Result<Vec<RevokedRecord>, StateError> {
        Ok(self.read::<RevokedFile>(REVOKED_FILE)?.revoked)
    }

    pub(crate) fn revoked_set(&self) -> Result<RevokedSet, StateError> {
        Ok(RevokedSet {
            entries: self
                .revoked()?
                .into_iter()
                .map(|r| (r.group, r.edge_id))
                .collect(),
        })
    }

    /// Creates a token for `group` valid for `ttl`, optionally bound to `edge_id`;
    /// returns it (the only time its secret exists outside the operator's hands).
    pub(crate) fn create_token(
        &self,
        group: &str,
        ttl: Duration,
        edge_id: Option<&str>,
    ) -> Result<(Token, TokenRecord), StateError> {
        let lock = self.lock()?;
        let mut tokens = self.tokens()?;
        let rng = SystemRandom::new();
        let mut secret = vec![0u8; SECRET_LEN];
        let mut id = [0u8; 8];
        let fail = |_| StateError::Refused("the system random number generator failed".into());
        rng.fill(&mut secret).map_err(fail)?;
        // 64 random bits: a collision with an existing record is checked anyway.
        let id = loop {
            rng.fill(&mut id).map_err(fail)?;
            let id = hex::encode(id);
            if !tokens.iter().any(|t| t.id == id) {
                break id;
            }
        };
        let token = Token { id, secret };
        let now = now_secs();
        let record = TokenRecord {
            id: token.id.clone(),
            secret_sha256: token.secret_hash(),
            group: group.to_owned(),
            edge_id: edge_id.map(str::to_owned),
            created: now,
            expires: now.saturating_add(ttl.as_secs().max(1)),
            used: None,
            revoked: None,
        };
        tokens.push(record.clone());
        self.write_tokens(tokens, &lock)?;
        Ok((token, record))
    }

    /// Marks token `id` revoked.
    pub(crate) fn revoke_token(&self, id: &str) -> Result<TokenRecord, StateError> {
        let lock = self.lock()?;
        let mut tokens = self.tokens()?;
        let id = id.trim().to_ascii_lowercase();
        let Some(token) = tokens.iter_mut().find(|t| t.id == id) else {
            return Err(StateError::Refused(format!("no token with id {id}")));
        };
        if token.revoked.is_none() {
            token.revoked = Some(now_secs());
        }
        let record = token.clone();
        self.write_tokens(tokens, &lock)?;
        Ok(record)
    }

    /// Records an enrollment (`renewal = false`) or renewal of `edge`, replacing the
    /// edge's earlier record; a renewal keeps the time of the first enrollment.
    pub(crate) fn record_edge(
        &self,
        mut edge: EdgeRecord,
        renewal: bool,
        lock: &StateLock,
    ) -> Result<(), StateError> {
        let mut edges = self.edges()?;
        let old = edges
            .iter()
            .position(|e| e.group == edge.group && e.edge_id == edge.edge_id);
        if let Some(i) = old {
            let old = edges.remove(i);
            if renewal {
                edge.enrolled = old.enrolled;
            }
        }
        edges.push(edge);
        self.write(EDGES_FILE, &EdgesFile { edges }, lock)
    }

    /// Adds `edge_id` (in `group`, or every group) to `revoked.json`; `false` when it
    /// was already there.
    pub(crate) fn revoke_edge(
        &self,
        edge_id: &str,
        group: Option<&str>,
    ) -> Result<bool, StateError> {
        let lock = self.lock()?;
        let mut revoked = self.revoked()?;
        if revoked
            .iter()
            .any(|r| r.edge_id == edge_id && r.group.as_deref() == group)
        {
            return Ok(false);
        }
        revoked.push(RevokedRecord {
            edge_id: edge_id.to_owned(),
            group: group.map(str::to_owned),
            revoked_at: now_secs(),
        });
        self.write(REVOKED_FILE, &RevokedFile { revoked }, &lock)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> StateDir {
        let dir = std::env::temp_dir().join(format!("keyless-state-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        StateDir::new(&dir.join("state"))
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn tokens_are_stored_as_hashes_in_private_files() {
        let state = scratch("tokens");
        let (token, record) = state
            .create_token("eu", Duration::from_secs(3600), Some("edge-9"))
            .unwrap();
        assert_eq!(token.id.len(), 16);
        assert_eq!(record.secret_sha256, token.secret_hash());
        let text = std::fs::read_to_string(state.path(TOKENS_FILE)).unwrap();
        let secret = keyless_shared::enroll::base64url_encode(&token.secret);
        assert!(!text.contains(&secret), "{text}");
        assert!(text.contains(&token.secret_hash()));
        assert_eq!(mode(&state.path(TOKENS_FILE)), 0o600);
        assert_eq!(mode(&state.dir), 0o700);
        let back = state.tokens().unwrap();
        assert_eq!(back, vec![record.clone()]);
        assert_eq!(back[0].status(now_secs()), "active");
        assert_eq!(back[0].status(record.expires), "expired");

        let revoked = state.revoke_token(&token.id.to_uppercase()).unwrap();
        assert_eq!(revoked.status(now_secs()), "revoked");
        assert!(state.revoke_token("0000").is_err());
        // No temporary file is left behind.
        let names: Vec<String> = std::fs::read_dir(&state.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains("tmp")), "{names:?}");
    }

    #[test]
    fn edges_and_revocations_are_recorded() {
        let state = scratch("edges");
        let lock = state.lock().unwrap();
        let edge = |serial: &str, at: u64| EdgeRecord {
            group: "eu".into(),
            edge_id: "e1".into(),
            serial: serial.into(),
            not_after: at + 100,
            enrolled: at,
            last_seen: at,
        };
        state.record_edge(edge("01", 10), false, &lock).unwrap();
        state.record_edge(edge("02", 20), true, &lock).unwrap();
        let edges = state.edges().unwrap();
        assert_eq!(edges.len(), 1);
        assert_eq!(
            (
                edges[0].serial.as_str(),
                edges[0].enrolled,
                edges[0].last_seen
            ),
            ("02", 10, 20)
        );
        drop(lock);

        assert!(state.revoked_set().unwrap().len() == 0);
        assert!(state.revoke_edge("e1", None).unwrap());
        assert!(!state.revoke_edge("e1", None).unwrap());
        assert!(state.revoke_edge("e2", Some("us")).unwrap());
        let set = state.revoked_set().unwrap();
        assert!(set.contains("eu", "e1") && set.contains("us", "e1"));
        assert!(set.contains("us", "e2") && !set.contains("eu", "e2"));
        assert_eq!(mode(&state.path(REVOKED_FILE)), 0o600);

        std::fs::write(state.path(REVOKED_FILE), "{not json").unwrap();
        let err = state.revoked_set().unwrap_err().to_string();
        assert!(err.contains(REVOKED_FILE), "{err}");
    }
}
