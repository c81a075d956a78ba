//! Criterion benchmarks of the pure lock table: the cost of the state
//! machine alone, without I/O (uncontended, contended hand-off, shared).

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use livelock::lock_table::{Acquire, Command, Effect, LockTable, Mode, Wait};

fn acquire(session: u64, request_id: u32, name: &[u8], mode: Mode, wait: Wait) -> Command<'_> {
    Command::Acquire(Acquire {
        session,
        request_id,
        name,
        mode,
        weight: 1,
        capacity: 0,
        wait,
        lease_ms: 0,
        reentrant: false,
        notify_queued: false,
    })
}

fn release(session: u64, request_id: u32, name: &[u8]) -> Command<'_> {
    Command::Release {
        session,
        request_id,
        name,
        token: 0,
    }
}

fn uncontended(c: &mut Criterion) {
    let names: Vec<Vec<u8>> = (0..100_000)
        .map(|i| format!("key:{i}").into_bytes())
        .collect();
    let mut table = LockTable::new(0, 1);
    let mut out: Vec<Effect> = Vec::with_capacity(16);
    let mut i = 0usize;
    c.bench_function("lock_table/uncontended acquire+release", |b| {
        b.iter(|| {
            let name = &names[i % names.len()];
            i += 1;
            table.apply(0, acquire(1, 1, name, Mode::Exclusive, Wait::Try), &mut out);
            table.apply(0, release(1, 2, name), &mut out);
            black_box(&out);
            out.clear();
        })
    });
    // A table that already holds 100k locks: lookups in a big table.
    let mut table = LockTable::new(0, 1);
    for (n, name) in names.iter().enumerate() {
        table.apply(
            0,
            acquire(2 + n as u64, 1, name, Mode::Exclusive, Wait::Try),
            &mut out,
        );
    }
    out.clear();
    let fresh: Vec<Vec<u8>> = (0..100_000)
        .map(|i| format!("other:{i}").into_bytes())
        .collect();
    c.bench_function("lock_table/acquire+release beside 100k held", |b| {
        b.iter(|| {
            let name = &fresh[i % fresh.len()];
            i += 1;
            table.apply(0, acquire(1, 1, name, Mode::Exclusive, Wait::Try), &mut out);
            table.apply(0, release(1, 2, name), &mut out);
            black_box(&out);
            out.clear();
        })
    });
}

fn contended(c: &mut Criterion) {
    // Two sessions hand one lock back and forth through the queue: each
    // release grants the waiter in the same step.
    let mut table = LockTable::new(0, 1);
    let mut out: Vec<Effect> = Vec::with_capacity(16);
    let name = b"hot";
    table.apply(
        0,
        acquire(1, 0, name, Mode::Exclusive, Wait::Forever),
        &mut out,
    );
    let mut holder = 1u64;
    let mut request = 1u32;
    c.bench_function(
        "lock_table/contended hand-off (queue + release + grant)",
        |b| {
            b.iter(|| {
                let waiter = 3 - holder;
                request = request.wrapping_add(1);
                table.apply(
                    0,
                    acquire(waiter, request, name, Mode::Exclusive, Wait::Forever),
                    &mut out,
                );
                table.apply(0, release(holder, request, name), &mut out);
                holder = waiter;
                black_box(&out);
                out.clear();
            })
        },
    );
}

fn shared(c: &mut Criterion) {
    c.bench_function("lock_table/64 readers then a writer", |b| {
        b.iter_batched(
            || (LockTable::new(0, 1), Vec::with_capacity(128)),
            |(mut table, mut out): (LockTable, Vec<Effect>)| {
                for s in 0..64 {
                    table.apply(
                        0,
                        acquire(s, 1, b"shared", Mode::Shared, Wait::Forever),
                        &mut out,
                    );
                }
                table.apply(
                    0,
                    acquire(100, 1, b"shared", Mode::Exclusive, Wait::Forever),
                    &mut out,
                );
                for s in 0..64 {
                    table.apply(0, release(s, 2, b"shared"), &mut out);
                }
                black_box(out.len())
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, uncontended, contended, shared);
criterion_main!(benches);
