# Shared by benches/compare.sh and benches/smoke.sh: start and stop the
# servers under test on loopback ports, and wait for them to listen.
# Every process started here is stopped by `stop_all` (set as an EXIT trap).

PIDS=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/livelock-bench.XXXXXX")

stop_all() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}

# wait_port PORT: until something listens on 127.0.0.1:PORT (at most 20 s).
wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    return 1
}

start_livelock() { # PORT [THREADS] [DURABILITY (memory)]
    target/release/livelock server --listen "127.0.0.1:$1" --threads "${2:-1}" \
        --durability "${3:-memory}" \
        --data-dir "$WORK/livelock-$1" \
        --log-level ERROR &
    PIDS+=($!)
    LIVELOCK_PID=$!
    wait_port "$1"
}

start_redis() { # PORT [--appendonly yes --appendfsync always ...]
    local port=$1; shift
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no "$@" \
        --dir "$WORK" --logfile "$WORK/redis.log" &
    PIDS+=($!)
    wait_port "$port"
}

start_original_livelock() { # PORT
    (cd "$WORK" && LIVELOCK_PORT="$1" LIVELOCK_LOGLEVEL=ERROR LIVELOCK_DATA_DIR="$WORK" \
        exec python3 -c 'from livelock.server import start; start()') &
    PIDS+=($!)
    wait_port "$1"
}

# run NAME TARGET ARGS...: one livelock-loadgen run of $DURATION s (1 s
# warm-up, $LOADGEN_THREADS threads, default 1), its JSON in $OUT/NAME.json.
run() {
    local name=$1; shift
    echo "running $name: livelock-loadgen $* --duration $DURATION" >&2
    target/release/livelock-loadgen "$@" --threads "${LOADGEN_THREADS:-1}" --duration "$DURATION" \
        --warmup 1 --json --quiet \
        > "$OUT/$name.json" || echo "{\"failed\": true}" > "$OUT/$name.json"
}

have_redis() { command -v redis-server >/dev/null; }
have_original() { python3 -c 'import livelock.server' 2>/dev/null; }

install_peers() {
    if ! have_redis; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } \
            >/dev/null 2>&1 || echo "could not install redis-server; Redis is skipped" >&2
    fi
    if ! have_original; then
        python3 -m pip install -q --disable-pip-version-check livelock==0.7.11 >/dev/null 2>&1 \
            || echo "could not install livelock==0.7.11; the original server is skipped" >&2
    fi
}
