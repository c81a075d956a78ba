//! Criterion benchmarks of the native codec: decoding a request from a read
//! buffer and encoding replies into a write buffer, the per-request work of
//! the protocol layer.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use livelock::protocol::{self, Decoded, Mode, Request, Status};

fn decode(c: &mut Criterion) {
    let mut frame = Vec::new();
    let acquire = Request::Acquire {
        name: b"report:000042",
        mode: Mode::Exclusive,
        weight: 1,
        capacity: 0,
        wait_ms: 0,
        lease_ms: 0,
        notify_queued: false,
    };
    protocol::encode_request(&mut frame, 7, &acquire);
    c.bench_function("protocol/decode acquire", |b| {
        b.iter(|| match protocol::decode_request(black_box(&frame)) {
            Ok(Decoded::Frame {
                consumed, result, ..
            }) => {
                black_box((consumed, result.is_ok()));
            }
            _ => unreachable!(),
        })
    });
    let mut pipeline = Vec::new();
    for id in 0..16 {
        protocol::encode_request(&mut pipeline, id, &acquire);
    }
    c.bench_function("protocol/decode 16 pipelined acquires", |b| {
        b.iter(|| {
            let mut pos = 0;
            while let Ok(Decoded::Frame { consumed, .. }) =
                protocol::decode_request(&pipeline[pos..])
            {
                pos += consumed;
            }
            black_box(pos)
        })
    });
}

fn encode(c: &mut Criterion) {
    let mut out = Vec::with_capacity(4096);
    c.bench_function("protocol/encode granted + release ok", |b| {
        b.iter(|| {
            out.clear();
            protocol::encode_granted(&mut out, protocol::opcode::ACQUIRE, 7, black_box(42), false);
            protocol::encode_status(&mut out, protocol::opcode::RELEASE, 8, Status::Ok, "");
            black_box(out.len())
        })
    });
    c.bench_function("protocol/encode acquire request", |b| {
        b.iter(|| {
            out.clear();
            let request = Request::Acquire {
                name: b"report:000042",
                mode: Mode::Exclusive,
                weight: 1,
                capacity: 0,
                wait_ms: 0,
                lease_ms: 0,
                notify_queued: false,
            };
            protocol::encode_request(&mut out, 7, black_box(&request));
            black_box(out.len())
        })
    });
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
