//! Framing and TLV encoding of Keyless protocol v1 messages.
//!
//! A frame is an 8-byte header (`major | minor | body length u16 BE | id u32 BE`)
//! followed by TLV items (`tag u8 | length u16 BE | value`). Unknown tags are skipped,
//! a known tag twice is a format error, and frames shorter than [`PAD_TO`] are padded.

use std::net::IpAddr;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::protocol::{ErrorCode, Opcode, Tag, VERSION_MAJOR, VERSION_MINOR};
use crate::ski::Ski;

/// Length of the frame header.
pub const HEADER_LEN: usize = 8;
/// Largest body a header can announce.
pub const MAX_BODY_LEN: usize = u16::MAX as usize;
/// Frames (header and body) shorter than this are padded up to it with a
/// [`Tag::Padding`] item, as the reference implementation does.
pub const PAD_TO: usize = 1024;
const ITEM_HEADER_LEN: usize = 3;

/// One operation: the typed TLV items of a frame body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operation {
    /// [`Tag::Opcode`].
    pub opcode: Option<Opcode>,
    /// [`Tag::Payload`].
    pub payload: Option<Bytes>,
    /// [`Tag::SubjectKeyIdentifier`].
    pub ski: Option<Ski>,
    /// [`Tag::ServerName`].
    pub sni: Option<String>,
    /// [`Tag::ClientIp`].
    pub client_ip: Option<IpAddr>,
    /// [`Tag::ServerIp`].
    pub server_ip: Option<IpAddr>,
    /// [`Tag::CertificateDigest`].
    pub cert_digest: Option<[u8; 32]>,
    /// [`Tag::CertId`].
    pub cert_id: Option<Bytes>,
    /// [`Tag::CustomFuncName`].
    pub custom_func_name: Option<Bytes>,
    /// [`Tag::Extra`].
    pub extra: Option<Bytes>,
    /// [`Tag::SignedMessage`] (extension): the whole to-be-signed message.
    pub signed_message: Option<Bytes>,
    /// [`Tag::ServerTime`] (extension): the key server's clock in a pong, milliseconds
    /// since the Unix epoch.
    pub server_time: Option<u64>,
    /// [`Tag::Draining`] (extension): set in a pong from a key server that is draining.
    pub draining: bool,
    /// [`Tag::TraceContext`] (extension): the caller's trace, for distributed tracing.
    pub trace: Option<TraceContext>,
}

/// A W3C trace context in binary form (the `traceparent` fields): version 0x00, the
/// 16-byte trace id, the 8-byte id of the caller's span (the parent of the key
/// server's), and the trace flags (0x01: sampled). Carries no key material, message or
/// identity of the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// Trace id (not all zeros).
    pub trace_id: [u8; 16],
    /// The caller's span id (not all zeros).
    pub span_id: [u8; 8],
    /// Trace flags; bit 0: sampled.
    pub flags: u8,
}

impl TraceContext {
    /// Encoded length.
    pub const LEN: usize = 26;

    fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[1..17].copy_from_slice(&self.trace_id);
        out[17..25].copy_from_slice(&self.span_id);
        out[25] = self.flags;
        out
    }

    fn decode(value: &[u8]) -> Option<TraceContext> {
        let [0x00, rest @ ..] = value else {
            return None;
        };
        let (trace_id, rest) = rest.split_first_chunk::<16>()?;
        let (span_id, rest) = rest.split_first_chunk::<8>()?;
        let [flags] = rest else {
            return None;
        };
        if trace_id == &[0; 16] || span_id == &[0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id: *trace_id,
            span_id: *span_id,
            flags: *flags,
        })
    }
}

impl Operation {
    /// A request or reply with an opcode and a payload.
    pub fn new(opcode: Opcode, payload: impl Into<Bytes>) -> Self {
        Operation {
            opcode: Some(opcode),
            payload: Some(payload.into()),
            ..Operation::default()
        }
    }

    /// An error reply.
    pub fn error(code: ErrorCode) -> Self {
        Operation::new(Opcode::Error, vec![code.to_u8()])
    }

    /// The payload, or an empty slice.
    pub fn payload(&self) -> &[u8] {
        self.payload.as_deref().unwrap_or_default()
    }

    /// For an error reply, its code.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match (self.opcode, self.payload()) {
            (Some(Opcode::Error), [code]) => Some(ErrorCode::from(*code)),
            (Some(Opcode::Error), _) => Some(ErrorCode::Format),
            _ => None,
        }
    }
}

/// A framed operation with its request id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    /// Request id; a reply carries the id of its request.
    pub id: u32,
    /// The operation.
    pub op: Operation,
}

/// Why a frame could not be decoded.
///
/// The connection should be closed after any of these (after an error reply for
/// [`CodecError::id`] where one is known): a format error has consumed its frame, but a
/// peer that sends one is not to be trusted with the next, and a version mismatch
/// consumes nothing, so decoding again would only repeat it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The header's major version is not 1.
    #[error("unsupported protocol version {major}.{minor}")]
    VersionMismatch {
        /// Request id from the header.
        id: u32,
        /// Major version received.
        major: u8,
        /// Minor version received.
        minor: u8,
    },
    /// The body is not a valid sequence of items.
    #[error("malformed frame: {reason}")]
    Format {
        /// Request id from the header.
        id: u32,
        /// What was wrong.
        reason: &'static str,
    },
    /// The frame is longer than [`MAX_BODY_LEN`] (encoding only).
    #[error("frame body of {0} bytes exceeds the 65535-byte limit")]
    TooLong(usize),
    /// The underlying stream failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl CodecError {
    /// The request id of the offending frame, when its header was read.
    pub fn id(&self) -> Option<u32> {
        match self {
            CodecError::VersionMismatch { id, .. } | CodecError::Format { id, .. } => Some(*id),
            _ => None,
        }
    }

    /// The protocol error code to answer with.
    pub fn code(&self) -> ErrorCode {
        match self {
            CodecError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            _ => ErrorCode::Format,
        }
    }
}

/// Encodes `msg` into `dst` (header, items, padding).
pub fn encode_message(msg: &Message, dst: &mut BytesMut) -> Result<(), CodecError> {
    let op = &msg.op;
    let start = dst.len();
    dst.reserve(HEADER_LEN + PAD_TO);
    dst.put_u8(VERSION_MAJOR);
    dst.put_u8(VERSION_MINOR);
    dst.put_u16(0); // length, patched below
    dst.put_u32(msg.id);

    let mut items: Vec<(Tag, &[u8])> = Vec::with_capacity(8);
    let opcode;
    if let Some(o) = op.opcode {
        opcode = [o.to_u8()];
        items.push((Tag::Opcode, &opcode));
    }
    let ski_bytes;
    if let Some(ski) = &op.ski {
        ski_bytes = ski.0;
        items.push((Tag::SubjectKeyIdentifier, &ski_bytes));
    }
    if let Some(d) = &op.cert_digest {
        items.push((Tag::CertificateDigest, d));
    }
    if let Some(sni) = &op.sni {
        items.push((Tag::ServerName, sni.as_bytes()));
    }
    let time_bytes;
    if let Some(t) = op.server_time {
        time_bytes = t.to_be_bytes();
        items.push((Tag::ServerTime, &time_bytes));
    }
    if op.draining {
        items.push((Tag::Draining, &[0x01]));
    }
    let trace_bytes;
    if let Some(t) = &op.trace {
        trace_bytes = t.encode();
        items.push((Tag::TraceContext, &trace_bytes));
    }
    let (cip, sip);
    if let Some(ip) = op.client_ip {
        cip = ip_bytes(ip);
        items.push((Tag::ClientIp, cip.as_slice()));
    }
    if let Some(ip) = op.server_ip {
        sip = ip_bytes(ip);
        items.push((Tag::ServerIp, sip.as_slice()));
    }
    for (tag, value) in [
        (Tag::CertId, &op.cert_id),
        (Tag::CustomFuncName, &op.custom_func_name),
        (Tag::Extra, &op.extra),
        (Tag::SignedMessage, &op.signed_message),
        (Tag::Payload, &op.payload),
    ] {
        if let Some(v) = value {
            items.push((tag, v));
        }
    }

    let mut body_len = 0usize;
    for (tag, value) in &items {
        if value.len() > MAX_BODY_LEN {
            dst.truncate(start);
            return Err(CodecError::TooLong(value.len()));
        }
        dst.put_u8(tag.to_u8());
        dst.put_u16(value.len() as u16); // checked just above
        dst.put_slice(value);
        body_len += ITEM_HEADER_LEN + value.len();
    }
    if HEADER_LEN + body_len + ITEM_HEADER_LEN <= PAD_TO {
        let pad = PAD_TO - HEADER_LEN - body_len - ITEM_HEADER_LEN;
        dst.put_u8(Tag::Padding.to_u8());
        dst.put_u16(pad as u16); // pad < PAD_TO
        dst.put_bytes(0, pad);
        body_len = PAD_TO - HEADER_LEN;
    }
    if body_len > MAX_BODY_LEN {
        dst.truncate(start);
        return Err(CodecError::TooLong(body_len));
    }
    dst[start + 2..start + 4].copy_from_slice(&(body_len as u16).to_be_bytes());
    Ok(())
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn parse_ip(id: u32, v: &[u8]) -> Result<IpAddr, CodecError> {
    if let Ok(b) = <[u8; 4]>::try_from(v) {
        Ok(IpAddr::from(b))
    } else if let Ok(b) = <[u8; 16]>::try_from(v) {
        Ok(IpAddr::from(b))
    } else {
        Err(CodecError::Format {
            id,
            reason: "IP address is neither 4 nor 16 bytes",
        })
    }
}

/// Decodes one whole frame from `src` if it holds one; leaves `src` untouched otherwise.
pub fn decode_message(src: &mut BytesMut) -> Result<Option<Message>, CodecError> {
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let major = src[0];
    let minor = src[1];
    let len = u16::from_be_bytes([src[2], src[3]]) as usize;
    let id = u32::from_be_bytes([src[4], src[5], src[6], src[7]]);
    if major != VERSION_MAJOR {
        return Err(CodecError::VersionMismatch { id, major, minor });
    }
    if src.len() < HEADER_LEN + len {
        src.reserve(HEADER_LEN + len - src.len());
        return Ok(None);
    }
    src.advance(HEADER_LEN);
    let body = src.split_to(len).freeze();
    let op = decode_items(id, body)?;
    Ok(Some(Message { id, op }))
}

fn decode_items(id: u32, mut body: Bytes) -> Result<Operation, CodecError> {
    let fmt = |reason| CodecError::Format { id, reason };
    let mut op = Operation::default();
    let mut seen = [false; 256];
    while body.has_remaining() {
        if body.remaining() < ITEM_HEADER_LEN {
            return Err(fmt("truncated item header"));
        }
        let raw_tag = body.get_u8();
        let len = body.get_u16() as usize;
        if body.remaining() < len {
            return Err(fmt("item longer than the frame"));
        }
        let value = body.split_to(len);
        let tag = Tag::from(raw_tag);
        if matches!(tag, Tag::Unknown(_)) {
            continue;
        }
        let seen_slot = &mut seen[usize::from(raw_tag)];
        if *seen_slot {
            return Err(fmt("duplicate item"));
        }
        *seen_slot = true;
        match tag {
            Tag::Opcode => {
                let [b] = value[..] else {
                    return Err(fmt("opcode is not one byte"));
                };
                op.opcode = Some(Opcode::from(b));
            }
            Tag::Payload => op.payload = Some(value),
            Tag::SubjectKeyIdentifier => {
                let ski = <[u8; 20]>::try_from(&value[..])
                    .map_err(|_| fmt("subject key identifier is not 20 bytes"))?;
                op.ski = Some(Ski(ski));
            }
            Tag::ServerName => {
                let name =
                    std::str::from_utf8(&value).map_err(|_| fmt("server name is not UTF-8"))?;
                op.sni = Some(name.to_owned());
            }
            Tag::ClientIp => op.client_ip = Some(parse_ip(id, &value)?),
            Tag::ServerIp => op.server_ip = Some(parse_ip(id, &value)?),
            Tag::CertificateDigest => {
                let d = <[u8; 32]>::try_from(&value[..])
                    .map_err(|_| fmt("certificate digest is not 32 bytes"))?;
                op.cert_digest = Some(d);
            }
            Tag::CertId => op.cert_id = Some(value),
            Tag::CustomFuncName => op.custom_func_name = Some(value),
            Tag::Extra => op.extra = Some(value),
            Tag::SignedMessage => op.signed_message = Some(value),
            Tag::ServerTime => {
                let t = <[u8; 8]>::try_from(&value[..])
                    .map_err(|_| fmt("server time is not 8 bytes"))?;
                op.server_time = Some(u64::from_be_bytes(t));
            }
            Tag::Draining => {
                if value[..] != [0x01] {
                    return Err(fmt("draining flag is not the byte 0x01"));
                }
                op.draining = true;
            }
            Tag::TraceContext => {
                op.trace = Some(TraceContext::decode(&value).ok_or_else(|| {
                    fmt("trace context is not version 0, 26 bytes, non-zero ids")
                })?);
            }
            Tag::Padding | Tag::Unknown(_) => {}
        }
    }
    Ok(op)
}

/// A tokio-util codec for Keyless frames, usable by both sides.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeylessCodec;

impl Decoder for KeylessCodec {
    type Item = Message;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, CodecError> {
        decode_message(src)
    }
}

impl Encoder<Message> for KeylessCodec {
    type Error = CodecError;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_message(&msg, dst)
    }
}

impl Encoder<&Message> for KeylessCodec {
    type Error = CodecError;

    fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_message(msg, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(id: u32, items: &[(u8, &[u8])]) -> BytesMut {
        let mut body = Vec::new();
        for (tag, v) in items {
            body.push(*tag);
            body.extend_from_slice(&(v.len() as u16).to_be_bytes());
            body.extend_from_slice(v);
        }
        let mut out = BytesMut::new();
        out.put_u8(1);
        out.put_u8(0);
        out.put_u16(body.len() as u16);
        out.put_u32(id);
        out.put_slice(&body);
        out
    }

    #[test]
    fn known_bytes_decode() {
        let mut buf = frame(7, &[(0x11, &[0xF1]), (0x12, b"hi"), (0x77, b"skipped")]);
        let msg = decode_message(&mut buf).unwrap().unwrap();
        assert_eq!(msg.id, 7);
        assert_eq!(msg.op.opcode, Some(Opcode::Ping));
        assert_eq!(msg.op.payload(), b"hi");
        assert!(buf.is_empty());
    }

    #[test]
    fn encoding_pads_to_1024_and_is_byte_exact() {
        let mut buf = BytesMut::new();
        let msg = Message {
            id: 0x01020304,
            op: Operation::new(Opcode::Ping, &b"abc"[..]),
        };
        encode_message(&msg, &mut buf).unwrap();
        assert_eq!(buf.len(), PAD_TO);
        assert_eq!(&buf[..8], &[1, 0, 0x03, 0xF8, 1, 2, 3, 4]);
        assert_eq!(&buf[8..12], &[0x11, 0, 1, 0xF1]);
        assert_eq!(&buf[12..18], &[0x12, 0, 3, b'a', b'b', b'c']);
        assert_eq!(buf[18], 0x20);
        assert_eq!(
            u16::from_be_bytes([buf[19], buf[20]]) as usize,
            PAD_TO - 8 - 10 - 3
        );
    }

    #[test]
    fn frames_one_or_two_bytes_short_of_1024_stay_unpadded() {
        // Header (8) + opcode item (4) + payload item (3 + n): n = 1007 and 1008 leave
        // 2 and 1 bytes, fewer than a padding item takes; the reference sends those
        // frames as they are.
        for n in 1000..1020 {
            let msg = Message {
                id: 7,
                op: Operation::new(Opcode::Ping, vec![0x5a; n]),
            };
            let mut buf = BytesMut::new();
            encode_message(&msg, &mut buf).unwrap();
            let expected = match 8 + 4 + 3 + n {
                len @ (1022 | 1023) => len,
                len => len.max(PAD_TO),
            };
            assert_eq!(buf.len(), expected, "payload {n}");
            assert_eq!(decode_message(&mut buf).unwrap().unwrap(), msg);
        }
    }

    #[test]
    fn duplicate_known_tag_is_format_error() {
        let mut buf = frame(9, &[(0x11, &[0xF1]), (0x11, &[0xF1])]);
        let err = decode_message(&mut buf).unwrap_err();
        assert_eq!(err.id(), Some(9));
        assert_eq!(err.code(), ErrorCode::Format);
    }

    #[test]
    fn duplicate_unknown_tag_is_skipped() {
        let mut buf = frame(9, &[(0x99, b"a"), (0x99, b"b"), (0x11, &[0xF1])]);
        assert!(decode_message(&mut buf).unwrap().is_some());
    }

    #[test]
    fn truncated_and_bad_items() {
        let mut buf = frame(1, &[(0x11, &[0xF1])]);
        buf.truncate(buf.len() - 1);
        // The header announces more than is there: wait for more.
        assert!(decode_message(&mut buf).unwrap().is_none());

        let mut buf = BytesMut::from(&[1u8, 0, 0, 2, 0, 0, 0, 5, 0x11, 0][..]);
        assert!(matches!(
            decode_message(&mut buf),
            Err(CodecError::Format { id: 5, .. })
        ));

        let mut buf = BytesMut::from(&[1u8, 0, 0, 4, 0, 0, 0, 5, 0x12, 0, 9, 0][..]);
        assert!(matches!(
            decode_message(&mut buf),
            Err(CodecError::Format { .. })
        ));

        let mut buf = frame(2, &[(0x04, &[0u8; 19])]);
        assert!(matches!(
            decode_message(&mut buf),
            Err(CodecError::Format { .. })
        ));

        let mut buf = frame(3, &[(0x11, &[1, 2])]);
        assert!(matches!(
            decode_message(&mut buf),
            Err(CodecError::Format { .. })
        ));
    }

    #[test]
    fn wrong_major_version() {
        let mut buf = frame(4, &[(0x11, &[0xF1])]);
        buf[0] = 2;
        let err = decode_message(&mut buf).unwrap_err();
        assert_eq!(err.code(), ErrorCode::VersionMismatch);
        assert_eq!(err.id(), Some(4));
    }

    #[test]
    fn oversized_payload_is_refused_on_encode() {
        let msg = Message {
            id: 1,
            op: Operation::new(Opcode::Response, vec![0u8; MAX_BODY_LEN]),
        };
        let mut buf = BytesMut::new();
        assert!(matches!(
            encode_message(&msg, &mut buf),
            Err(CodecError::TooLong(_))
        ));
        assert!(buf.is_empty());
    }

    fn opt_bytes(max: usize) -> impl Strategy<Value = Option<Bytes>> {
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from))
    }

    fn ip() -> impl Strategy<Value = Option<IpAddr>> {
        proptest::option::of(prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u8; 16]>().prop_map(IpAddr::from),
        ])
    }

    prop_compose! {
        fn operation()(
            opcode in proptest::option::of(any::<u8>().prop_map(Opcode::from)),
            payload in opt_bytes(3000),
            ski in proptest::option::of(any::<[u8; 20]>().prop_map(Ski)),
            sni in proptest::option::of("[a-z0-9.*-]{0,64}"),
            client_ip in ip(),
            server_ip in ip(),
            cert_digest in proptest::option::of(any::<[u8; 32]>()),
            cert_id in opt_bytes(40),
            custom_func_name in opt_bytes(20),
            extra in opt_bytes(20),
            signed_message in opt_bytes(200),
            server_time in proptest::option::of(any::<u64>()),
            draining in any::<bool>(),
            trace in proptest::option::of((any::<[u8; 16]>(), any::<[u8; 8]>(), any::<u8>())
                .prop_filter("non-zero ids", |(t, s, _)| t != &[0; 16] && s != &[0; 8])
                .prop_map(|(trace_id, span_id, flags)| TraceContext { trace_id, span_id, flags })),
        ) -> Operation {
            Operation { opcode, payload, ski, sni, client_ip, server_ip, cert_digest, cert_id,
                custom_func_name, extra, signed_message, server_time, draining, trace }
        }
    }

    proptest! {
        #[test]
        fn round_trip(id in any::<u32>(), op in operation()) {
            let msg = Message { id, op };
            let mut buf = BytesMut::new();
            encode_message(&msg, &mut buf).unwrap();
            // Padded to PAD_TO unless the padding item's header would not fit
            // (PROTOCOL.md, as the reference does it).
            prop_assert!(buf.len() > PAD_TO - ITEM_HEADER_LEN);
            // Split arbitrarily: the decoder waits for the whole frame.
            let mut partial = buf.split_to(buf.len() / 2);
            prop_assert!(decode_message(&mut partial).unwrap().is_none());
            partial.unsplit(buf);
            let back = decode_message(&mut partial).unwrap().unwrap();
            prop_assert_eq!(back, msg);
            prop_assert!(partial.is_empty());
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode_message(&mut buf) {}
        }
    }
}
