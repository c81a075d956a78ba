//! Property tests of the decoders on arbitrary and mutated input: they never
//! panic, never claim more bytes than they were given, agree with themselves
//! when the input arrives in pieces, and a valid frame decodes to the request
//! that was encoded.

use livelock::protocol::{self, Decoded, DecodedReply, Mode, Request};
use livelock::resp;
use proptest::prelude::*;

/// Decodes every whole frame at the front of `buf`; returns the bytes used.
fn drain_native(buf: &[u8]) -> usize {
    let mut pos = 0;
    loop {
        match protocol::decode_request(&buf[pos..]) {
            Ok(Decoded::Frame { consumed, .. }) => {
                assert!(consumed >= protocol::HEADER_LEN && pos + consumed <= buf.len());
                pos += consumed;
            }
            Ok(Decoded::Incomplete) | Err(_) => return pos,
        }
    }
}

fn drain_resp(buf: &[u8], max_payload: usize) -> usize {
    let mut pos = 0;
    loop {
        match resp::decode(&buf[pos..], max_payload) {
            Ok(resp::Decoded::Command { consumed, args }) => {
                assert!(consumed > 0 && pos + consumed <= buf.len());
                let _ = resp::parse_command(&args);
                pos += consumed;
            }
            Ok(resp::Decoded::Empty { consumed }) => {
                assert!(consumed > 0);
                pos += consumed;
            }
            Ok(resp::Decoded::Incomplete) | Err(_) => return pos,
        }
    }
}

fn acquire_frame(id: u32, name: &[u8], wait_ms: u32, lease_ms: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let request = Request::Acquire {
        name,
        mode: Mode::Shared,
        weight: 1,
        capacity: 0,
        wait_ms,
        lease_ms,
        notify_queued: true,
    };
    protocol::encode_request(&mut out, id, &request);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn native_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = drain_native(&bytes);
        let _ = protocol::decode_reply(&bytes);
        let mut with_magic = vec![0xF1, 0x4C, 0x01];
        with_magic.extend_from_slice(&bytes);
        let _ = drain_native(&with_magic);
    }

    #[test]
    fn resp_decoding_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        max_payload in 16usize..4096,
    ) {
        let _ = drain_resp(&bytes, max_payload);
        let mut array = b"*2\r\n$2\r\nAQ\r\n".to_vec();
        array.extend_from_slice(&bytes);
        let _ = drain_resp(&array, max_payload);
    }

    #[test]
    fn a_valid_frame_round_trips_and_pieces_agree(
        id in any::<u32>(),
        name in proptest::collection::vec(any::<u8>(), 1..=1024),
        wait_ms in any::<u32>(),
        lease_ms in any::<u32>(),
        split in any::<prop::sample::Index>(),
    ) {
        let frame = acquire_frame(id, &name, wait_ms, lease_ms);
        let at = split.index(frame.len());
        prop_assert!(matches!(protocol::decode_request(&frame[..at]), Ok(Decoded::Incomplete)));
        match protocol::decode_request(&frame) {
            Ok(Decoded::Frame { consumed, request_id, result: Ok(Request::Acquire { name: n, wait_ms: w, lease_ms: l, .. }), .. }) => {
                prop_assert_eq!(consumed, frame.len());
                prop_assert_eq!(request_id, id);
                prop_assert_eq!(n, &name[..]);
                prop_assert_eq!((w, l), (wait_ms, lease_ms));
            }
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    #[test]
    fn a_mutated_frame_never_panics_and_never_overreads(
        name in proptest::collection::vec(any::<u8>(), 1..64),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut frame = acquire_frame(7, &name, 100, 0);
        frame.extend(acquire_frame(8, &name, 0, 0));
        for (at, byte) in flips {
            let i = at.index(frame.len());
            frame[i] = byte;
        }
        prop_assert!(drain_native(&frame) <= frame.len());
        if let Ok(DecodedReply::Frame { consumed, .. }) = protocol::decode_reply(&frame) {
            prop_assert!(consumed <= frame.len());
        }
    }
}
