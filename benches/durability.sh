#!/usr/bin/env bash
# What durability costs, one run, one tool (livelock-loadgen), loopback
# only: this server with --durability log and with --durability memory
# against Redis in its durable mode (--appendonly yes --appendfsync always),
# 50 connections at pipeline 1 and 16; the log's bytes per lock cycle (from
# the server's own counters); and, with 1,000,000 held locks, the snapshot
# size, and the restart time after a clean shutdown and after kill -9.
# Prints one table; JSON results go to target/durability/.
#
#   benches/durability.sh              # 10 s per run
#   DURATION=3 benches/durability.sh   # quicker
#
# Every server gets one loop (the generator needs the other core), as in
# benches/compare.sh. The data directories are under $TMPDIR (default /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
trap stop_all EXIT
DURATION=${DURATION:-10}
OUT=target/durability
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.txt

install_peers
cargo build --release --workspace --bins --examples -q

# metric PORT NAME: one value from the metrics endpoint.
metric() {
    python3 - "$1" "$2" <<'PY'
import sys, urllib.request
port, name = sys.argv[1], sys.argv[2]
for line in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode().splitlines():
    if line.startswith(name + " "):
        print(int(float(line.split()[1])))
        break
PY
}

start_log() { # PORT METRICS_PORT DIR: a --durability log server
    target/release/livelock server --listen "127.0.0.1:$1" --threads 1 --durability log \
        --data-dir "$3" --metrics "127.0.0.1:$2" 2>>"$3.stderr" &
    PIDS+=($!)
    LOG_PID=$!
    wait_port "$1"
}

start_log 27811 27821 "$WORK/log"
start_livelock 27812 1 memory
if have_redis; then start_redis 27813 --appendonly yes --appendfsync always; fi

bytes0=$(metric 27821 livelock_log_bytes_total)
writes0=$(metric 27821 livelock_log_writes_total)
run log_p1 livelock://127.0.0.1:27811 --connections 50 --pipeline 1 --keys 100000
bytes1=$(metric 27821 livelock_log_bytes_total)
writes1=$(metric 27821 livelock_log_writes_total)
run log_p16 livelock://127.0.0.1:27811 --connections 50 --pipeline 16 --keys 100000
bytes2=$(metric 27821 livelock_log_bytes_total)
writes2=$(metric 27821 livelock_log_writes_total)
run memory_p1 livelock://127.0.0.1:27812 --connections 50 --pipeline 1 --keys 100000
run memory_p16 livelock://127.0.0.1:27812 --connections 50 --pipeline 16 --keys 100000
if have_redis; then
    run redis_aof_p1 redis://127.0.0.1:27813 --connections 50 --pipeline 1 --keys 100000
    run redis_aof_p16 redis://127.0.0.1:27813 --connections 50 --pipeline 16 --keys 100000
fi
echo "$bytes0 $bytes1 $bytes2 $writes0 $writes1 $writes2" > "$OUT/log_counters.txt"
stop_all
PIDS=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/livelock-bench.XXXXXX")

# 1,000,000 held locks (100 graceful sessions x 10,000), then a clean
# restart and a kill -9 restart; the start-up lines say what was restored.
echo "holding 1,000,000 locks on a --durability log server" >&2
DIR="$WORK/big"
start_log 27831 27841 "$DIR"
target/release/examples/hold_many --server 127.0.0.1:27831 --pid "$LOG_PID" \
    --connections 100 --locks-per-connection 10000 --hold-secs 1 --grace-ms 600000 \
    > "$OUT/hold.txt"
# Every lock was granted (so logged); the sessions are detached now, with
# their grace, so a clean shutdown keeps them too.
log_bytes=$(du -sb "$DIR/log" | cut -f1)
gone() { # PID: wait (bounded) until the process has exited
    for _ in $(seq 600); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    echo "process $1 did not exit" >&2; return 1
}
kill -TERM "$LOG_PID"; gone "$LOG_PID"
dump_bytes=$(stat -c %s "$DIR/livelock.dump")
restart() { # LABEL: start on $DIR; record the ms until it says it listens
    local t0 t1 before
    before=$(grep -c "listening on" "$DIR.stderr" || true)
    t0=$(date +%s%N)
    target/release/livelock server --listen 127.0.0.1:27831 --threads 1 --durability log \
        --data-dir "$DIR" 2>>"$DIR.stderr" &
    PIDS+=($!)
    LOG_PID=$!
    for _ in $(seq 6000); do
        [ "$(grep -c "listening on" "$DIR.stderr" || true)" -gt "$before" ] && break
        sleep 0.01
    done
    t1=$(date +%s%N)
    echo "$1 $(( (t1 - t0) / 1000000 ))" >> "$OUT/restarts.txt"
}
restart clean
# Changes after the restart are in the log only: a crash replays them.
target/release/examples/hold_many --server 127.0.0.1:27831 \
    --connections 10 --locks-per-connection 10000 --hold-secs 0 --grace-ms 600000 --prefix m \
    > "$OUT/hold_more.txt"
kill -9 "$LOG_PID"; gone "$LOG_PID"
restart crash
cp "$DIR.stderr" "$OUT/big.stderr"
echo "$log_bytes $dump_bytes" > "$OUT/big_sizes.txt"

DURATION=$DURATION python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        return None
    r = json.load(open(path))
    return None if r.get("failed") else r
L = {n: load(n) for n in ["log_p1", "log_p16", "memory_p1", "memory_p16", "redis_aof_p1", "redis_aof_p16"]}
def cell(r):
    return f"{r['cycles_per_sec']:,.0f}" if r else "n/a"
def p99(r):
    return str(r["ops"].get("acquire", {}).get("p99_us", "")) if r else ""
def ratio(a, b):
    return f"{a['cycles_per_sec'] / b['cycles_per_sec']:.2f}x" if a and b else "n/a"
print(f"{'workload (50 connections)':<40} {'cycles/s':>10} {'acq p99 us':>10}  {'err/viol':>8}  vs durable Redis  vs memory")
for depth in ("p1", "p16"):
    for name in ("log", "memory", "redis_aof"):
        r = L[f"{name}_{depth}"]
        ev = f"{r['errors']}/{r['violations']}" if r else ""
        vs_redis = ratio(r, L[f"redis_aof_{depth}"]) if name != "redis_aof" else ""
        vs_mem = ratio(r, L[f"memory_{depth}"]) if name == "log" else ""
        print(f"{name + ', pipeline ' + depth[1:]:<40} {cell(r):>10} {p99(r):>10}  {ev:>8}  {vs_redis:>16}  {vs_mem:>9}")
b0, b1, b2, w0, w1, w2 = map(int, open(os.path.join(out, "log_counters.txt")).read().split())
for label, name, db, dw in (("pipeline 1", "log_p1", b1 - b0, w1 - w0), ("pipeline 16", "log_p16", b2 - b1, w2 - w1)):
    r = L[name]
    if r and r["cycles"]:
        # The counters include the 1 s warm-up: count its cycles too.
        d = float(os.environ["DURATION"])
        cycles = r["cycles"] * (d + 1) / d
        print(f"log, {label}: {db / cycles:.0f} bytes and {dw / cycles:.3f} fsyncs per lock cycle ({dw:,} writes)")
log_bytes, dump_bytes = map(int, open(os.path.join(out, "big_sizes.txt")).read().split())
print(f"1,000,000 held locks: log {log_bytes / 1e6:.1f} MB before the restart, snapshot (dump file) {dump_bytes / 1e6:.1f} MB")
for line in open(os.path.join(out, "restarts.txt")):
    label, ms = line.split()
    held = "1,000,000 held locks" if label == "clean" else "1,100,000 held locks, 100,000 of them only in the log"
    print(f"restart after a {label} stop with {held}: listening after {int(ms):,} ms")
for line in open(os.path.join(out, "big.stderr")):
    if any(word in line for word in ("snapshot", "replayed", "restored", "log store")):
        print("  " + line.strip())
PY
