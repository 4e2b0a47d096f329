#!/usr/bin/env bash
# The gateway beside the proxies people run today, measured the way a user would: one
# OpenAI-compatible backend that costs almost nothing (an nginx answering a fixed chat
# completion), and in front of it, one at a time: nginx proxy_pass (upstream keepalive),
# haproxy (http-reuse always), our bare hyper forwarding proxy (the floor for anything built
# on hyper and tokio: gateway/examples/bare_proxy.rs), and the release gateway with a config
# holding that one backend and nothing else (every default). wrk, one thread, keep-alive, the
# same POST each time. CPU per request is the front process's utime + stime (all threads,
# /proc/PID/stat) over the run, divided by the requests served.
#
#   benches/proxy.sh                 # c=16 and c=64, 8 s each
#   DURATION=4 CONNS="16" benches/proxy.sh
#   benches/proxy.sh instructions    # user-space instructions per request of the bare proxy and
#                                    # the gateway under valgrind (repeatable, unlike CPU time
#                                    # here): 30 s of requests at c=16 after 5 s to warm up;
#                                    # CG_KEEP=DIR keeps the callgrind profiles there
#
# nginx keeps its default access log (a line per request, as the gateway logs at `info`);
# haproxy has none by default.
#
# Installs nginx, haproxy and wrk with apt-get when missing (as root). The ratios within one
# run are the figure; absolute numbers on a shared machine are not. Not run by CI.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-8}
CONNS=${CONNS:-"16 64"}
FRONTS=${FRONTS:-"nginx haproxy bare gateway"}

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
PATH="$PATH:/usr/sbin"

cargo build --release -q -p tower-llm-lb-gateway --bin tower-llm-lb --example bare_proxy
GATEWAY=target/release/tower-llm-lb
BARE=target/release/examples/bare_proxy

T=$(mktemp -d)
PIDS=()
declare -A IR
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$T"; }
trap cleanup EXIT

BACKEND_PORT=19400; NGINX_PORT=19401; HAPROXY_PORT=19402; BARE_PORT=19403; GATEWAY_PORT=19404
ANSWER='{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}'

nginx_conf() { # $1: name, $2: the server block
  cat > "$T/$1.conf" <<CONF
worker_processes 1;
master_process off;
daemon off;
pid $T/$1.pid;
error_log $T/$1.error.log error;
events { worker_connections 4096; }
http {
  access_log off;
  $2
}
CONF
}
nginx_conf backend "server { listen 127.0.0.1:$BACKEND_PORT; keepalive_requests 100000;
    location / { default_type application/json; return 200 '$ANSWER'; } }"
nginx_conf front "access_log $T/front-access.log;
  upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 128; keepalive_requests 100000; }
  server { listen 127.0.0.1:$NGINX_PORT; keepalive_requests 100000;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
cat > "$T/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend front
  bind 127.0.0.1:$HAPROXY_PORT
  default_backend backend
backend backend
  server s1 127.0.0.1:$BACKEND_PORT
CONF
cat > "$T/gateway.json" <<CONF
{ "backends": { "local": { "provider": "openai", "url": "http://127.0.0.1:$BACKEND_PORT/v1", "api_key": "sk-bench" } } }
CONF
cat > "$T/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o","messages":[{"role":"system","content":"You are helpful."},{"role":"user","content":"Say hello."}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
LUA

nginx -c "$T/backend.conf" & PIDS+=($!)
wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
wait_port $BACKEND_PORT

start_front() { # prints the PID and the port
  case "$1" in
    nginx) nginx -c "$T/front.conf" >/dev/null 2>&1 & echo "$! $NGINX_PORT" ;;
    haproxy) haproxy -f "$T/haproxy.cfg" -db >/dev/null 2>&1 & echo "$! $HAPROXY_PORT" ;;
    bare) "$BARE" 127.0.0.1:$BARE_PORT http://127.0.0.1:$BACKEND_PORT >/dev/null 2>&1 & echo "$! $BARE_PORT" ;;
    gateway) "$GATEWAY" serve --config "$T/gateway.json" --listen 127.0.0.1:$GATEWAY_PORT >/dev/null 2>"$T/gateway.log" & echo "$! $GATEWAY_PORT" ;;
  esac
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))

if [ "${1:-}" = instructions ]; then
  command -v valgrind >/dev/null 2>&1 || { SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"; $SUDO apt-get install -y -qq valgrind >/dev/null; }
  echo "| front | user-space instructions per request | vs bare proxy |"
  echo "|---|---|---|"
  for front in bare gateway; do
    case "$front" in
      bare) port=$BARE_PORT; cmd=("$BARE" 127.0.0.1:$BARE_PORT http://127.0.0.1:$BACKEND_PORT) ;;
      gateway) port=$GATEWAY_PORT; cmd=("$GATEWAY" serve --config "$T/gateway.json" --listen 127.0.0.1:$GATEWAY_PORT) ;;
    esac
    valgrind --tool=callgrind --callgrind-out-file="$T/cg.$front" "${cmd[@]}" >/dev/null 2>&1 &
    vp=$!; PIDS+=("$vp")
    for _ in $(seq 1 300); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
    wrk -t1 -c16 -d5s -s "$T/post.lua" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
    sleep 1; callgrind_control -z "$vp" >/dev/null 2>&1
    n=$(wrk -t1 -c16 -d30s -s "$T/post.lua" "http://127.0.0.1:$port/v1/chat/completions" | awk '/requests in/ {print $1}')
    sleep 1; callgrind_control -d "$vp" >/dev/null 2>&1; sleep 1
    kill "$vp"; wait "$vp" 2>/dev/null || true
    [ -n "${CG_KEEP:-}" ] && cp "$T/cg.$front.1" "$CG_KEEP/cg.$front"
    ir=$(callgrind_annotate "$T/cg.$front.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    IR[$front]=$((ir / n))
    base=${IR[bare]}
    echo "| $front | ${IR[$front]} | $(awk -v a="${IR[$front]}" -v b="$base" 'BEGIN {printf "%.2fx", a / b}') |"
  done
  exit 0
fi

declare -A RPS CPU P99
# wrk's latency (`512.00us`, `1.81ms`, `1.02s`) in milliseconds.
ms() { echo "$1" | awk '{v = $1 + 0; if ($1 ~ /us$/) v /= 1000; else if ($1 ~ /s$/ && $1 !~ /ms$/) v *= 1000; printf "%.2f", v}'; }
# The backend on its own: what the p99 added by each front is counted from.
declare -A DIRECT
for c in $CONNS; do
  out=$(wrk -t1 -c"$c" -d"${DURATION}s" --latency -s "$T/post.lua" "http://127.0.0.1:$BACKEND_PORT/v1/chat/completions")
  DIRECT[$c]=$(ms "$(echo "$out" | awk '$1 == "99%" {print $2}')")
done
for front in $FRONTS; do
  read -r pid port < <(start_front "$front")
  PIDS+=("$pid")
  wait_port "$port"
  # Warm up: connections, pools, caches.
  wrk -t1 -c16 -d1s -s "$T/post.lua" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
  for c in $CONNS; do
    before=$(cpu_ticks "$pid")
    out=$(wrk -t1 -c"$c" -d"${DURATION}s" --latency -s "$T/post.lua" "http://127.0.0.1:$port/v1/chat/completions")
    after=$(cpu_ticks "$pid")
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $5}')
    if [ -n "$non2xx" ]; then echo "$front c=$c: $non2xx answers were not 2xx" >&2; fi
    RPS[$front,$c]=$(echo "$out" | awk '/Requests\/sec/ {printf "%.0f", $2}')
    CPU[$front,$c]=$(awk -v t=$((after - before)) -v us=$TICK_US -v n="$requests" 'BEGIN {printf "%.1f", t * us / n}')
    P99[$front,$c]=$(echo "$out" | awk '$1 == "99%" {print $2}')
  done
  kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
done

echo "| front | c | req/s | CPU per request (us) | vs nginx | vs bare proxy | p99 | p99 added to the backend's own |"
echo "|---|---|---|---|---|---|---|---|"
for c in $CONNS; do
  for front in $FRONTS; do
    cpu=${CPU[$front,$c]}
    vs() { [ -n "${CPU[$1,$c]:-}" ] && awk -v a="$cpu" -v b="${CPU[$1,$c]}" 'BEGIN {printf "%.2fx", a / b}' || echo "-"; }
    added=$(awk -v a="$(ms "${P99[$front,$c]}")" -v b="${DIRECT[$c]}" 'BEGIN {printf "%.2f ms", a - b}')
    echo "| $front | $c | ${RPS[$front,$c]} | $cpu | $(vs nginx) | $(vs bare) | ${P99[$front,$c]} | $added |"
  done
done
for c in $CONNS; do echo "(the backend alone at c=$c: p99 ${DIRECT[$c]} ms)"; done
