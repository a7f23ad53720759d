#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine, for trying `ray job submit` before a real
# cluster: a head (dashboard and job API on 127.0.0.1, no CPUs for tasks, like the head on
# Kubernetes) plus worker nodes started with `ray start --address`. Token authentication is
# off (RAY_AUTH_MODE=disabled) and Ray's internal ports listen on the machine's address, so use
# it on a trusted machine only; the dashboard / job API stays on 127.0.0.1.
#
# Usage: cluster/local_cluster.sh start|stop|status
#        cluster/local_cluster.sh hosts ARGS...  (nodes as hosts in network namespaces: cluster/testbed.sh)
#
#   cluster/local_cluster.sh start
#   RAY_AUTH_MODE=disabled ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python jobs/train.py --config jobs/configs/paper-gpu.yaml
#   cluster/local_cluster.sh stop
#
# Settings (environment):
#   POSEFR_RAY_STATE          state folder: pids, logs, Ray's --temp-dir
#                             (default /tmp/posefr-ray-<uid>)
#   POSEFR_RAY_WORKERS        worker nodes besides the head (default 2)
#   POSEFR_RAY_HEAD_CPUS      CPUs the head offers to tasks (default 0)
#   POSEFR_RAY_WORKER_CPUS    CPUs per worker node (default 1)
#   POSEFR_RAY_PORT           GCS port of the head (default 6390); the next ports (client
#                             server, one dashboard agent per node) follow it. Keep all of
#                             them below 10002: Ray's worker processes use 10002-19999.
#   POSEFR_RAY_DASHBOARD_PORT dashboard / job API port (default 8265)
#   POSEFR_RAY_OBJECT_STORE   object store bytes per node (default 268435456)
#   POSEFR_RAY_TIMEOUT        seconds to wait for the cluster to come up (default 120)
#   RAY                       the `ray` command (default: .venv/bin/ray of this project, else PATH)
#
# `stop` ends only the processes this script started (each node's process group); other Ray
# instances on the machine are left alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${POSEFR_RAY_STATE:-/tmp/posefr-ray-$(id -u)}"
WORKERS="${POSEFR_RAY_WORKERS:-2}"
HEAD_CPUS="${POSEFR_RAY_HEAD_CPUS:-0}"
WORKER_CPUS="${POSEFR_RAY_WORKER_CPUS:-1}"
PORT="${POSEFR_RAY_PORT:-6390}"
DASHBOARD_PORT="${POSEFR_RAY_DASHBOARD_PORT:-8265}"
OBJECT_STORE="${POSEFR_RAY_OBJECT_STORE:-268435456}"
TIMEOUT="${POSEFR_RAY_TIMEOUT:-120}"
if [[ -z "${RAY:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/ray" ]]; then RAY="$ROOT/.venv/bin/ray"; else RAY="ray"; fi
fi

export RAY_AUTH_MODE=disabled
export RAY_USAGE_STATS_ENABLED=0
# a stopped node waits at most this long for running work to drain (Ray's default is 30 s)
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-5}"
# job entrypoints (`python ...`) run with the nodes' PATH: use the environment $RAY belongs to
RAY_BIN_DIR="$(dirname "$(command -v "$RAY" || echo /nonexistent/ray)")"
if [[ -x "$RAY_BIN_DIR/python" ]]; then export PATH="$RAY_BIN_DIR:$PATH"; fi

usage() {
  echo "usage: $0 start|stop|status" >&2
  echo "       $0 hosts up|down|kill|cut|heal|preempt|restart|exec|status|nodes|wait|env ..." >&2
  exit 2
}

log() { echo "[local_cluster] $*"; }

# the python that belongs to $RAY (same environment), for small helpers
python_for_ray() {
  if [[ -x "$RAY_BIN_DIR/python" ]]; then echo "$RAY_BIN_DIR/python"; else echo "python3"; fi
}

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

pid_of() { [[ -f "$STATE/$1.pid" ]] && cat "$STATE/$1.pid" || true; }

node_names() {
  local f
  for f in "$STATE"/worker-*.pid; do [[ -e "$f" ]] && basename "$f" .pid; done
  [[ -e "$STATE/head.pid" ]] && echo head
  return 0
}

# start one node in its own session (so `stop` can end its whole process group)
launch() {
  local name="$1"; shift
  setsid "$RAY" start --block "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/$name.pid"
}

wait_for_nodes() {
  local want="$1"
  "$(python_for_ray)" - "$DASHBOARD_PORT" "$want" "$TIMEOUT" "$(pid_of head)" <<'EOF'
import os, sys, time
port, want, timeout, head = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
from ray.util.state import list_nodes
deadline = time.monotonic() + timeout
alive = 0
while time.monotonic() < deadline:
    try:
        os.kill(head, 0)
    except ProcessLookupError:
        sys.exit("the head node exited; see its log")
    try:
        alive = len(list_nodes(address=f"http://127.0.0.1:{port}", filters=[("state", "=", "ALIVE")],
                               raise_on_missing_output=False))
    except Exception:
        alive = 0
    if alive >= want:
        sys.exit(0)
    time.sleep(1)
sys.exit(f"{alive} of {want} nodes alive after {timeout:.0f}s")
EOF
}

cmd_start() {
  if alive "$(pid_of head)"; then
    log "already running (head pid $(pid_of head)); dashboard http://127.0.0.1:$(cat "$STATE/dashboard_port")"
    return 0
  fi
  mkdir -p "$STATE"
  rm -f "$STATE"/*.pid
  echo "$PORT" >"$STATE/port"
  echo "$DASHBOARD_PORT" >"$STATE/dashboard_port"
  local common=(--num-gpus=0 --object-store-memory="$OBJECT_STORE" --temp-dir="$STATE/ray"
                --disable-usage-stats)
  log "starting the head (GCS 127.0.0.1:$PORT, dashboard 127.0.0.1:$DASHBOARD_PORT)"
  launch head --head --port="$PORT" --num-cpus="$HEAD_CPUS" \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port=$((PORT + 1)) --dashboard-agent-listen-port=$((PORT + 2)) \
    "${common[@]}"
  if ! wait_for_nodes 1; then
    log "the head did not come up; last lines of $STATE/head.log:"
    tail -n 30 "$STATE/head.log" >&2 || true
    cmd_stop >/dev/null
    return 1
  fi
  local i
  # one at a time: nodes starting together on one machine race for the same free ports
  for ((i = 1; i <= WORKERS; i++)); do
    log "starting worker $i ($WORKER_CPUS CPU)"
    launch "worker-$i" --address="127.0.0.1:$PORT" --num-cpus="$WORKER_CPUS" \
      --dashboard-agent-listen-port=$((PORT + 2 + i)) "${common[@]}"
    if ! wait_for_nodes $((i + 1)); then
      log "worker $i did not come up; last lines of $STATE/worker-$i.log:"
      tail -n 30 "$STATE/worker-$i.log" >&2 || true
      cmd_stop >/dev/null
      return 1
    fi
  done
  log "running: $((WORKERS + 1)) nodes, dashboard http://127.0.0.1:$DASHBOARD_PORT"
  log "submit with: RAY_AUTH_MODE=disabled $RAY job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- python ..."
}

# stop nodes: workers first (they drain through the head's GCS), then the head
stop_nodes() {
  local name pid i
  for name in "$@"; do
    pid="$(pid_of "$name")"
    if alive "$pid"; then
      log "stopping $name (process group $pid)"
      kill -TERM -- "-$pid" 2>/dev/null || true
    fi
  done
  for name in "$@"; do
    pid="$(pid_of "$name")"
    for ((i = 0; i < 45; i++)); do alive "$pid" || break; sleep 1; done
    if alive "$pid"; then
      log "$name did not stop in 45 s; killing process group $pid"
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/$name.pid"
  done
}

cmd_stop() {
  local workers=() name
  for name in $(node_names); do [[ "$name" == head ]] || workers+=("$name"); done
  if ((${#workers[@]})); then stop_nodes "${workers[@]}"; fi
  stop_nodes head
  log "stopped"
}

cmd_status() {
  local head_pid name pid dead=0
  head_pid="$(pid_of head)"
  if ! alive "$head_pid"; then
    log "not running (state folder $STATE)"
    return 3
  fi
  for name in $(node_names); do
    pid="$(pid_of "$name")"
    if alive "$pid"; then log "$name: running (pid $pid)"; else log "$name: exited"; dead=1; fi
  done
  log "dashboard http://127.0.0.1:$(cat "$STATE/dashboard_port")"
  "$RAY" status --address="127.0.0.1:$(cat "$STATE/port")" || dead=1
  return "$dead"
}

case "${1:-}" in
  hosts) shift; exec "$ROOT/cluster/testbed.sh" "$@" ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) usage ;;
esac
