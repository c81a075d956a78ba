#!/usr/bin/env bash
# A/B of two livelock server binaries under the same workloads, alternating
# A and B so that drifts of a shared machine hit both alike: one loop each
# (pinned to core 1), the load generator on core 0, 50 connections, ROUNDS
# rounds of DURATION seconds per workload. Prints one line per run.
#
#   git worktree add /tmp/base <commit>
#   (cd /tmp/base && CARGO_TARGET_DIR=/tmp/base-target cargo build --release --bin livelock)
#   cargo build --release --workspace
#   benches/ab.sh /tmp/base-target/release/livelock target/release/livelock
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
A=$1 B=$2
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
LOADGEN=target/release/livelock-loadgen
[ -x "$LOADGEN" ] || cargo build --release -p livelock-loadgen

run() { # BIN LABEL PORT ARGS...
    local bin=$1 label=$2 port=$3
    shift 3
    mkdir -p "$WORK/data-$port"
    taskset -c 1 "$bin" server --listen "127.0.0.1:$port" --threads 1 --no-dump \
        --data-dir "$WORK/data-$port" --log-level ERROR &
    local pid=$!
    wait_port "$port"
    local out
    out=$(taskset -c 0 "$LOADGEN" "livelock://127.0.0.1:$port" --threads 1 \
        --duration "$DURATION" --json --quiet "$@")
    kill -TERM "$pid"
    wait "$pid" || true
    python3 - "$label" "$out" "$*" <<'PY'
import json, sys
label, out, args = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
print(f"{label}  {args:<36} cycles/s {out['cycles_per_sec']:>10.0f}  "
      f"errors {out['errors']}  violations {out['violations']}")
PY
}

for round in $(seq "$ROUNDS"); do
    for workload in "--connections 50" "--connections 50 --pipeline 16" \
        "--connections 50 --keys 10 --mode wait"; do
        # shellcheck disable=SC2086
        run "$A" A 27801 $workload
        # shellcheck disable=SC2086
        run "$B" B 27802 $workload
    done
done
