//! The handoff wire protocol's frame decoder on hostile bytes (what one SOCK_SEQPACKET
//! recv returns). fds travel beside the bytes (`handoff::fds`) and are not needed to
//! decode: the header only announces how many.
//!
//! Properties: `decode_header` and `decode` return (no panic, bounded memory); they agree;
//! a decoded message encodes again, and that frame decodes to the same message.
#![no_main]

use cutover::handoff::protocol::{decode, decode_header, encode, ErrorCode, Message, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let header = decode_header(data);
    let decoded = decode(data);
    let msg = match (header, decoded) {
        (Ok(h), Ok(msg)) => {
            assert_eq!(h.kind, msg.kind());
            assert_eq!(h.fd_count, msg.fd_count());
            msg
        }
        (Err(h), Err(d)) => {
            assert_eq!(h, d, "decode and decode_header disagree on a bad header");
            let _ = d.code();
            return;
        }
        (Ok(_), Err(d)) => {
            let _ = d.code();
            return;
        }
        (Err(h), Ok(m)) => panic!("decode accepted {m:?} whose header is refused: {h}"),
    };
    let frame = match encode(&msg) {
        Ok(f) => f,
        Err(e) => panic!("a decoded message does not encode: {e}: {msg:?}"),
    };
    assert!(frame.len() <= MAX_FRAME);
    match (&msg, decode(&frame)) {
        // Error texts are cut to 1024 bytes on encoding, on purpose.
        (Message::Error { code, .. }, Ok(Message::Error { code: again, .. })) => {
            assert_eq!(ErrorCode::from_u16(*code as u16), again);
        }
        (_, Ok(again)) => {
            assert_eq!(again, msg);
            assert_eq!(frame, data, "a frame decodes and re-encodes differently");
        }
        (_, Err(e)) => panic!("a re-encoded frame does not decode: {e}: {msg:?}"),
    }
});
