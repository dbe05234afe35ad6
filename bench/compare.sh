#!/usr/bin/env bash
# Side-by-side benchmark: wsgate vs nginx vs HAProxy vs the backend directly.
#
# Every target is a wss:// -> ws:// WebSocket proxy in front of the same echo
# backend (direct = ws:// to the backend itself, the ceiling). The proxy under
# test is pinned to PROXY_CPU, the load generator and the backend to LOAD_CPU.
# Targets are interleaved (the order rotates every round) and repeated ROUNDS
# times; bench/aggregate.py prints the medians. See bench/README.md.
#
# All traffic stays on loopback. Every wait is bounded; every bench run has a
# wall-clock timeout, and a target that fails is recorded as errors, not fatal.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# ------------------------------------------------------------------- knobs
ROUNDS=${ROUNDS:-3}
TARGETS=${TARGETS:-"wsgate nginx haproxy bytecopy direct"}
WORKLOADS=${WORKLOADS:-"idle tp1k tp64 handshake"}
DURATION=${DURATION:-8}            # seconds of sending per throughput run
SESSIONS=${SESSIONS:-50}           # throughput sessions
WINDOW=${WINDOW:-8}                # messages in flight per session
IDLE_SESSIONS=${IDLE_SESSIONS:-9000}
IDLE_HOLD=${IDLE_HOLD:-5}          # seconds the idle sessions are held (from the first connect)
IDLE_DIRECT=${IDLE_DIRECT:-0}      # 1 = also run idle against the backend directly
HS_SESSIONS=${HS_SESSIONS:-3000}
HS_CONCURRENCY=${HS_CONCURRENCY:-16}
NSOURCES=${NSOURCES:-10}           # client source addresses 127.0.0.1 .. 127.0.0.N
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}    # hard wall-clock limit per bench run, seconds
QUIET_BUSY=${QUIET_BUSY:-15}       # before each run, wait until the machine is below this % busy ...
QUIET_WAIT=${QUIET_WAIT:-30}       # ... for at most this many seconds per run (0 = do not wait)
QUIET_BUDGET=${QUIET_BUDGET:-240}  # ... and at most this many seconds over the whole script
QUIET_SPENT=0
OTHER_MAX=${OTHER_MAX:-0.15}       # a run during which other work used more cores than this ...
RETRY_DISTURBED=${RETRY_DISTURBED:-2}  # ... is run again, at most this many times
SKIP_INSTALL=${SKIP_INSTALL:-0}
WSGATE_B=${WSGATE_B:-}             # a second wsgate binary, run as target "wsgate-b" (A/B a change)
PERF_TARGETS=${PERF_TARGETS:-}     # e.g. "wsgate": record a cpu-clock profile of these targets per workload
PERF_STAT=${PERF_STAT:-}           # e.g. "raw_syscalls:sys_enter": count these events instead (perf stat)
SKIP_BUILD=${SKIP_BUILD:-0}
ECHO_PORT=${ECHO_PORT:-19000}
WSGATE_PORT=${WSGATE_PORT:-19443}
WSGATE_ADMIN_PORT=${WSGATE_ADMIN_PORT:-19090}
NGINX_PORT=${NGINX_PORT:-19444}
HAPROXY_PORT=${HAPROXY_PORT:-19445}
BYTECOPY_PORT=${BYTECOPY_PORT:-19446}
OUT=${OUT:-$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)}
ORIGIN=https://bench.example

BENCH=${BENCH:-$ROOT/target/release/wsgate-bench}
WSGATE=${WSGATE:-$ROOT/target/release/wsgate}

log() { printf '[compare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

mkdir -p "$OUT" || die "cannot create $OUT"
WORK=$(mktemp -d /tmp/wsgate-bench.XXXXXX) || die "mktemp failed"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"

# Processes this script started, stopped by PID on exit.
STARTED=()
cleanup() {
    for p in "${STARTED[@]}"; do
        kill "$p" 2>/dev/null
    done
    sleep 0.3
    for p in "${STARTED[@]}"; do
        kill -9 "$p" 2>/dev/null
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A proxy needs 2 fds per session (client + backend). Raise the soft limit to
# the hard one (raising the hard limit needs CAP_SYS_RESOURCE, which a
# container often lacks: 9,000 sessions fit in 20,000).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
[ "$NOFILE" = unlimited ] && NOFILE=1048576
[ "$NOFILE" -gt 200000 ] && NOFILE=200000
if [ "$NOFILE" -lt $((2 * IDLE_SESSIONS + 1000)) ]; then
    echo "warning: open-file limit $NOFILE is too low for IDLE_SESSIONS=$IDLE_SESSIONS" >&2
fi
PROXY_MAXCONN=$(((NOFILE - 1000) / 2))

SOURCES=$(seq -s, -f '127.0.0.%g' 1 "$NSOURCES")

# ------------------------------------------------------------ install, build
install_proxies() {
    if command -v nginx >/dev/null && command -v haproxy >/dev/null; then
        return 0
    fi
    [ "$SKIP_INSTALL" = 1 ] && { log "nginx/haproxy missing and SKIP_INSTALL=1"; return 0; }
    log "installing nginx-light and haproxy from Debian (services are not started)"
    local created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        # invoke-rc.d asks this script; 101 = "action not allowed": no service start.
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && created_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$OUT/apt.log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light haproxy >>"$OUT/apt.log" 2>&1 \
        || log "apt-get install failed, see $OUT/apt.log"
    [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    return 0
}

build() {
    [ "$SKIP_BUILD" = 1 ] && return 0
    log "building wsgate-bench (release)"
    nice cargo build --release -p wsgate-bench >"$OUT/build-bench.log" 2>&1 || die "bench build failed, see $OUT/build-bench.log"
    log "building wsgate (release)"
    if ! nice cargo build --release -p wsgate --bin wsgate >"$OUT/build-wsgate.log" 2>&1; then
        log "wsgate build failed (see $OUT/build-wsgate.log): its runs will be recorded as errors"
    fi
}

# --------------------------------------------------------------- helpers
wait_port() { # port -> 0 when something listens, within ~10 s
    local i
    for i in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

cpu_busy_pct() { # whole-machine busy % over ~1 s, from /proc/stat
    local a b
    read -r -a a < <(grep '^cpu ' /proc/stat)
    sleep 1
    read -r -a b < <(grep '^cpu ' /proc/stat)
    local i ta=0 tb=0
    for i in 1 2 3 4 5 6 7 8; do
        ta=$((ta + a[i]))
        tb=$((tb + b[i]))
    done
    local idle=$(((b[4] + b[5]) - (a[4] + a[5]))) total=$((tb - ta))
    [ "$total" -gt 0 ] || { echo 0; return; }
    echo $(((100 * (total - idle)) / total))
}

# Other work on this machine (a compiler, say) skews every figure: wait,
# bounded, until it is quiet, and record how busy it was.
wait_quiet() {
    local waited=0 busy
    busy=$(cpu_busy_pct)
    while [ "$busy" -ge "$QUIET_BUSY" ] && [ "$waited" -lt "$QUIET_WAIT" ] && [ "$QUIET_SPENT" -lt "$QUIET_BUDGET" ]; do
        sleep 2
        waited=$((waited + 3))
        QUIET_SPENT=$((QUIET_SPENT + 3))
        busy=$(cpu_busy_pct)
    done
    [ "$busy" -ge "$QUIET_BUSY" ] && log "  machine still ${busy}% busy after ${waited}s: measuring anyway"
    BUSY_BEFORE=$busy
}

stop_pid() {
    local p=$1 i
    kill "$p" 2>/dev/null || return 0
    for i in $(seq 1 50); do
        kill -0 "$p" 2>/dev/null || { wait "$p" 2>/dev/null; return 0; }
        sleep 0.1
    done
    kill -9 "$p" 2>/dev/null
    wait "$p" 2>/dev/null
    return 0
}

write_configs() {
    mkdir -p "$WORK/nginx" "$WORK/haproxy"
    cat >"$WORK/wsgate.toml" <<EOF
[server]
listen = "127.0.0.1:$WSGATE_PORT"
max_connections = 20000

[tls]
cert = "$WORK/tls/cert.pem"
key = "$WORK/tls/key.pem"
min_version = "1.2"

[backend]
url = "ws://127.0.0.1:$ECHO_PORT"

[origin]
allow = ["$ORIGIN"]

[auth]
mode = "jwt"
algorithms = ["HS256"]
secret_env = "WSGATE_JWT_SECRET"
sources = ["header"]

[limits]
max_connections_per_ip = 10000
handshakes_per_second_per_ip = 100000
handshake_burst_per_ip = 100000
max_pending_handshakes_per_ip = 10000
messages_per_second = 1000000
message_burst = 1000000
bytes_per_second = "1GiB"
byte_burst = "1GiB"
max_frame_size = "64KiB"
max_message_size = "1MiB"

[admin]
listen = "127.0.0.1:$WSGATE_ADMIN_PORT"

[log]
level = "warn"
EOF

    cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
user root;

events {
    worker_connections $((NOFILE - 500));
}

http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;

    map \$http_upgrade \$connection_upgrade {
        default upgrade;
        ''      close;
    }

    server {
        listen 127.0.0.1:$NGINX_PORT ssl;
        ssl_certificate $WORK/tls/cert.pem;
        ssl_certificate_key $WORK/tls/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;

        location / {
            proxy_pass http://127.0.0.1:$ECHO_PORT;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_set_header Host \$host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }
    }
}
EOF

    cat >"$WORK/haproxy/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $PROXY_MAXCONN
    ssl-default-bind-options ssl-min-ver TLSv1.2

defaults
    mode http
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout http-request 10s
    maxconn $PROXY_MAXCONN

frontend wss
    bind 127.0.0.1:$HAPROXY_PORT ssl crt $WORK/tls/combined.pem
    default_backend echo

backend echo
    server echo1 127.0.0.1:$ECHO_PORT
EOF
}

# Sets TARGET_PIDS (comma list for the probe), TARGET_URL, TARGET_MAIN_PID.
start_target() {
    local t=$1
    TARGET_PIDS=""
    TARGET_MAIN_PID=""
    case $t in
    wsgate | wsgate-b)
        local bin=$WSGATE
        [ "$t" = wsgate-b ] && bin=$WSGATE_B
        [ -x "$bin" ] || { log "$t binary missing"; return 1; }
        taskset -c "$PROXY_CPU" "$bin" run --config "$WORK/wsgate.toml" >>"$OUT/$t.log" 2>&1 &
        TARGET_MAIN_PID=$!
        STARTED+=("$TARGET_MAIN_PID")
        TARGET_URL="wss://localhost:$WSGATE_PORT/echo"
        wait_port "$WSGATE_PORT" || return 1
        TARGET_PIDS=$TARGET_MAIN_PID
        ;;
    nginx)
        command -v nginx >/dev/null || { log "nginx missing"; return 1; }
        taskset -c "$PROXY_CPU" nginx -p "$WORK/nginx" -e "$WORK/nginx/error.log" -c "$WORK/nginx/nginx.conf" \
            -g 'daemon off;' >>"$OUT/nginx.log" 2>&1 &
        TARGET_MAIN_PID=$!
        STARTED+=("$TARGET_MAIN_PID")
        TARGET_URL="wss://localhost:$NGINX_PORT/echo"
        wait_port "$NGINX_PORT" || return 1
        local workers
        workers=$(pgrep -P "$TARGET_MAIN_PID" | paste -sd, -)
        [ -n "$workers" ] || return 1
        TARGET_PIDS="$TARGET_MAIN_PID,$workers"
        ;;
    haproxy)
        command -v haproxy >/dev/null || { log "haproxy missing"; return 1; }
        taskset -c "$PROXY_CPU" haproxy -db -f "$WORK/haproxy/haproxy.cfg" >>"$OUT/haproxy.log" 2>&1 &
        TARGET_MAIN_PID=$!
        STARTED+=("$TARGET_MAIN_PID")
        TARGET_URL="wss://localhost:$HAPROXY_PORT/echo"
        wait_port "$HAPROXY_PORT" || return 1
        TARGET_PIDS=$TARGET_MAIN_PID
        ;;
    bytecopy)
        # The issue's reference: a plain tokio-rustls byte relay, nothing parsed.
        taskset -c "$PROXY_CPU" "$BENCH" relay --listen "127.0.0.1:$BYTECOPY_PORT" \
            --backend "127.0.0.1:$ECHO_PORT" --cert "$WORK/tls/cert.pem" --key "$WORK/tls/key.pem" \
            >>"$OUT/bytecopy.log" 2>&1 &
        TARGET_MAIN_PID=$!
        STARTED+=("$TARGET_MAIN_PID")
        TARGET_URL="wss://localhost:$BYTECOPY_PORT/echo"
        wait_port "$BYTECOPY_PORT" || return 1
        TARGET_PIDS=$TARGET_MAIN_PID
        ;;
    direct)
        TARGET_URL="ws://127.0.0.1:$ECHO_PORT/echo"
        ;;
    *)
        log "unknown target $t"
        return 1
        ;;
    esac
    return 0
}

# The comparison is only fair if wsgate really enforces its policy while being
# measured: one refused upgrade each for a bad signature, a missing token and a
# foreign Origin (answers recorded in policy-check.txt).
policy_check() {
    local bad_token last e1 e2 e3
    last=${TOKEN: -1}
    bad_token="${TOKEN%?}$([ "$last" = A ] && echo B || echo A)"
    probe() {
        timeout 20 "$BENCH" handshake --url "$TARGET_URL" --ca "$WORK/tls/ca.pem" --sessions 1 --concurrency 1 \
            --io-timeout 5 --timeout 10 --label policy-check "$@" 2>/dev/null \
            | sed -n 's/.*"first_error":"\([^"]*\)".*/\1/p'
    }
    e1=$(probe --token "$bad_token" --origin "$ORIGIN")
    e2=$(probe --origin "$ORIGIN")
    e3=$(probe --token "$TOKEN" --origin https://evil.example)
    printf 'round %s: bad signature -> %s; no token -> %s; foreign origin -> %s\n' \
        "$1" "${e1:-ACCEPTED}" "${e2:-ACCEPTED}" "${e3:-ACCEPTED}" >>"$OUT/policy-check.txt"
    if [ -z "$e1" ] || [ -z "$e2" ] || [ -z "$e3" ]; then
        log "  warning: wsgate accepted a request its policy should refuse (see $OUT/policy-check.txt)"
    else
        log "  wsgate policy check: bad signature, missing token and foreign Origin refused"
    fi
}

stop_target() {
    if [ -n "${TARGET_MAIN_PID:-}" ]; then
        stop_pid "$TARGET_MAIN_PID"
        local keep=() p
        for p in "${STARTED[@]}"; do
            [ "$p" != "$TARGET_MAIN_PID" ] && keep+=("$p")
        done
        STARTED=("${keep[@]}")
    fi
    TARGET_MAIN_PID=""
}

# Profiling mode (PERF_TARGETS): `perf record` attached to the proxy for one
# workload. Sampling costs the proxy CPU, so runs with it are for finding where
# the time goes, not for the table.
PERF_PID=""
perf_start() { # round target workload
    case " $PERF_TARGETS " in *" $2 "*) ;; *) return 0 ;; esac
    [ -n "$TARGET_PIDS" ] && command -v perf >/dev/null || return 0
    if [ -n "$PERF_STAT" ]; then
        perf stat -e "$PERF_STAT" -p "$TARGET_PIDS" -o "$OUT/perf-stat-$2-$3-r$1.txt" >>"$OUT/perf.log" 2>&1 &
    else
        perf record -q -e "${PERF_EVENT:-cpu-clock}" ${PERF_FREQ:--F 2000} -g -p "$TARGET_PIDS" -o "$OUT/perf-$2-$3-r$1.data" \
            >>"$OUT/perf.log" 2>&1 &
    fi
    PERF_PID=$!
    sleep 0.5
}
perf_stop() {
    [ -n "$PERF_PID" ] || return 0
    kill -INT "$PERF_PID" 2>/dev/null
    wait "$PERF_PID" 2>/dev/null
    PERF_PID=""
}

record_failure() { # round target workload message
    printf '{"round":%s,"label":"%s","workload":"%s","errors":1,"first_error":"%s"}\n' \
        "$1" "$2" "$3" "$4" >>"$RESULTS"
}

run_workload() { # round target workload
    local r=$1 t=$2 w=$3
    local -a common mode
    common=(--url "$TARGET_URL" --label "$t" --workload "$w" --sources "$SOURCES"
        --token "$TOKEN" --origin "$ORIGIN" --timeout $((RUN_TIMEOUT - 20)) --backend-pid "$ECHO_PID")
    if [ "$t" = direct ]; then
        common+=(--insecure-plain)
    else
        common+=(--ca "$WORK/tls/ca.pem")
    fi
    [ -n "$TARGET_PIDS" ] && common+=(--pid "$TARGET_PIDS")
    case $w in
    tp1k) mode=(throughput --sessions "$SESSIONS" --window "$WINDOW" --size 1024 --duration "$DURATION") ;;
    tp64) mode=(throughput --sessions "$SESSIONS" --window "$WINDOW" --size 64 --duration "$DURATION") ;;
    idle) mode=(idle --sessions "$IDLE_SESSIONS" --concurrency 64 --hold "$IDLE_HOLD") ;;
    handshake) mode=(handshake --sessions "$HS_SESSIONS" --concurrency "$HS_CONCURRENCY") ;;
    *) log "unknown workload $w"; return ;;
    esac
    local line rc other attempt=0
    while :; do
        wait_quiet
        echo "# round $r $t $w attempt $attempt busy ${BUSY_BEFORE}% loadavg $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/bench.log"
        line=$(timeout -k 5 "$RUN_TIMEOUT" taskset -c "$LOAD_CPU" "$BENCH" "${mode[@]}" "${common[@]}" 2>>"$OUT/bench.log" | grep '^{' | tail -n 1)
        rc=${PIPESTATUS[0]}
        [ -n "$line" ] || break
        line="{\"round\":$r,\"attempt\":$attempt,\"busy_before_pct\":$BUSY_BEFORE,${line#\{}"
        # Other work on the machine during the run (a compiler, say)? Run it
        # again, a bounded number of times; idle has no such figure and is
        # never repeated (the proxy's allocator would make a rerun look free).
        other=$(printf '%s' "$line" | sed -n 's/.*"other_cpu_util":\([0-9.]*\).*/\1/p')
        if [ -n "$other" ] && [ "$attempt" -lt "$RETRY_DISTURBED" ] \
            && awk -v o="$other" -v m="$OTHER_MAX" 'BEGIN { exit !(o > m) }'; then
            log "  $t $w: disturbed (other work used $other cores), running it again"
            printf '%s\n' "$line" >>"$OUT/disturbed.jsonl"
            attempt=$((attempt + 1))
            continue
        fi
        break
    done
    if [ -n "$line" ]; then
        printf '%s\n' "$line" >>"$RESULTS"
        log "  $t $w: $(printf '%s' "$line" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(" ".join(f"{k}={d[k]}" for k in ("msgs_per_s","rtt_p99_us","proxy_cpu_us_per_msg","gen_cpu_util","backend_cpu_util","other_cpu_util","bytes_per_session","sessions_per_s","proxy_cpu_us_per_session","errors","first_error") if k in d))')"
    else
        record_failure "$r" "$t" "$w" "no result (exit $rc)"
        log "  $t $w: no result (exit $rc)"
    fi
}

# -------------------------------------------------------------------- main
install_proxies
build
[ -x "$BENCH" ] || die "$BENCH missing"
# Run private copies, so a rebuild during the run cannot mix versions.
mkdir -p "$WORK/bin"
cp "$BENCH" "$WORK/bin/wsgate-bench" || die "copying $BENCH failed"
BENCH=$WORK/bin/wsgate-bench
if [ -x "$WSGATE" ]; then
    cp "$WSGATE" "$WORK/bin/wsgate" && WSGATE=$WORK/bin/wsgate
fi
if [ -n "$WSGATE_B" ] && [ -x "$WSGATE_B" ]; then
    cp "$WSGATE_B" "$WORK/bin/wsgate-b" && WSGATE_B=$WORK/bin/wsgate-b
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "nproc: $(nproc)"
    echo "kernel: $(uname -r)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "nginx: $(nginx -v 2>&1)"
    echo "haproxy: $(haproxy -v 2>/dev/null | head -n 1)"
    dirty=$(git -C "$ROOT" status --porcelain -- src Cargo.toml 2>/dev/null | grep -q . && echo " + uncommitted changes in src/")
    echo "wsgate: commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$dirty, binary $([ -x "$WSGATE" ] && echo present || echo missing)"
    echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "knobs: ROUNDS=$ROUNDS TARGETS='$TARGETS' WORKLOADS='$WORKLOADS' DURATION=$DURATION SESSIONS=$SESSIONS WINDOW=$WINDOW IDLE_SESSIONS=$IDLE_SESSIONS IDLE_HOLD=$IDLE_HOLD HS_SESSIONS=$HS_SESSIONS HS_CONCURRENCY=$HS_CONCURRENCY NSOURCES=$NSOURCES PROXY_CPU=$PROXY_CPU LOAD_CPU=$LOAD_CPU QUIET_BUSY=$QUIET_BUSY QUIET_WAIT=$QUIET_WAIT QUIET_BUDGET=$QUIET_BUDGET OTHER_MAX=$OTHER_MAX RETRY_DISTURBED=$RETRY_DISTURBED"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

"$BENCH" certs --out "$WORK/tls" 2>>"$OUT/bench.log" || die "certs failed"
WSGATE_JWT_SECRET=$(head -c 48 /dev/urandom | base64 | tr -d '\n=+/')
export WSGATE_JWT_SECRET
TOKEN=$("$BENCH" token --secret-env WSGATE_JWT_SECRET) || die "token failed"
write_configs

if (exec 3<>"/dev/tcp/127.0.0.1/$ECHO_PORT") 2>/dev/null; then
    die "port $ECHO_PORT is already in use (set ECHO_PORT)"
fi
taskset -c "$LOAD_CPU" "$BENCH" echo --listen "127.0.0.1:$ECHO_PORT" --max-seconds 7200 >>"$OUT/echo.log" 2>&1 &
ECHO_PID=$!
STARTED+=("$ECHO_PID")
wait_port "$ECHO_PORT" || die "echo backend did not start (see $OUT/echo.log)"

read -r -a TARGET_LIST <<<"$TARGETS"
read -r -a WORKLOAD_LIST <<<"$WORKLOADS"
n=${#TARGET_LIST[@]}
for r in $(seq 1 "$ROUNDS"); do
    for k in $(seq 0 $((n - 1))); do
        t=${TARGET_LIST[$(((k + r - 1) % n))]}
        log "round $r/$ROUNDS: $t"
        if ! start_target "$t"; then
            log "  $t did not start: recording errors"
            for w in "${WORKLOAD_LIST[@]}"; do
                record_failure "$r" "$t" "$w" "target did not start"
            done
            stop_target
            continue
        fi
        case $t in wsgate | wsgate-b) policy_check "$r" ;; esac
        # Fresh process per target per round; idle first, so the RSS baseline
        # is not inflated by buffers kept from earlier workloads.
        for w in "${WORKLOAD_LIST[@]}"; do
            if [ "$w" = idle ] && [ "$t" = direct ] && [ "$IDLE_DIRECT" != 1 ]; then
                continue
            fi
            if [ -n "$TARGET_MAIN_PID" ] && ! kill -0 "$TARGET_MAIN_PID" 2>/dev/null; then
                record_failure "$r" "$t" "$w" "target process exited"
                continue
            fi
            perf_start "$r" "$t" "$w"
            run_workload "$r" "$t" "$w"
            perf_stop
            sleep 1
        done
        stop_target
    done
done

OTHER_MAX=$OTHER_MAX python3 "$ROOT/bench/aggregate.py" "$RESULTS" "$OUT/machine.txt" | tee "$OUT/summary.md"
log "results: $RESULTS, summary: $OUT/summary.md"
