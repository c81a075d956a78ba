#!/usr/bin/env bash
# What TLS costs, one run, one tool (livelock-loadgen), loopback only: the
# same server (memory durability, one loop) taking plaintext and TLS on its
# one port; 50 connections at pipeline 1 and 16, lock cycles (acquire +
# release). Certificates: a throwaway CA and server certificate made with
# openssl. Prints one table; JSON results go to target/tls/.
#
#   benches/tls.sh              # 10 s per run
#   DURATION=3 benches/tls.sh   # quicker
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
trap stop_all EXIT
DURATION=${DURATION:-10}
OUT=target/tls
mkdir -p "$OUT"
rm -f "$OUT"/*.json

cargo build --release --workspace --bins -q

# A CA and a certificate for 127.0.0.1 signed by it.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=bench CA" \
    -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' > "$WORK/san.ext"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" \
    -CAcreateserial -days 2 -extfile "$WORK/san.ext" -out "$WORK/server.pem" 2>/dev/null

PORT=27841
target/release/livelock server --listen "127.0.0.1:$PORT" --threads 1 --durability memory \
    --data-dir "$WORK/data" --log-level ERROR \
    --tls-cert "$WORK/server.pem" --tls-key "$WORK/server.key" &
PIDS+=($!)
wait_port "$PORT"

for depth in 1 16; do
    run "plain_p$depth" "livelock://127.0.0.1:$PORT" --connections 50 --pipeline "$depth"
    run "tls_p$depth" "livelock://127.0.0.1:$PORT" --connections 50 --pipeline "$depth" \
        --tls-ca "$WORK/ca.pem"
done

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    r = json.load(open(os.path.join(out, name + ".json")))
    return None if r.get("failed") else r
print(f"{'workload (50 connections)':<28} {'cycles/s':>10} {'acq p50 us':>10} {'acq p99 us':>10}  err/viol  TLS vs plain")
for depth in (1, 16):
    plain, tls = load(f"plain_p{depth}"), load(f"tls_p{depth}")
    for name, r in (("plaintext", plain), ("TLS", tls)):
        if not r:
            print(f"{name + ', pipeline ' + str(depth):<28} {'n/a':>10}")
            continue
        acq = r["ops"].get("acquire", {})
        ratio = f"{r['cycles_per_sec'] / plain['cycles_per_sec']:.2f}x" if name == "TLS" and plain else ""
        print(f"{name + ', pipeline ' + str(depth):<28} {r['cycles_per_sec']:>10,.0f} {acq.get('p50_us', ''):>10} "
              f"{acq.get('p99_us', ''):>10}  {r['errors']}/{r['violations']:<6}  {ratio:>12}")
PY
