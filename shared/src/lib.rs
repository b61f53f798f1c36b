//! Shared pieces of keyless: the Keyless protocol v1 wire format (byte-compatible with
//! Cloudflare's Keyless SSL) with our documented extensions, key identifiers (SKI) and
//! the checks a key server makes on a to-be-signed handshake message, host name lookup
//! with `*.` wildcards ([`DomainMap`]), and the process and logging hygiene both
//! binaries share ([`process`], [`log_safe`]), and their listeners' accept loop and
//! admin HTTP server ([`serve`]), and the edge enrollment exchange ([`enroll`],
//! described in `ENROLL.md`).
//!
//! The wire format is described in `PROTOCOL.md` beside this crate; a test keeps the
//! tables there in step with [`Tag`], [`Opcode`], [`ErrorCode`] and [`KeyPreference`].
#![forbid(unsafe_code)]

pub mod cli;
mod codec;
mod context;
mod domain;
pub mod enroll;
pub mod handoff;
mod log_safe;
pub mod process;
mod protocol;
pub mod serve;
mod ski;
pub mod telemetry;
pub mod tickets;

pub use codec::{
    decode_message, encode_message, CodecError, KeylessCodec, Message, Operation, TraceContext,
    HEADER_LEN, MAX_BODY_LEN, PAD_TO,
};
pub use context::{
    check_signing_context, digest_for, HandshakeContext, PolicyError, TLS13_SERVER_CONTEXT,
};
pub use domain::{normalize_host, DomainMap};
pub use log_safe::{log_safe, LogSafe};
pub use protocol::{
    decode_chain, encode_chain, ChainError, ErrorCode, HashAlg, KeyKind, KeyPreference, Opcode,
    Tag, MAX_CHAIN_CERT_LEN, VERSION_MAJOR, VERSION_MINOR,
};
pub use ski::{ski_from_spki_der, spki_sha256, Ski};
