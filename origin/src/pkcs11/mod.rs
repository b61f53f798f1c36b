//! PKCS#11 key stores (`[[keys.store]]` with `type = "pkcs11"`): site keys that live in
//! a hardware security module (or SoftHSM2) and never leave it. The key server finds
//! them on the token, derives their public keys (and so their SKIs) from the token's
//! attributes, and asks the token for every private-key operation.
//!
//! Sessions: a PKCS#11 `Session` may be used by one thread at a time, so each of a
//! token's worker threads (`sessions` of them, see [`crate::pool`]) opens and logs in
//! its own, kept in a thread-local map and reopened after a session-level failure.
//! The module is loaded and initialised once per process and path, shared by reloads.
//!
//! Failures: an operation that fails for a reason of the session or the token (closed
//! session, device error, token removed, not logged in) is retried on a new session
//! up to `sign_retry_count` times; when the token cannot be opened, its keys answer
//! `key-unavailable` at once for a back-off period (1 s doubling to 30 s), then the next
//! operation tries again, without a restart.

pub(crate) mod uri;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use keyless_shared::{ErrorCode, HashAlg, KeyKind, Ski};
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey};
use zeroize::Zeroizing;

use crate::config::StoreConfig;
use crate::keys::{Algorithm, OpResult};
use crate::metrics::Metrics;
use crate::pool::{Job, Pool};
use uri::{PinSource, Pkcs11Uri};

/// Longest back-off between attempts to reopen a failed token.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why a token's keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TokenError {
    #[error(transparent)]
    Uri(#[from] uri::UriError),
    #[error("{uri}: cannot load PKCS#11 module {path}: {source}")]
    Module {
        uri: String,
        path: PathBuf,
        source: CkError,
    },
    #[error("{uri}: no token labelled {token:?} in the module's slots")]
    NoToken { uri: String, token: String },
    #[error("{uri}: reading the PIN from {what}: {why}")]
    Pin {
        uri: String,
        what: String,
        why: String,
    },
    #[error("{uri}: {what}: {source}")]
    Pkcs11 {
        uri: String,
        what: &'static str,
        source: CkError,
    },
    #[error("{uri}: private key {label:?} is extractable; the store refuses it (allow_extractable = true to accept)")]
    Extractable { uri: String, label: String },
    #[error("{uri}: private key {label:?}: {why}")]
    Key {
        uri: String,
        label: String,
        why: String,
    },
}

/// A private key found on a token, with what the keystore needs to index it.
#[derive(Debug)]
pub(crate) struct FoundKey {
    pub(crate) label: String,
    pub(crate) ski: Ski,
    pub(crate) algorithm: Algorithm,
    /// DER certificates on the token whose public key is this key's.
    pub(crate) certificates: Vec<Vec<u8>>,
    pub(crate) key: TokenKey,
}

/// One configured token: its module, slot and PIN, and the state of its sessions.
pub(crate) struct Token {
    /// Distinguishes this token's sessions from those of an earlier load.
    id: u64,
    uri: Pkcs11Uri,
    ctx: Pkcs11,
    slot: Slot,
    pin: AuthPin,
    retries: u32,
    pub(crate) sign_timeout: Duration,
    pub(crate) sessions: usize,
    /// While set, the token is considered down until then.
    down: Mutex<Option<(Instant, Duration)>>,
    /// Set after a session-level failure: the next session logs out first, so that
    /// its login is checked anew (a module may keep a stale login for the token).
    relogin: std::sync::atomic::AtomicBool,
    /// The module's initialisation count ([`Module`]).
    generation: Arc<AtomicU64>,
    /// Failed attempts in a row; from the second on, the module is initialised again
    /// before the next attempt.
    failures: std::sync::atomic::AtomicU32,
    /// The token's worker threads, started on first use.
    pub(crate) pool: OnceLock<crate::pool::Pool>,
    /// Operations submitted, oldest first, with the time by which they must be
    /// answered (see [`watchdog`]).
    watched: Mutex<VecDeque<(Instant, Pending)>>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("uri", &self.uri.to_string())
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

/// A private key on a token.
#[derive(Debug)]
pub(crate) struct TokenKey {
    token: Arc<Token>,
    /// The key's handle (valid in every session of the process), found again by
    /// `id` when the token says it is no longer valid (the token was reinserted).
    handle: Mutex<ObjectHandle>,
    /// `CKA_ID`.
    id: Vec<u8>,
}

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// A loaded PKCS#11 module and how many times it was initialised (sessions of an
/// earlier initialisation are dead: never used nor closed again).
#[derive(Clone, Debug)]
struct Module {
    ctx: Pkcs11,
    generation: Arc<AtomicU64>,
}

/// The process's PKCS#11 modules by path: `C_Initialize` once each, shared by reloads.
static MODULES: OnceLock<Mutex<HashMap<PathBuf, Module>>> = OnceLock::new();

fn modules() -> std::sync::MutexGuard<'static, HashMap<PathBuf, Module>> {
    MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn initialize(ctx: &Pkcs11) -> Result<(), CkError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The module at `path`, loaded and initialised on first use.
fn module(path: &Path) -> Result<Module, CkError> {
    let mut map = modules();
    if let Some(m) = map.get(path) {
        return Ok(m.clone());
    }
    let ctx = Pkcs11::new(path)?;
    initialize(&ctx)?;
    let m = Module {
        ctx,
        generation: Arc::new(AtomicU64::new(0)),
    };
    map.insert(path.to_owned(), m.clone());
    Ok(m)
}

/// Finalises and initialises the module again, unless another token of it did since
/// `seen`: the way back for tokens the module keeps broken after a failure (SoftHSM2
/// does, for a token whose files went away). Every session of the module dies; their
/// threads open new ones (one retry each).
fn reinitialize(path: &Path, seen: u64) -> Result<(), CkError> {
    let map = modules();
    let Some(m) = map.get(path) else {
        return Ok(());
    };
    if m.generation.load(Ordering::Acquire) != seen {
        return Ok(());
    }
    m.generation.fetch_add(1, Ordering::AcqRel);
    let _ = m.ctx.clone().finalize();
    initialize(&m.ctx)
}

impl Token {
    /// Opens the token of `config` and lists its private keys (blocking).
    pub(crate) fn load(config: &StoreConfig) -> Result<Vec<FoundKey>, TokenError> {
        let uri = Pkcs11Uri::parse(&config.uri)?;
        let shown = uri.to_string();
        let Module { ctx, generation } =
            module(&uri.module_path).map_err(|source| TokenError::Module {
                uri: shown.clone(),
                path: uri.module_path.clone(),
                source,
            })?;
        let slot = find_slot(&ctx, &uri.token).map_err(|source| TokenError::Pkcs11 {
            uri: shown.clone(),
            what: "listing slots",
            source,
        })?;
        let slot = slot.ok_or_else(|| TokenError::NoToken {
            uri: shown.clone(),
            token: uri.token.clone(),
        })?;
        let pin = read_pin(&uri.pin).map_err(|(what, why)| TokenError::Pin {
            uri: shown.clone(),
            what,
            why,
        })?;
        same_pin_as_before(&uri, pin.as_str()).map_err(|why| TokenError::Pin {
            uri: shown.clone(),
            what: "its source".into(),
            why,
        })?;
        let sessions = config
            .sessions
            .unwrap_or_else(|| default_sessions(&ctx, slot))
            .max(1);
        let token = Arc::new(Token {
            id: NEXT_TOKEN.fetch_add(1, Ordering::Relaxed),
            uri,
            ctx,
            slot,
            pin: AuthPin::new(pin.as_str().into()),
            retries: config.sign_retry_count,
            sign_timeout: config.sign_timeout,
            sessions,
            down: Mutex::new(None),
            relogin: std::sync::atomic::AtomicBool::new(false),
            generation,
            failures: std::sync::atomic::AtomicU32::new(0),
            pool: OnceLock::new(),
            watched: Mutex::new(VecDeque::new()),
        });
        token.list_keys(config.allow_extractable)
    }

    /// The token's private keys that the URI selects (blocking).
    fn list_keys(self: &Arc<Self>, allow_extractable: bool) -> Result<Vec<FoundKey>, TokenError> {
        let generation = self.generation.load(Ordering::Acquire);
        let session = self
            .open_session()
            .map_err(self.failed("opening a session and logging in"))?;
        let found = self.list_with(&session, allow_extractable);
        retire(session, generation, &self.generation);
        found
    }

    /// Maps a PKCS#11 error while doing `what` to a [`TokenError`] naming the token.
    fn failed(&self, what: &'static str) -> impl FnOnce(CkError) -> TokenError {
        let uri = self.uri.to_string();
        move |source| TokenError::Pkcs11 { uri, what, source }
    }

    /// [`Token::list_keys`] on `session`.
    fn list_with(
        self: &Arc<Self>,
        session: &Session,
        allow_extractable: bool,
    ) -> Result<Vec<FoundKey>, TokenError> {
        let pk = |what| self.failed(what);
        let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
        if let Some(label) = &self.uri.object {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        if let Some(id) = &self.uri.id {
            template.push(Attribute::Id(id.clone()));
        }
        let handles = session
            .find_objects(&template)
            .map_err(pk("finding private keys"))?;
        let certs = certificates(session).map_err(pk("finding certificates"))?;
        let mut found = Vec::new();
        for handle in handles {
            let key = self.describe(session, handle, allow_extractable, &certs)?;
            found.push(key);
        }
        Ok(found)
    }

    /// What the keystore needs of the private key `handle`.
    fn describe(
        self: &Arc<Self>,
        session: &Session,
        handle: ObjectHandle,
        allow_extractable: bool,
        certs: &[(Ski, Vec<u8>)],
    ) -> Result<FoundKey, TokenError> {
        let shown = self.uri.to_string();
        let attrs = session
            .get_attributes(
                handle,
                &[
                    AttributeType::Label,
                    AttributeType::Id,
                    AttributeType::KeyType,
                    AttributeType::Extractable,
                    AttributeType::Sensitive,
                ],
            )
            .map_err(|source| TokenError::Pkcs11 {
                uri: shown.clone(),
                what: "reading a key's attributes",
                source,
            })?;
        let mut label = String::new();
        let mut id = Vec::new();
        let mut key_type = None;
        let mut extractable = true;
        let mut sensitive = false;
        for a in attrs {
            match a {
                Attribute::Label(l) => label = String::from_utf8_lossy(&l).into_owned(),
                Attribute::Id(i) => id = i,
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::Extractable(e) => extractable = e,
                Attribute::Sensitive(s) => sensitive = s,
                _ => {}
            }
        }
        if (extractable || !sensitive) && !allow_extractable {
            return Err(TokenError::Extractable { uri: shown, label });
        }
        let key_err = |why: String| TokenError::Key {
            uri: shown.clone(),
            label: label.clone(),
            why,
        };
        let (algorithm, spki) = public_key(session, handle, key_type, &id).map_err(key_err)?;
        let ski = Ski::from_spki_der(&spki).map_err(|e| key_err(e.to_string()))?;
        let certificates = certs
            .iter()
            .filter(|(s, _)| *s == ski)
            .map(|(_, der)| der.clone())
            .collect();
        Ok(FoundKey {
            label,
            ski,
            algorithm,
            certificates,
            key: TokenKey {
                token: self.clone(),
                handle: Mutex::new(handle),
                id,
            },
        })
    }

    /// A new session on the token, logged in as the user. The token's slot is looked up
    /// again by label (after a failure the module may list the token anew).
    fn open_session(&self) -> Result<Session, CkError> {
        if self.failures.load(Ordering::Acquire) >= 2 {
            tracing::warn!(token = %self.uri, "PKCS#11 token still failing; initialising its module again");
            reinitialize(
                &self.uri.module_path,
                self.generation.load(Ordering::Acquire),
            )?;
            self.failures.store(0, Ordering::Release);
        }
        let slot = find_slot(&self.ctx, &self.uri.token)?.unwrap_or(self.slot);
        // Closed explicitly (`retire`): a session of an earlier initialisation must not
        // be closed, its handle may be someone else's now.
        let session = self.ctx.open_ro_session_no_drop(slot)?;
        if self.relogin.swap(false, Ordering::AcqRel) {
            // Ends the login of every session of the process on this token: after a
            // failure, the others are being reopened too.
            let _ = session.logout();
        }
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(e) => {
                retire(
                    session,
                    self.generation.load(Ordering::Acquire),
                    &self.generation,
                );
                Err(e)
            }
        }
    }

    /// Runs `op` with this thread's session of the token, opening one if needed;
    /// retries on a new session after a session-level failure.
    fn with_session<R>(
        self: &Arc<Self>,
        mut op: impl FnMut(&Session) -> Result<R, CkError>,
    ) -> Result<R, ErrorCode> {
        if self.is_down() {
            return Err(ErrorCode::KeyUnavailable);
        }
        let mut attempt = 0;
        loop {
            let result = SESSIONS.with(|cell| {
                let mut sessions = cell.borrow_mut();
                prune(&mut sessions);
                let session = match sessions.get(&self.id) {
                    Some(open) => &open.session,
                    None => {
                        let generation = self.generation.load(Ordering::Acquire);
                        let session = self.open_session()?;
                        let open = OpenSession {
                            token: Arc::downgrade(self),
                            session,
                            generation,
                            module: self.generation.clone(),
                        };
                        &sessions.entry(self.id).or_insert(open).session
                    }
                };
                op(session)
            });
            match result {
                Ok(r) => {
                    self.failures.store(0, Ordering::Release);
                    self.up();
                    return Ok(r);
                }
                Err(e) if session_level(&e) && attempt < self.retries => {
                    attempt += 1;
                    self.relogin.store(true, Ordering::Release);
                    tracing::warn!(token = %self.uri, error = %e, attempt, "PKCS#11 session failed; retrying on a new one");
                    self.drop_session();
                }
                Err(e) if session_level(&e) => {
                    self.drop_session();
                    self.relogin.store(true, Ordering::Release);
                    self.failures.fetch_add(1, Ordering::AcqRel);
                    self.mark_down(&e);
                    return Err(ErrorCode::KeyUnavailable);
                }
                Err(e) => {
                    tracing::warn!(token = %self.uri, error = %e, "PKCS#11 operation failed");
                    return Err(ErrorCode::Crypto);
                }
            }
        }
    }

    /// Retires this thread's session of the token.
    fn drop_session(&self) {
        let open = SESSIONS.with(|cell| cell.borrow_mut().remove(&self.id));
        if let Some(open) = open {
            retire(open.session, open.generation, &open.module);
        }
    }

    fn is_down(&self) -> bool {
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        down.is_some_and(|(until, _)| Instant::now() < until)
    }

    fn up(&self) {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        if down.take().is_some() {
            tracing::info!(token = %self.uri, "PKCS#11 token available again");
        }
    }

    fn mark_down(&self, e: &dyn std::fmt::Display) {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        let backoff = down.map_or(Duration::from_secs(1), |(_, b)| (b * 2).min(MAX_BACKOFF));
        *down = Some((Instant::now() + backoff, backoff));
        tracing::error!(token = %self.uri, error = %e, retry_in = ?backoff, "PKCS#11 token unavailable; its keys answer key-unavailable");
    }

    /// Runs `job` on the token's worker threads (started on first use: `sessions` of
    /// them, each with its own session, behind a queue as bounded as `like`'s),
    /// answering `key-unavailable` when the operation has not ended `sign_timeout`
    /// after it could have started (the queue's deadline plus `sign_timeout`): a hung
    /// token costs its requests that long, never the key server's other keys.
    /// While the token is down (failing, or hung: see [`watchdog`]), `key-unavailable`
    /// at once, so that the edge tries another key server without waiting.
    pub(crate) fn submit(self: &Arc<Self>, mut job: Job, like: &Pool, metrics: &Arc<Metrics>) {
        if self.is_down() {
            (job.done)(
                Err(ErrorCode::KeyUnavailable),
                Duration::ZERO,
                Duration::ZERO,
            );
            return;
        }
        let (queue, deadline) = like.limits();
        let Some(pool) = self.pool(queue, deadline, metrics) else {
            (job.done)(Err(ErrorCode::Internal), Duration::ZERO, Duration::ZERO);
            return;
        };
        // The answer goes out once: from the worker, or from the watchdog when the
        // worker has not answered by the limit.
        let slot: Pending = Arc::new(Mutex::new(Some(job.done)));
        let answer = slot.clone();
        job.done = Box::new(move |result, queued, took| {
            let done = answer.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(done) = done {
                done(result, queued, took);
            }
        });
        let limit = Instant::now() + deadline + self.sign_timeout;
        self.watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((limit, slot));
        pool.submit(job);
    }

    /// The token's worker threads and their watchdog, started on first use; `None`
    /// when the threads cannot be started.
    fn pool(
        self: &Arc<Self>,
        queue: usize,
        deadline: Duration,
        metrics: &Arc<Metrics>,
    ) -> Option<&Pool> {
        if self.pool.get().is_none() {
            match Pool::start(
                "keyless-token",
                self.sessions,
                queue,
                deadline,
                metrics.clone(),
            ) {
                Ok(pool) => {
                    if self.pool.set(pool).is_ok() {
                        let limit = deadline + self.sign_timeout;
                        tokio::spawn(watchdog(Arc::downgrade(self), limit, metrics.clone()));
                    }
                }
                Err(e) => {
                    tracing::error!(token = %self.uri, error = %e, "cannot start the token's worker threads");
                    return None;
                }
            }
        }
        self.pool.get()
    }

    /// The token's URI without its PIN source.
    pub(crate) fn name(&self) -> String {
        self.uri.to_string()
    }
}

impl crate::metrics::TokenHealth for Token {
    fn name(&self) -> String {
        Token::name(self)
    }

    /// Not in a back-off period.
    fn available(&self) -> bool {
        !self.is_down()
    }
}

/// An operation's answer, taken by whoever answers first.
type Pending = Arc<Mutex<Option<crate::pool::Done>>>;

/// Answers `key-unavailable` for each operation of the token not answered by its
/// limit (the queue's deadline plus `sign_timeout`): a hung token costs its requests
/// that long and no more. The first such operation marks the token down (as a failing
/// one: its keys answer `key-unavailable` at once for the back-off period, then the
/// next operation tries it again) and answers every operation still waiting for it.
/// One task per token, every 50 ms; it ends with the token.
async fn watchdog(token: Weak<Token>, limit: Duration, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(token) = token.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut expired = Vec::new();
        {
            let mut watched = token.watched.lock().unwrap_or_else(|p| p.into_inner());
            // Entries already answered by their worker are dropped as they come up.
            while watched.front().is_some_and(|(at, slot)| {
                *at <= now || slot.lock().unwrap_or_else(|p| p.into_inner()).is_none()
            }) {
                if let Some((_, slot)) = watched.pop_front() {
                    expired.push(slot);
                }
            }
        }
        let mut late = 0;
        for slot in &expired {
            let done = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(done) = done {
                late += 1;
                metrics.queue_dropped("token-timeout");
                done(Err(ErrorCode::KeyUnavailable), limit, Duration::ZERO);
            }
        }
        if late > 0 {
            token.mark_down(&format_args!(
                "{late} operation(s) not answered within {limit:?} (the token hangs)"
            ));
            let waiting: Vec<Pending> = token
                .watched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..)
                .map(|(_, slot)| slot)
                .collect();
            for slot in waiting {
                let done = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(done) = done {
                    metrics.queue_dropped("token-down");
                    done(
                        Err(ErrorCode::KeyUnavailable),
                        Duration::ZERO,
                        Duration::ZERO,
                    );
                }
            }
        }
    }
}

/// A thread's session of a token.
struct OpenSession {
    /// Held weakly: a reload drops the token, and then its sessions.
    token: Weak<Token>,
    session: Session,
    /// The module's initialisation it was opened in.
    generation: u64,
    module: Arc<AtomicU64>,
}

/// Each thread's sessions, by token id.
type Sessions = HashMap<u64, OpenSession>;

/// Closes `session` if it belongs to the module's current initialisation (one of an
/// earlier one is already gone with it, and its handle may be reused).
fn retire(session: Session, generation: u64, module: &AtomicU64) {
    if module.load(Ordering::Acquire) == generation {
        let _ = session.close();
    }
}

/// Retires the sessions of tokens a reload dropped.
fn prune(sessions: &mut Sessions) {
    let dead: Vec<u64> = sessions
        .iter()
        .filter(|(_, open)| open.token.strong_count() == 0)
        .map(|(id, _)| *id)
        .collect();
    for id in dead {
        if let Some(open) = sessions.remove(&id) {
            retire(open.session, open.generation, &open.module);
        }
    }
}

thread_local! {
    static SESSIONS: RefCell<Sessions> = RefCell::new(HashMap::new());
}

/// Whether `e` is a failure of the session or the token rather than of the operation.
fn session_level(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::CryptokiNotInitialized
                | RvError::SessionClosed
                | RvError::DeviceError
                | RvError::DeviceRemoved
                | RvError::DeviceMemory
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::UserNotLoggedIn
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
                | RvError::GeneralError
                | RvError::PinIncorrect
                | RvError::PinLocked,
            _
        )
    )
}

impl crate::keys::PrivateOps for TokenKey {
    /// On the calling thread's session of the token (one of the token's threads). The
    /// token signs the digest: `message` is not needed.
    fn perform(
        &self,
        kind: KeyKind,
        hash: Option<HashAlg>,
        payload: &[u8],
        _message: Option<&[u8]>,
    ) -> OpResult {
        self.operate(kind, hash, payload)
    }
}

impl TokenKey {
    /// The token holding the key (whose threads must run its operations).
    pub(crate) fn token(&self) -> &Arc<Token> {
        &self.token
    }

    fn operate(&self, kind: KeyKind, hash: Option<HashAlg>, payload: &[u8]) -> OpResult {
        let (mechanism, input): (Mechanism<'_>, Zeroizing<Vec<u8>>) = match kind {
            KeyKind::Ecdsa => (Mechanism::Ecdsa, Zeroizing::new(payload.to_vec())),
            KeyKind::RsaPkcs1 => {
                let h = hash.ok_or(ErrorCode::BadOpcode)?;
                let mut input = digest_info(h).to_vec();
                input.extend_from_slice(payload);
                (Mechanism::RsaPkcs, Zeroizing::new(input))
            }
            KeyKind::RsaPss => {
                let h = hash.ok_or(ErrorCode::BadOpcode)?;
                let (hash_alg, mgf) = pss_params(h).ok_or(ErrorCode::BadOpcode)?;
                let params = PkcsPssParams {
                    hash_alg,
                    mgf,
                    s_len: (h.len() as u64).into(),
                };
                (
                    Mechanism::RsaPkcsPss(params),
                    Zeroizing::new(payload.to_vec()),
                )
            }
            KeyKind::Ed25519 => (
                Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                Zeroizing::new(payload.to_vec()),
            ),
            KeyKind::RsaRaw => {
                return self.token.with_session(|s| {
                    self.on_key(s, |key| s.decrypt(&Mechanism::RsaX509, key, payload))
                });
            }
        };
        let signature = self
            .token
            .with_session(|s| self.on_key(s, |key| s.sign(&mechanism, key, &input)))?;
        if kind == KeyKind::Ecdsa {
            return Ok(der_signature(&signature));
        }
        Ok(signature)
    }

    /// Runs `op` on the key's handle; when the token no longer knows the handle, finds
    /// the key again by its `CKA_ID` and runs `op` once more.
    fn on_key<R>(
        &self,
        session: &Session,
        op: impl Fn(ObjectHandle) -> Result<R, CkError>,
    ) -> Result<R, CkError> {
        let handle = *self.handle.lock().unwrap_or_else(|p| p.into_inner());
        match op(handle) {
            Err(CkError::Pkcs11(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid, _))
                if !self.id.is_empty() =>
            {
                let found = session.find_objects(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::Id(self.id.clone()),
                ])?;
                tracing::debug!(token = %self.token.uri, found = found.len(), "PKCS#11 key handle no longer valid; looked the key up again by its CKA_ID");
                let Some(&fresh) = found.first() else {
                    return Err(CkError::Pkcs11(
                        RvError::KeyHandleInvalid,
                        cryptoki::context::Function::Sign,
                    ));
                };
                *self.handle.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
                op(fresh)
            }
            other => other,
        }
    }
}

/// Sessions to use when the configuration names none: the token's limit, at most 8;
/// 4 when it reports none (or "effectively infinite", as SoftHSM2 does).
fn default_sessions(ctx: &Pkcs11, slot: Slot) -> usize {
    use cryptoki::slot::Limit;
    match ctx.get_token_info(slot).map(|i| i.max_session_count()) {
        Ok(Limit::Max(n)) => usize::try_from(n).unwrap_or(8).clamp(1, 8),
        _ => 4,
    }
}

/// The slot holding the token labelled `label`.
fn find_slot(ctx: &Pkcs11, label: &str) -> Result<Option<Slot>, CkError> {
    for slot in ctx.get_slots_with_token()? {
        // A slot whose token fails to describe itself (e.g. removed) is not it.
        if ctx
            .get_token_info(slot)
            .is_ok_and(|info| info.label().trim_end() == label)
        {
            return Ok(Some(slot));
        }
    }
    Ok(None)
}

/// Checks `pin` against the one this process logged in to the token with, if any.
/// A PKCS#11 login holds for every session of the process, so a new session's login
/// does not check the PIN again: without this, a wrong PIN on reload would go unnoticed
/// until a restart. A changed PIN is refused (it takes a restart).
fn same_pin_as_before(uri: &Pkcs11Uri, pin: &str) -> Result<(), String> {
    /// SHA-256 of the PIN in use, by module path and token label.
    type Pins = HashMap<(PathBuf, String), [u8; 32]>;
    static PINS: OnceLock<Mutex<Pins>> = OnceLock::new();
    let digest = ring::digest::digest(&ring::digest::SHA256, pin.as_bytes());
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest.as_ref());
    let mut pins = PINS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let key = (uri.module_path.clone(), uri.token.clone());
    match pins.get(&key) {
        Some(before) if !openssl::memcmp::eq(before, &hash) => Err(
            "differs from the PIN the key server logged in to the token with (a PIN change \
             takes a restart)"
                .into(),
        ),
        Some(_) => Ok(()),
        None => {
            pins.insert(key, hash);
            Ok(())
        }
    }
}

/// The PIN from its source (a trailing newline dropped).
fn read_pin(source: &PinSource) -> Result<Zeroizing<String>, (String, String)> {
    let text = match source {
        PinSource::File(path) => {
            let what = format!("file {}", path.display());
            Zeroizing::new(std::fs::read_to_string(path).map_err(|e| (what, e.to_string()))?)
        }
        PinSource::Env(name) => {
            let what = format!("environment variable {name}");
            Zeroizing::new(std::env::var(name).map_err(|e| (what, e.to_string()))?)
        }
    };
    let pin = Zeroizing::new(text.trim_end_matches(['\r', '\n']).to_owned());
    if pin.is_empty() {
        return Err(("the PIN source".into(), "empty".into()));
    }
    Ok(pin)
}

/// Every certificate on the token, by the SKI of its public key.
fn certificates(session: &Session) -> Result<Vec<(Ski, Vec<u8>)>, CkError> {
    let handles = session.find_objects(&[Attribute::Class(ObjectClass::CERTIFICATE)])?;
    let mut out = Vec::new();
    for h in handles {
        for a in session.get_attributes(h, &[AttributeType::Value])? {
            if let Attribute::Value(der) = a {
                let spki = x509_parser::parse_x509_certificate(&der)
                    .ok()
                    .map(|(_, c)| c.public_key().raw.to_vec());
                if let Some(ski) = spki.and_then(|s| Ski::from_spki_der(&s).ok()) {
                    out.push((ski, der));
                }
            }
        }
    }
    Ok(out)
}

/// The algorithm and SPKI DER of the private key `handle`, from its attributes (or
/// its public key object's, for tokens that keep public parts there).
fn public_key(
    session: &Session,
    handle: ObjectHandle,
    key_type: Option<KeyType>,
    id: &[u8],
) -> Result<(Algorithm, Vec<u8>), String> {
    let types = [
        AttributeType::Modulus,
        AttributeType::PublicExponent,
        AttributeType::EcParams,
        AttributeType::EcPoint,
    ];
    let mut attrs = session
        .get_attributes(handle, &types)
        .map_err(|e| format!("reading public attributes: {e}"))?;
    let has_point = attrs.iter().any(|a| matches!(a, Attribute::EcPoint(_)));
    let is_ec = matches!(key_type, Some(t) if t == KeyType::EC || t == KeyType::EC_EDWARDS);
    if is_ec && !has_point {
        // The EC point is an attribute of the public key object.
        let public = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::Id(id.to_vec()),
            ])
            .map_err(|e| format!("finding its public key: {e}"))?;
        let h = public
            .first()
            .ok_or("no public key object with the same CKA_ID (needed for its EC point)")?;
        attrs = session
            .get_attributes(*h, &types)
            .map_err(|e| format!("reading its public key: {e}"))?;
    }
    public_from_attributes(key_type, &attrs)
}

/// The DigestInfo prefix PKCS#1 v1.5 puts before a digest of `h` (RFC 8017 §9.2).
fn digest_info(h: HashAlg) -> &'static [u8] {
    match h {
        HashAlg::Md5Sha1 => &[],
        HashAlg::Sha1 => &[
            0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00, 0x04,
            0x14,
        ],
        HashAlg::Sha224 => &[
            0x30, 0x2d, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x04, 0x05, 0x00, 0x04, 0x1c,
        ],
        HashAlg::Sha256 => &[
            0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x01, 0x05, 0x00, 0x04, 0x20,
        ],
        HashAlg::Sha384 => &[
            0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x02, 0x05, 0x00, 0x04, 0x30,
        ],
        HashAlg::Sha512 => &[
            0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x03, 0x05, 0x00, 0x04, 0x40,
        ],
    }
}

/// The PSS hash and MGF mechanisms for `h`.
fn pss_params(h: HashAlg) -> Option<(MechanismType, PkcsMgfType)> {
    match h {
        HashAlg::Sha256 => Some((MechanismType::SHA256, PkcsMgfType::MGF1_SHA256)),
        HashAlg::Sha384 => Some((MechanismType::SHA384, PkcsMgfType::MGF1_SHA384)),
        HashAlg::Sha512 => Some((MechanismType::SHA512, PkcsMgfType::MGF1_SHA512)),
        _ => None,
    }
}

/// The DER `ECDSA-Sig-Value` of the raw `r ‖ s` a token returns.
fn der_signature(raw: &[u8]) -> Vec<u8> {
    let (r, s) = raw.split_at(raw.len() / 2);
    let int = |x: &[u8]| {
        let x = &x[x
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(x.len().saturating_sub(1))..];
        let mut v = Vec::with_capacity(x.len() + 3);
        v.push(0x02);
        let pad = x.first().is_some_and(|&b| b & 0x80 != 0);
        v.push((x.len() + usize::from(pad)) as u8);
        if pad {
            v.push(0);
        }
        v.extend_from_slice(x);
        v
    };
    let (r, s) = (int(r), int(s));
    let len = r.len() + s.len();
    let mut out = vec![0x30];
    if len >= 0x80 {
        out.push(0x81);
    }
    out.push(len as u8);
    out.extend(r);
    out.extend(s);
    out
}

/// The algorithm and SPKI DER of a token key from its public attributes (`CKA_MODULUS`
/// and `CKA_PUBLIC_EXPONENT`, or `CKA_EC_PARAMS` and `CKA_EC_POINT`).
fn public_from_attributes(
    key_type: Option<KeyType>,
    attrs: &[Attribute],
) -> Result<(Algorithm, Vec<u8>), String> {
    // The value of the attribute of type `t`.
    let get = |t: AttributeType, what: &'static str| {
        attrs
            .iter()
            .find(|a| a.attribute_type() == t)
            .and_then(|a| match a {
                Attribute::Modulus(v)
                | Attribute::PublicExponent(v)
                | Attribute::EcParams(v)
                | Attribute::EcPoint(v) => Some(v),
                _ => None,
            })
            .ok_or(what)
    };
    let ossl = |e: openssl::error::ErrorStack| e.to_string();
    match key_type {
        Some(t) if t == KeyType::RSA => {
            let n = get(AttributeType::Modulus, "no CKA_MODULUS")?;
            let e = get(AttributeType::PublicExponent, "no CKA_PUBLIC_EXPONENT")?;
            let rsa = openssl::rsa::Rsa::from_public_components(
                openssl::bn::BigNum::from_slice(n).map_err(ossl)?,
                openssl::bn::BigNum::from_slice(e).map_err(ossl)?,
            )
            .map_err(ossl)?;
            let bits = rsa.size() * 8;
            if !(2048..=4096).contains(&bits) {
                return Err(format!("unsupported RSA-{bits}"));
            }
            let pkey = PKey::from_rsa(rsa).map_err(ossl)?;
            Ok((
                Algorithm::Rsa { bits },
                pkey.public_key_to_der().map_err(ossl)?,
            ))
        }
        Some(t) if t == KeyType::EC || t == KeyType::EC_EDWARDS => {
            let params = get(AttributeType::EcParams, "no CKA_EC_PARAMS")?;
            let point = get(AttributeType::EcPoint, "no CKA_EC_POINT")?;
            // CKA_EC_POINT is a DER OCTET STRING holding the point (some tokens give
            // the bare point).
            let point = match point.as_slice() {
                [0x04, len, rest @ ..] if usize::from(*len) == rest.len() => rest,
                [0x04, 0x81, len, rest @ ..] if usize::from(*len) == rest.len() => rest,
                other => other,
            };
            const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
            const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
            const ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
            let (algorithm, nid) = match params.as_slice() {
                P256 => (Algorithm::EcdsaP256, Nid::X9_62_PRIME256V1),
                P384 => (Algorithm::EcdsaP384, Nid::SECP384R1),
                p if p == ED25519 || p.ends_with(b"edwards25519") => {
                    let pkey = PKey::public_key_from_raw_bytes(point, Id::ED25519).map_err(ossl)?;
                    return Ok((Algorithm::Ed25519, pkey.public_key_to_der().map_err(ossl)?));
                }
                _ => return Err("unsupported curve (supported: P-256, P-384, Ed25519)".into()),
            };
            let group = openssl::ec::EcGroup::from_curve_name(nid).map_err(ossl)?;
            let mut ctx = openssl::bn::BigNumContext::new().map_err(ossl)?;
            let point = openssl::ec::EcPoint::from_bytes(&group, point, &mut ctx).map_err(ossl)?;
            let ec = openssl::ec::EcKey::from_public_key(&group, &point).map_err(ossl)?;
            let pkey = PKey::from_ec_key(ec).map_err(ossl)?;
            Ok((algorithm, pkey.public_key_to_der().map_err(ossl)?))
        }
        _ => Err("unsupported key type (supported: RSA, EC, EC Edwards)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_ecdsa_signatures_become_der() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x80; // r needs a leading zero
        raw[32] = 0; // s has leading zeros to strip
        raw[33] = 0x01;
        let der = der_signature(&raw);
        assert_eq!(der[0], 0x30);
        assert_eq!(&der[2..5], &[0x02, 33, 0x00]);
        let s_at = 2 + 2 + 33;
        assert_eq!(der[s_at], 0x02);
        assert_eq!(der[s_at + 1] as usize, 31);
        assert_eq!(der[1] as usize, der.len() - 2);
    }

    #[test]
    fn digest_infos_end_with_the_digest_length() {
        for h in [
            HashAlg::Sha1,
            HashAlg::Sha256,
            HashAlg::Sha384,
            HashAlg::Sha512,
        ] {
            let di = digest_info(h);
            assert_eq!(*di.last().unwrap() as usize, h.len());
            assert_eq!(di[1] as usize + 2, di.len() + h.len());
        }
    }
}
