#!/usr/bin/env bash
# Beyond one lock, one run, one tool (livelock-loadgen), loopback only: the
# same server (memory durability, one loop) runs lock cycles (acquire +
# release) and counting-semaphore cycles (ACQUIRE_PERMITS + release) side by
# side, 50 connections: uncontended (100,000 keys) at pipeline 1 and 16, and
# contended (16 keys, --mode wait: waiters queue and are handed over).
# Then deadlock detection: 50 cycles of two sessions across the shards of
# a two-loop server (memory, then log durability), from the cycle closing
# to the Deadlock reply (examples/deadlock_latency.rs). Then the atomic
# multi-lock on a two-loop server (memory, then log): one lock cycle, 3
# single acquires + 3 releases, ACQUIRE_ALL of the same 3 names (on at
# least two shards) + 3 releases, and resource pools K=2 of N=16 (one
# pool per connection; one pool shared by all), 50 connections, one
# client (examples/multi_lock_cycles.rs).
# Prints the tables; JSON results go to target/primitives/.
#
#   benches/primitives.sh              # 10 s per run
#   DURATION=3 benches/primitives.sh   # quicker
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
trap stop_all EXIT
DURATION=${DURATION:-10}
OUT=target/primitives
mkdir -p "$OUT"
rm -f "$OUT"/*.json

cargo build --release --workspace --bins --examples -q

PORT=27851
start_livelock "$PORT" 1 memory
TARGET="livelock://127.0.0.1:$PORT"

for depth in 1 16; do
    run "lock_p$depth" "$TARGET" --connections 50 --pipeline "$depth"
    run "sem_p$depth" "$TARGET" --connections 50 --pipeline "$depth" --permits 1/4
done
run "lock_hot" "$TARGET" --connections 50 --keys 16 --mode wait
run "sem_hot" "$TARGET" --connections 50 --keys 16 --mode wait --permits 1/4
run "sem_hot_heavy" "$TARGET" --connections 50 --keys 16 --mode wait --permits 2/4

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    r = json.load(open(os.path.join(out, name + ".json")))
    return None if r.get("failed") else r
rows = [
    ("lock, 100k keys, pipeline 1", "lock_p1", None),
    ("semaphore 1 of 4, 100k keys, pipeline 1", "sem_p1", "lock_p1"),
    ("lock, 100k keys, pipeline 16", "lock_p16", None),
    ("semaphore 1 of 4, 100k keys, pipeline 16", "sem_p16", "lock_p16"),
    ("lock, 16 keys, wait", "lock_hot", None),
    ("semaphore 1 of 4, 16 keys, wait", "sem_hot", "lock_hot"),
    ("semaphore 2 of 4, 16 keys, wait", "sem_hot_heavy", "lock_hot"),
]
print(f"{'workload (50 connections)':<44} {'cycles/s':>10} {'acq p50 us':>10} {'acq p99 us':>10}  err/viol  vs lock")
for label, name, base in rows:
    r = load(name)
    if not r:
        print(f"{label:<44} {'n/a':>10}")
        continue
    acq = r["ops"].get("acquire", {})
    b = load(base) if base else None
    ratio = f"{r['cycles_per_sec'] / b['cycles_per_sec']:.2f}x" if b else ""
    print(f"{label:<44} {r['cycles_per_sec']:>10,.0f} {acq.get('p50_us', ''):>10} "
          f"{acq.get('p99_us', ''):>10}  {r['errors']}/{r['violations']:<6}  {ratio:>7}")
PY

for durability in memory log; do
    port=$((PORT + 1))
    [ "$durability" = log ] && port=$((PORT + 2))
    start_livelock "$port" 2 "$durability"
    echo -n "$durability durability: "
    target/release/examples/deadlock_latency "127.0.0.1:$port" 50
done

for durability in memory log; do
    port=$((PORT + 3))
    [ "$durability" = log ] && port=$((PORT + 4))
    start_livelock "$port" 2 "$durability"
    echo "multi-lock and pools, $durability durability, 2 loops:"
    target/release/examples/multi_lock_cycles "127.0.0.1:$port" 2 50 "$DURATION"
done
