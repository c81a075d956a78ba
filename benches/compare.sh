#!/usr/bin/env bash
# Side-by-side benchmark, one run, one tool: the same livelock-loadgen
# workloads against this server (native and LiveLock protocols), Redis locks
# (SET NX PX + compare-and-delete) and the original LiveLock server, plus
# this server's PING round trips as the I/O ceiling. Prints one table with
# ratios, writes every JSON result under target/compare/, and stops
# everything it started. Only 127.0.0.1.
#
#   benches/compare.sh                 # 10 s per run
#   DURATION=3 benches/compare.sh      # quicker
#
# On a 2-core machine the generator needs a core of its own, so by default
# every server gets one (Redis and the original LiveLock are single-threaded
# anyway; ours runs one loop): SERVER_THREADS=1, LOADGEN_THREADS=1. The
# 2-loop row shows what a second loop does when it has no core to itself.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
trap stop_all EXIT
DURATION=${DURATION:-10}
SERVER_THREADS=${SERVER_THREADS:-1}
LOADGEN_THREADS=${LOADGEN_THREADS:-1}
OUT=target/compare
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.txt

install_peers
cargo build --release --workspace --bins --examples -q

start_livelock 27801 "$SERVER_THREADS"
MAIN_PID=$LIVELOCK_PID
start_livelock 27804 2
if have_redis; then start_redis 27802; fi
if have_original; then start_original_livelock 27803; fi

LL=livelock://127.0.0.1:27801
RL=livelock-resp://127.0.0.1:27801
RD=redis://127.0.0.1:27802
OG=livelock-resp://127.0.0.1:27803

run ping          $LL --op ping --connections 50
run ping_p16      $LL --op ping --connections 50 --pipeline 16
run lock_p1       $LL --connections 50 --pipeline 1 --keys 100000
run lock_p16      $LL --connections 50 --pipeline 16 --keys 100000
run lock_p1_2loops livelock://127.0.0.1:27804 --connections 50 --pipeline 1 --keys 100000
run lock_1conn    $LL --connections 1 --pipeline 1 --keys 100000
run contended     $LL --connections 50 --keys 10 --mode wait
run resp_p1       $RL --connections 50 --keys 100000
run resp_p16      $RL --connections 50 --pipeline 16 --keys 100000
if have_redis; then
    run redis_p1        $RD --connections 50 --pipeline 1 --keys 100000
    run redis_p16       $RD --connections 50 --pipeline 16 --keys 100000
    run redis_contended $RD --connections 50 --keys 10 --mode wait
fi
if have_original; then
    run original_p1 $OG --connections 50 --keys 100000
    run original_p16 $OG --connections 50 --pipeline 16 --keys 100000
fi

echo "measuring memory per held lock (1,000,000 locks) and 10,000 held connections" >&2
target/release/examples/hold_many --server 127.0.0.1:27801 --pid "$MAIN_PID" \
    --connections 100 --locks-per-connection 10000 --hold-secs 2 > "$OUT/memory.txt"
# 10,000 connections need 10,000+ descriptors on both sides.
( ulimit -n 65536 2>/dev/null || true
  target/release/examples/hold_many --server 127.0.0.1:27801 --pid "$MAIN_PID" \
      --connections 10000 --locks-per-connection 1 --hold-secs 10 > "$OUT/connections.txt" ) \
    || echo "10,000 connections: failed (descriptor limit?)" > "$OUT/connections.txt"
target/release/examples/kill_to_grant 127.0.0.1:27801 20 > "$OUT/kill_to_grant.txt"

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        return None
    r = json.load(open(path))
    return None if r.get("failed") else r
def p99(r, op):
    return r["ops"].get(op, {}).get("p99_us") if r else None
rows = []
def row(label, r, unit="cycles_per_sec", ref=None, ref_label=""):
    if r is None:
        rows.append((label, "n/a", "", "", "", ""))
        return
    value = r[unit]
    ratio = f"{value / ref[unit]:.2f}x {ref_label}" if ref else ""
    acq = p99(r, "acquire") or p99(r, "ping")
    rows.append((label, f"{value:,.0f}", f"{r['ops_per_sec']:,.0f}", f"{acq}" if acq else "", f"{r['errors']}/{r['violations']}", ratio))
L = {n: load(n) for n in ["ping", "ping_p16", "lock_p1", "lock_p16", "lock_p1_2loops", "lock_1conn", "contended", "resp_p1", "resp_p16", "redis_p1", "redis_p16", "redis_contended", "original_p1", "original_p16"]}
row("PING round trips, pipeline 1 (ceiling)", L["ping"], "ops_per_sec")
row("PING round trips, pipeline 16 (ceiling)", L["ping_p16"], "ops_per_sec")
row("livelock, 1 connection", L["lock_1conn"])
row("livelock, 50 conn, pipeline 1", L["lock_p1"], ref=L["redis_p1"], ref_label="Redis")
row("redis locks, 50 conn, pipeline 1", L["redis_p1"])
row("livelock, 2 loops, 50 conn, pipeline 1", L["lock_p1_2loops"], ref=L["redis_p1"], ref_label="Redis")
row("livelock, 50 conn, pipeline 16", L["lock_p16"], ref=L["redis_p16"], ref_label="Redis")
row("redis locks, 50 conn, pipeline 16", L["redis_p16"])
row("livelock, contended (10 keys, wait)", L["contended"], ref=L["redis_contended"], ref_label="Redis")
row("redis locks, contended (retry)", L["redis_contended"])
row("livelock via LiveLock protocol", L["resp_p1"], ref=L["original_p1"], ref_label="original")
row("original LiveLock server", L["original_p1"])
row("livelock via LiveLock protocol, pipeline 16", L["resp_p16"], ref=L["original_p16"], ref_label="original")
row("original LiveLock server, pipeline 16", L["original_p16"])
w = [max(len(r[i]) for r in rows + [("workload", "cycles/s", "ops/s", "acq p99 us", "err/viol", "ratio")]) for i in range(6)]
hdr = ("workload", "cycles/s", "ops/s", "acq p99 us", "err/viol", "ratio")
print("  ".join(h.ljust(w[i]) if i == 0 else h.rjust(w[i]) for i, h in enumerate(hdr)))
for r in rows:
    print("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)))
if L["lock_p1"] and L["ping"]:
    print(f"\nlock ops/s at pipeline 1 = {L['lock_p1']['ops_per_sec'] / L['ping']['ops_per_sec']:.0%} of PING round trips/s")
if L["lock_p16"] and L["ping_p16"]:
    print(f"lock ops/s at pipeline 16 = {L['lock_p16']['ops_per_sec'] / L['ping_p16']['ops_per_sec']:.0%} of PING round trips/s")
if L["lock_p1"] and L["redis_p1"]:
    print(f"p99 acquire: livelock {p99(L['lock_p1'],'acquire')} us, redis {p99(L['redis_p1'],'acquire')} us")
if L["contended"]:
    c = L["contended"]["ops"].get("acquire", {})
    print(f"contended acquire wait: p50 {c.get('p50_us')} us, p99 {c.get('p99_us')} us, max {c.get('max_us')} us")
if L["redis_contended"]:
    c = L["redis_contended"]["ops"].get("acquire", {})
    print(f"redis contended acquire (with retries): p50 {c.get('p50_us')} us, p99 {c.get('p99_us')} us, max {c.get('max_us')} us; retries {L['redis_contended'].get('retries')}")
for name in ["memory", "connections", "kill_to_grant"]:
    path = os.path.join(out, name + ".txt")
    if os.path.exists(path):
        print(open(path).read().rstrip())
PY
