//! Feeds arbitrary bytes to the frame decoder, as a key server or an edge receives them
//! from the network: it must never panic, and every frame it accepts must survive an
//! encode/decode round trip unchanged.
#![no_main]

use bytes::BytesMut;
use keyless_shared::{decode_message, encode_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut src = BytesMut::from(data);
    while let Ok(Some(msg)) = decode_message(&mut src) {
        let mut wire = BytesMut::new();
        // The decoded body was at most 65535 bytes; re-encoding writes only its known
        // items (each at most once) plus padding up to 1024, so it always fits again.
        encode_message(&msg, &mut wire).expect("a decoded message re-encodes");
        let first = wire.to_vec();
        let again = decode_message(&mut wire)
            .expect("a re-encoded message decodes")
            .expect("a re-encoded message is a whole frame");
        assert_eq!(again, msg, "round trip changed the message");
        assert!(wire.is_empty(), "re-encoding wrote more than one frame");

        // Encoding is deterministic: the second encoding is byte-identical.
        let mut wire2 = BytesMut::new();
        encode_message(&again, &mut wire2).expect("a decoded message re-encodes");
        assert_eq!(&wire2[..], &first[..], "encoding is not deterministic");
    }
});
