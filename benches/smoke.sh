#!/usr/bin/env bash
# A few seconds of load against every target installable here (this server's
# native and LiveLock protocols, Redis, the original LiveLock server): the
# load generator must run, and report cycles, no errors and no violations.
# Used by scripts/test; the real measurements are benches/compare.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
trap stop_all EXIT
[ -x target/release/livelock-loadgen ] || cargo build --release --workspace

check() { # NAME TARGET ARGS...
    local name=$1; shift
    local out="$WORK/$name.json"
    target/release/livelock-loadgen "$@" --duration 2 --connections 8 --json --quiet > "$out"
    python3 - "$name" "$out" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
r = json.load(open(path))
ok = r["cycles"] > 0 and r["errors"] == 0 and r["violations"] == 0
print(f"smoke {name:<22} cycles/s {r['cycles_per_sec']:>10.0f}  errors {r['errors']}  violations {r['violations']}  {'ok' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PY
}

start_livelock 27901
check livelock livelock://127.0.0.1:27901
check livelock-pipeline livelock://127.0.0.1:27901 --pipeline 16
check livelock-ping livelock://127.0.0.1:27901 --op ping
check livelock-contended livelock://127.0.0.1:27901 --keys 4 --mode wait
start_livelock 27905 2 log
check livelock-log livelock://127.0.0.1:27905 --pipeline 4
check livelock-resp livelock-resp://127.0.0.1:27901
if have_redis; then
    start_redis 27902
    check redis redis://127.0.0.1:27902
else
    echo "smoke redis: redis-server not installed, skipped"
fi
if have_original; then
    start_original_livelock 27903
    check original-livelock livelock-resp://127.0.0.1:27903
else
    echo "smoke original-livelock: livelock==0.7.11 not installed, skipped"
fi
