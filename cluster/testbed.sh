#!/usr/bin/env bash
# A multi-host Ray testbed on one Linux machine, for failure tests: every "host" is its own
# network namespace with its own address on a private bridge, so hosts can be lost (SIGKILL),
# partitioned (link down), preempted (SIGTERM with a drain deadline, then SIGKILL) and brought
# back, while the test itself (pytest in the root namespace) reaches every host over the bridge.
#
#   head   Ray head (GCS, dashboard / job API unless POSEFR_TESTBED_DASHBOARD=0, no CPUs for
#          tasks by default) and moto's S3 server on <head>:9000 with one bucket
#   w1..wN Ray worker nodes; worker wK offers the custom resource host_wK (1 unit), so a task
#          pinned with resources={"host_wK": 0.01} runs there
#
# Needs root and iproute2's `ip`. Token authentication is off (RAY_AUTH_MODE=disabled; Ray
# 2.60 enables it by default) and S3 takes the fixed credentials testing/testing: test use only.
# Nothing global changes besides the bridge and its veths (no ip_forward, no firewall rules).
#
# Usage:
#   cluster/testbed.sh up [N]            head + N worker hosts (default 2); waits until S3
#                                        answers and the head sees N+1 alive nodes. Cleans up a
#                                        stale (crashed) testbed of the same name first; refuses
#                                        a running one and a subnet some interface already uses
#   cluster/testbed.sh down              stop everything the testbed started, delete its
#                                        namespaces, veths, bridge and state folder; idempotent,
#                                        also cleans up after a crashed run of the same name;
#                                        exits 1 if anything remains
#   cluster/testbed.sh kill HOST         SIGKILL every process in HOST's namespace (host lost)
#   cluster/testbed.sh cut HOST          take HOST's link down (partition); processes keep running
#   cluster/testbed.sh heal HOST         bring HOST's link back up
#   cluster/testbed.sh preempt HOST [GRACE] [--wait]
#                                        spot-style notice: SIGTERM to HOST's `ray start --block`
#                                        (Ray drains the node, reason PREEMPTION, deadline
#                                        POSEFR_TESTBED_GRACE s); GRACE s later (default
#                                        POSEFR_TESTBED_GRACE + 5) SIGKILL whatever is left in
#                                        the namespace. Returns at once (a background reaper,
#                                        which `down` and `restart` stop) unless --wait.
#   cluster/testbed.sh restart HOST [--force]
#                                        start HOST again (after kill / preempt / cut + heal): ends
#                                        whatever still runs there first (a cut raylet may still
#                                        be running, or may have exited once it learnt the GCS
#                                        had marked it dead), then waits until its node is alive.
#                                        A host that runs with its node alive is left alone
#                                        unless --force. Restarting the head starts a new, empty
#                                        GCS and S3: the workers have to be restarted too.
#   cluster/testbed.sh exec HOST CMD...  run CMD in HOST's namespace with the testbed environment
#   cluster/testbed.sh status            hosts, addresses, link state, processes, Ray's nodes
#   cluster/testbed.sh nodes             Ray's nodes as JSON lines (node_id, ip, state ALIVE /
#                                        DEAD, activity IDLE / ACTIVE / DRAINING, resources, and
#                                        death_reason / death_message of a dead one), asked from
#                                        the head's namespace
#   cluster/testbed.sh wait HOST alive|dead [TIMEOUT]
#                                        wait (default 60 s) until Ray sees HOST's node alive /
#                                        dead; prints the seconds it took
#   cluster/testbed.sh env               `export` lines of the testbed environment, for the root
#                                        namespace: eval "$(cluster/testbed.sh env)"
#
#   cluster/testbed.sh up 2
#   cluster/testbed.sh exec head python my_driver.py       # a driver on the head host
#   RAY_AUTH_MODE=disabled ray job submit --address http://10.213.0.2:8265 -- python ...
#   cluster/testbed.sh cut w2; sleep 15; cluster/testbed.sh heal w2; cluster/testbed.sh restart w2
#   cluster/testbed.sh down
#
# The testbed environment (`exec`, `env`; the hosts' processes get the same, minus RAY_ADDRESS):
# RAY_ADDRESS=<head>:6379, AWS_ENDPOINT_URL=http://<head>:9000, AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY=testing, AWS_DEFAULT_REGION=us-east-1, RAY_AUTH_MODE=disabled,
# RAY_USAGE_STATS_ENABLED=0, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, and DS_ACCELERATOR /
# TORCH_EXTENSIONS_DIR / PYTHONPATH plus the variables named in POSEFR_TESTBED_PASS_ENV with the
# values they had at `up`; PATH starts with the bin folder of $RAY. `exec` keeps the caller's
# other variables; the hosts' Ray processes start from a clean environment (env -i) plus these,
# plus GLOO_SOCKET_IFNAME=eth0 (every host's interface; the shared hostname resolves to
# 127.0.0.1, which gloo would otherwise advertise to the other ranks).
#
# Settings (environment; `up` records them in the state folder and the other commands use the
# recorded ones, so only POSEFR_TESTBED_NAME / POSEFR_TESTBED_STATE pick the testbed later):
#   POSEFR_TESTBED_NAME          prefix of the namespaces, veths and bridge: <name>-head,
#                                <name>-wK, <name>-br (default pfr; a letter, then up to 9
#                                letters / digits, so interface names stay within 15 characters)
#   POSEFR_TESTBED_SUBNET        first three octets of the /24 (default 10.213.0): the bridge
#                                (root namespace) .1, head .2, worker wK .(10+K)
#   POSEFR_TESTBED_STATE         state folder: pids, logs, each host's Ray --temp-dir (default
#                                /tmp/posefr-testbed-<name>; keep it short, Ray's unix socket
#                                paths under it must stay below 108 characters)
#   POSEFR_TESTBED_HEAD_CPUS     CPUs the head offers to tasks (default 0)
#   POSEFR_TESTBED_WORKER_CPUS   CPUs per worker host (default 1)
#   POSEFR_TESTBED_OBJECT_STORE  object store bytes per host (default 200000000)
#   POSEFR_TESTBED_GRACE         RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S of the hosts: how long a
#                                SIGTERMed node drains (default 10)
#   POSEFR_TESTBED_DASHBOARD     1 (default): dashboard and job API on <head>:8265; 0: none
#   POSEFR_TESTBED_BUCKET        the S3 bucket created on the head's S3 server (default posefr)
#   POSEFR_TESTBED_TIMEOUT       seconds `up` / `restart` wait for S3 and the nodes (default 90)
#   POSEFR_TESTBED_HEALTH_PERIOD_MS    the GCS (head) health-checks every raylet this often
#                                      (RAY_health_check_period_ms; default 1000, Ray's 3000)
#   POSEFR_TESTBED_HEALTH_TIMEOUT_MS   one health check's timeout (RAY_health_check_timeout_ms;
#                                      default 1000, Ray's 10000)
#   POSEFR_TESTBED_HEALTH_FAILURES     failed checks in a row before the GCS marks the node dead
#                                      (RAY_health_check_failure_threshold; default 5, Ray's 5).
#                                      So a cut host is marked dead after at most about
#                                      FAILURES x (PERIOD + TIMEOUT) = 10 s (its checks time out;
#                                      measured ~5-6 s with FAILURES=3), a killed one sooner (its
#                                      address refuses connections at once; ~3 s), instead of
#                                      Ray's default of up to a minute.
#   POSEFR_TESTBED_PASS_ENV      more variable names (space-separated) whose values at `up` the
#                                hosts' processes (and `exec`) get, e.g. RAY_TRAIN_* settings
#   POSEFR_TESTBED_WORKER_RESOURCES  more custom resources of every worker host, a JSON object
#                                (e.g. '{"train_slot": 1}'), besides its own host_wK
#   POSEFR_TESTBED_STOP_WAIT     seconds `down` waits after SIGTERM before SIGKILL (default 3)
#   POSEFR_TESTBED_KEEP_STATE    1: `down` keeps the state folder (logs) for a look afterwards
#   RAY                          the `ray` command (default: .venv/bin/ray of this project, else PATH)
#   MOTO_SERVER                  moto's server command (default: moto_server next to $RAY)
#
# Each namespace has its own network stack, so every host uses Ray's default ports (GCS 6379,
# dashboard 8265, client 10001, ...) without clashes, also with other Ray instances on the
# machine. The hosts still share the filesystem and /dev/shm: that is why each host has its own
# Ray temp dir. They also share the CPUs and memory: every node reports the whole machine's
# memory, and the CPUs are only what --num-cpus says.
#
# Good to know about Ray here:
# - A Ray driver must run on a host (`exec head python ...`, or `ray job submit` to the job API):
#   the root namespace has no Ray node of its own.
# - A cut host's raylet keeps running; once healed it learns that the GCS marked it dead and
#   exits by itself (within seconds), or, cut for longer, it exits after Ray's
#   RAY_gcs_rpc_server_reconnect_timeout_s (60 s). Either way it needs `restart`: a dead node
#   never comes back alive in Ray, the restarted host is a new node (new node id, same address).
# - Ray gives a starting node 30 s to register with the GCS, and its raylet registers only
#   once the node's Python agents are up: on a loaded machine `ray start` can give up, so `up`
#   and `restart` start such a host again until POSEFR_TESTBED_TIMEOUT. The hosts also get
#   RAY_gcs_server_port_wait_time_s=POSEFR_TESTBED_TIMEOUT: a worker waits that long for the GCS.
# - SIGTERM to `ray start --block` drains the node (GCS: activity DRAINING, then DEAD with
#   death_reason AUTOSCALER_DRAIN_PREEMPTED); an idle node finishes draining at once.
# - Traffic between hosts crosses the bridge. Where br_netfilter is loaded and the firewall's
#   FORWARD policy drops (a Docker host), bridged packets may be dropped: allow the bridge there;
#   this script changes no firewall rules.
# Every process is started with setsid, its pid in <state>/<host>/*.pid and its output in
# <state>/<host>/*.log; `down` finds whatever runs in the namespaces with `ip netns pids`
# (Ray's worker processes are children of the raylet, in the same namespace), sends SIGTERM,
# then SIGKILL, and checks that nothing is left.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/cluster/$(basename "${BASH_SOURCE[0]}")"

NAME="${POSEFR_TESTBED_NAME:-pfr}"
STATE="${POSEFR_TESTBED_STATE:-/tmp/posefr-testbed-$NAME}"
CONF="$STATE/testbed.conf"

log() { echo "[testbed $NAME] $*" >&2; }
die() { log "$*"; exit 1; }

usage() {
  cat >&2 <<'EOF'
usage: cluster/testbed.sh up [N] | down | kill HOST | cut HOST | heal HOST |
                          preempt HOST [GRACE] [--wait] | restart HOST [--force] | exec HOST CMD... |
                          status | nodes | wait HOST alive|dead [TIMEOUT] | env
EOF
  exit 2
}

if [[ ! "$NAME" =~ ^[a-z][a-z0-9]{0,9}$ ]]; then
  echo "POSEFR_TESTBED_NAME=$NAME: use a letter and up to 9 more letters or digits" >&2
  exit 2
fi

# --- settings: the environment's, or the ones `up` recorded ------------------------------------
SUBNET="${POSEFR_TESTBED_SUBNET:-10.213.0}"
WORKERS=2
HEAD_CPUS="${POSEFR_TESTBED_HEAD_CPUS:-0}"
WORKER_CPUS="${POSEFR_TESTBED_WORKER_CPUS:-1}"
OBJECT_STORE="${POSEFR_TESTBED_OBJECT_STORE:-200000000}"
GRACE="${POSEFR_TESTBED_GRACE:-10}"
DASHBOARD="${POSEFR_TESTBED_DASHBOARD:-1}"
BUCKET="${POSEFR_TESTBED_BUCKET:-posefr}"
TIMEOUT="${POSEFR_TESTBED_TIMEOUT:-90}"
HEALTH_PERIOD_MS="${POSEFR_TESTBED_HEALTH_PERIOD_MS:-1000}"
HEALTH_TIMEOUT_MS="${POSEFR_TESTBED_HEALTH_TIMEOUT_MS:-1000}"
HEALTH_FAILURES="${POSEFR_TESTBED_HEALTH_FAILURES:-5}"
PASS_ENV="${POSEFR_TESTBED_PASS_ENV:-}"
WORKER_RESOURCES="${POSEFR_TESTBED_WORKER_RESOURCES:-}"
if [[ -z "${RAY:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/ray" ]]; then RAY="$ROOT/.venv/bin/ray"; else RAY="ray"; fi
fi
RAY="$(command -v "$RAY" || echo "$RAY")"
RAY_BIN_DIR="$(dirname "$RAY")"
MOTO_SERVER="${MOTO_SERVER:-$RAY_BIN_DIR/moto_server}"
if [[ -x "$RAY_BIN_DIR/python" ]]; then PYTHON="$RAY_BIN_DIR/python"; else PYTHON=python3; fi
S3_PORT=9000
GCS_PORT=6379
DASHBOARD_PORT=8265

# names recorded by `up` (printf %q, so sourcing them back is safe)
CONF_VARS=(SUBNET WORKERS HEAD_CPUS WORKER_CPUS OBJECT_STORE GRACE DASHBOARD BUCKET TIMEOUT
           HEALTH_PERIOD_MS HEALTH_TIMEOUT_MS HEALTH_FAILURES PASS_ENV WORKER_RESOURCES RAY MOTO_SERVER PYTHON
           RAY_BIN_DIR)

load_conf() {
  # shellcheck disable=SC1090
  [[ -f "$CONF" ]] && source "$CONF"
  return 0
}

save_conf() {
  local v
  for v in "${CONF_VARS[@]}"; do printf '%s=%q\n' "$v" "${!v}"; done >"$CONF"
}

check_number() { [[ "$2" =~ ^[0-9]+$ ]] || { echo "$1=$2: not a whole number" >&2; exit 2; }; }

# --- requirements --------------------------------------------------------------------------------
require_root_ip() {
  local missing=()
  [[ "$(id -u)" == 0 ]] || missing+=("root (network namespaces, veths and the bridge need it; run as root or with sudo)")
  command -v ip >/dev/null || missing+=("iproute2's \`ip\` (apt-get install iproute2)")
  if ((${#missing[@]})); then
    local m
    echo "cluster/testbed.sh needs:" >&2
    for m in "${missing[@]}"; do echo "  - $m" >&2; done
    exit 2
  fi
}

# --- names and addresses -------------------------------------------------------------------------
BRIDGE="$NAME-br"
ns_of() { echo "$NAME-$1"; }     # the namespace of a host
link_of() { echo "$NAME-$1"; }   # the root-namespace end of its veth (the "cable" on the bridge)
hosts() {
  local k
  echo head
  for ((k = 1; k <= WORKERS; k++)); do echo "w$k"; done
}
ip_of() {
  case "$1" in
    head) echo "$SUBNET.2" ;;
    w*) echo "$SUBNET.$((10 + ${1#w}))" ;;
  esac
}
check_host() {
  [[ -f "$CONF" ]] || die "no testbed $NAME (no $CONF): run \`up\` first"
  if [[ "$1" == head ]]; then return 0; fi
  if [[ "$1" =~ ^w([1-9][0-9]*)$ ]] && ((BASH_REMATCH[1] <= WORKERS)); then return 0; fi
  die "unknown host $1 (hosts: $(hosts | tr '\n' ' '))"
}

# pids of the processes in a host's namespace (none when it does not exist)
ns_pids() { ip netns pids "$1" 2>/dev/null || true; }

# a process that exists and is not a zombie
running() {
  local state
  [[ -n "${1:-}" && -r "/proc/$1/stat" ]] || return 1
  state="$(sed -E 's/^.*\) (.).*$/\1/' "/proc/$1/stat" 2>/dev/null)" || return 1
  [[ -n "$state" && "$state" != Z ]]
}

pid_file() { echo "$STATE/$1/$2.pid"; }
pid_of() { local f; f="$(pid_file "$1" "$2")"; if [[ -f "$f" ]]; then cat "$f"; fi; }

# --- environments --------------------------------------------------------------------------------
# the variables every host's processes and `exec` get
testbed_env() {
  local head_ip v
  head_ip="$(ip_of head)"
  echo "PATH=$RAY_BIN_DIR:${PATH:-/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin}"
  echo "AWS_ENDPOINT_URL=http://$head_ip:$S3_PORT"
  echo "AWS_ACCESS_KEY_ID=testing"
  echo "AWS_SECRET_ACCESS_KEY=testing"
  echo "AWS_DEFAULT_REGION=us-east-1"
  echo "RAY_AUTH_MODE=disabled"
  echo "RAY_USAGE_STATS_ENABLED=0"
  echo "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=$GRACE"
  echo "POSEFR_TESTBED_NAME=$NAME"
  echo "POSEFR_TESTBED_STATE=$STATE"
  echo "POSEFR_TESTBED_BUCKET=$BUCKET"
  if [[ -f "$STATE/pass.env" ]]; then cat "$STATE/pass.env"; fi
}

# the passed-through variables as they are now, one NAME=value a line (recorded by `up`)
save_pass_env() {
  local v
  for v in DS_ACCELERATOR TORCH_EXTENSIONS_DIR PYTHONPATH $PASS_ENV; do
    [[ "$v" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "POSEFR_TESTBED_PASS_ENV: $v is no variable name"
    if [[ -n "${!v+x}" ]]; then
      [[ "${!v}" != *$'\n'* ]] || die "$v: values with newlines cannot be passed"
      echo "$v=${!v}"
    fi
  done >"$STATE/pass.env"
}

# the environment of a host's own processes: clean, plus the testbed's; the head's GCS also gets
# the short health checks
host_env() {
  local v
  for v in HOME USER LANG LC_ALL TERM; do
    if [[ -n "${!v+x}" ]]; then echo "$v=${!v}"; fi
  done
  testbed_env
  # a worker keeps trying to reach the GCS for this long (Ray's default: 20 tries, ~20 s)
  echo "RAY_gcs_server_port_wait_time_s=$TIMEOUT"
  # torch.distributed's gloo takes its address from the hostname, which every host shares and
  # which resolves to 127.0.0.1 here: have it use the host's own interface (eth0 in every host)
  echo "GLOO_SOCKET_IFNAME=eth0"
  if [[ "$1" == head ]]; then
    echo "RAY_health_check_initial_delay_ms=1000"
    echo "RAY_health_check_period_ms=$HEALTH_PERIOD_MS"
    echo "RAY_health_check_timeout_ms=$HEALTH_TIMEOUT_MS"
    echo "RAY_health_check_failure_threshold=$HEALTH_FAILURES"
  fi
}

# --- network -------------------------------------------------------------------------------------
net_up() {
  local host ns link
  ip link add "$BRIDGE" type bridge
  ip addr add "$SUBNET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for host in $(hosts); do
    ns="$(ns_of "$host")"
    link="$(link_of "$host")"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # the namespace's end is created in the namespace, named eth0 there
    ip link add "$link" type veth peer name eth0 netns "$ns"
    ip link set "$link" master "$BRIDGE"
    ip link set "$link" up
    ip -n "$ns" addr add "$(ip_of "$host")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$SUBNET.1"
  done
}

# everything of this testbed's name in the kernel: namespaces, then links (root namespace)
our_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$NAME-" || true; }
our_links() { ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^$NAME-" || true; }

# --- processes -----------------------------------------------------------------------------------
# run "$@" in a host's namespace as its own session (setsid does not fork here: a background job
# of a script is no process group leader, so $! is the pid of the command itself)
launch() {
  local host="$1" what="$2" env_lines=()
  shift 2
  mapfile -t env_lines < <(host_env "$host")
  mkdir -p "$STATE/$host"
  echo "=== $(date '+%F %T') $what: $*" >>"$STATE/$host/$what.log"
  setsid ip netns exec "$(ns_of "$host")" env -i "${env_lines[@]}" "$@" \
    >>"$STATE/$host/$what.log" 2>&1 </dev/null &
  echo $! >"$(pid_file "$host" "$what")"
}

# signal every process in a namespace and wait (bounded) until none is left; 0 when empty
signal_ns() {
  local ns="$1" sig="$2" wait_s="$3" pids i
  pids="$(ns_pids "$ns")"
  [[ -z "$pids" ]] && return 0
  # shellcheck disable=SC2086
  kill "-$sig" $pids 2>/dev/null || true
  for ((i = 0; i < wait_s * 5; i++)); do
    [[ -z "$(ns_pids "$ns")" ]] && return 0
    sleep 0.2
  done
  [[ -z "$(ns_pids "$ns")" ]]
}

# SIGKILL a namespace's processes until none is left
kill_ns() {
  local ns="$1" i
  for ((i = 0; i < 5; i++)); do signal_ns "$ns" KILL 4 && return 0; done
  log "processes left in $ns after SIGKILL: $(ns_pids "$ns" | tr '\n' ' ')"
  return 1
}

# stop a host's background reaper (from `preempt`) if one is pending
stop_reaper() {
  local pid
  pid="$(pid_of "$1" reaper)"
  if running "$pid" && grep -qa -- "_reap" "/proc/$pid/cmdline" 2>/dev/null; then
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$(pid_file "$1" reaper)"
}

# the last lines of a host's logs, for errors
log_tail() {
  local f
  for f in "$STATE/$1"/*.log; do
    [[ -e "$f" ]] || continue
    echo "--- last lines of $f:" >&2
    tail -n "${2:-25}" "$f" >&2 || true
  done
}

# --- Ray's view, asked from the head's namespace -------------------------------------------------
# python in the head's namespace: nodes (JSON lines) | wait TIMEOUT IP... (until every IP has an
# alive node; exits 3 and prints the pid when a watched `ray start`, WATCH_PIDS, exits first) |
# gone TIMEOUT IP... (until no IP has an alive node); wait and gone print the seconds it took
NODES_PY='
import json, os, sys, time
from ray._raylet import GcsClient
from ray.core.generated import gcs_pb2
address, mode = sys.argv[1], sys.argv[2]
def enum(msg, field, enum_name):
    return msg.DESCRIPTOR.enum_types_by_name[enum_name].values_by_number[getattr(msg, field)].name
def nodes():
    infos = GcsClient(address=address).get_all_node_info(timeout=5)
    out = []
    for nid, n in infos.items():
        d = dict(node_id=nid.hex(), ip=n.node_manager_address,
                 state=gcs_pb2.GcsNodeInfo.GcsNodeState.Name(n.state),
                 activity=enum(n.state_snapshot, "state", "State"), resources=dict(n.resources_total))
        if d["state"] == "DEAD":
            d.update(death_reason=enum(n.death_info, "reason", "Reason"),
                     death_message=n.death_info.reason_message)
        out.append(d)
    return out
if mode == "nodes":
    for n in sorted(nodes(), key=lambda n: (n["ip"], n["state"])):
        print(json.dumps(n))
    sys.exit(0)
timeout, ips = float(sys.argv[3]), sys.argv[4:]
watch = [int(p) for p in os.environ.get("WATCH_PIDS", "").split()]
start = time.monotonic()
deadline, missing, err = start + timeout, ips, ""
while time.monotonic() < deadline:
    for pid in watch:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    raise ProcessLookupError
        except (OSError, ProcessLookupError):
            print(pid)
            sys.exit(3)
    try:
        alive = {n["ip"] for n in nodes() if n["state"] == "ALIVE"}
        missing, err = [ip for ip in ips if (ip in alive) != (mode == "wait")], ""
    except Exception as e:
        err = f" ({type(e).__name__}: {e})"
    if not missing and not err:
        print(f"{time.monotonic() - start:.1f}")
        sys.exit(0)
    time.sleep(0.25)
what = "no alive Ray node" if mode == "wait" else "still an alive Ray node"
sys.exit(f"{what} at {missing} after {timeout:.0f}s{err}")
'

head_python() {
  local env_lines=()
  mapfile -t env_lines < <(testbed_env)
  ip netns exec "$(ns_of head)" env "${env_lines[@]}" "$PYTHON" "$@"
}

# wait until every HOST given has an alive Ray node, at most TIMEOUT s in all. Ray gives a new
# node 30 s to register with the GCS (its raylet registers only once the node's Python agents
# are up), then its `ray start` gives up; on a loaded machine that happens: such a host is
# started again, until the deadline.
wait_hosts() {  # TIMEOUT HOST...
  local deadline=$((SECONDS + $1)) host ips=() pids=() out rc left
  shift
  while true; do
    ips=() pids=()
    for host in "$@"; do ips+=("$(ip_of "$host")"); pids+=("$(pid_of "$host" ray)"); done
    left=$((deadline - SECONDS))
    ((left > 0)) || left=1
    rc=0
    out="$(WATCH_PIDS="${pids[*]}" head_python -c "$NODES_PY" "$(ip_of head):$GCS_PORT" wait \
      "$left" "${ips[@]}")" || rc=$?
    ((rc == 0)) && return 0
    ((rc == 3)) || return 1
    for host in "$@"; do [[ "$(pid_of "$host" ray)" == "$out" ]] && break; done
    if [[ "$(pid_of "$host" ray)" != "$out" ]] || ((SECONDS + 10 >= deadline)); then
      log "\`ray start\` on $host exited"
      return 1
    fi
    log "\`ray start\` on $host exited; starting it again. Last lines of its log:"
    tail -n 3 "$STATE/$host/ray.log" >&2 || true
    kill_ns "$(ns_of "$host")" 2>/dev/null || true
    [[ "$host" == head ]] && start_s3
    start_ray "$host"
  done
}

# wait until HOST's process WHAT (its pid file) listens on PORT, until DEADLINE ($SECONDS)
wait_port() {
  local host="$1" what="$2" port="$3" deadline="$4" ip
  ip="$(ip_of "$host")"
  until timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$ip" "$port" 2>/dev/null; do
    running "$(pid_of "$host" "$what")" || { log "$what on $host exited"; return 1; }
    ((SECONDS < deadline)) || { log "nothing listens on $ip:$port ($what on $host) in time"; return 1; }
    sleep 0.3
  done
}

wait_s3() {
  wait_port head s3 "$S3_PORT" $((SECONDS + TIMEOUT)) || return 1
  head_python -c '
import sys, boto3
s3 = boto3.client("s3")
s3.create_bucket(Bucket=sys.argv[1])
s3.head_bucket(Bucket=sys.argv[1])
' "$BUCKET"
}

# --- starting hosts ------------------------------------------------------------------------------
start_s3() {
  launch head s3 "$MOTO_SERVER" -H "$(ip_of head)" -p "$S3_PORT"
}

start_ray() {
  local host="$1" ip
  ip="$(ip_of "$host")"
  local common=(--block --node-ip-address "$ip" --temp-dir "$STATE/$host/ray"
                --object-store-memory "$OBJECT_STORE" --num-gpus 0 --disable-usage-stats)
  if [[ "$host" == head ]]; then
    local dash=(--include-dashboard=false)
    if [[ "$DASHBOARD" == 1 ]]; then
      dash=(--include-dashboard=true --dashboard-host "$ip" --dashboard-port "$DASHBOARD_PORT")
    fi
    launch head ray "$RAY" start --head --port "$GCS_PORT" --num-cpus "$HEAD_CPUS" "${dash[@]}" \
      "${common[@]}"
  else
    local res="${WORKER_RESOURCES#"${WORKER_RESOURCES%%[![:space:]]*}"}"
    res="${res#\{}"
    res="${res%\}*}"
    [[ "$res" =~ [^[:space:]] ]] && res=", $res" || res=""
    launch "$host" ray "$RAY" start --address "$(ip_of head):$GCS_PORT" --num-cpus "$WORKER_CPUS" \
      --resources "{\"host_$host\": 1$res}" "${common[@]}"
  fi
}

# --- commands ------------------------------------------------------------------------------------
cmd_up() {
  require_root_ip
  local n="${1:-2}" host v
  check_number workers "$n"
  for v in HEAD_CPUS WORKER_CPUS OBJECT_STORE GRACE TIMEOUT HEALTH_PERIOD_MS HEALTH_TIMEOUT_MS \
           HEALTH_FAILURES; do
    check_number "$v" "${!v}"
  done
  ((n <= 200)) || die "at most 200 workers"
  [[ "$SUBNET" =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "POSEFR_TESTBED_SUBNET=$SUBNET: give three octets, e.g. 10.213.0"
  [[ "$DASHBOARD" == 0 || "$DASHBOARD" == 1 ]] || die "POSEFR_TESTBED_DASHBOARD is 0 or 1"
  [[ -x "$(command -v "$RAY" || true)" ]] || die "no ray command ($RAY); set RAY"
  [[ -x "$(command -v "$MOTO_SERVER" || true)" ]] || die "no moto_server ($MOTO_SERVER); set MOTO_SERVER"
  # Ray's unix sockets live in <state>/<host>/ray/session_<date>_<pid>/sockets/plasma_store
  ((${#STATE} <= 50)) || die "POSEFR_TESTBED_STATE=$STATE is too long for Ray's socket paths (50 characters at most)"

  if [[ -f "$CONF" ]] && (load_conf; running "$(pid_of head ray)"); then
    die "already up (head pid $(pid_of head ray)); run \`down\` first"
  fi
  if [[ -e "$STATE" || -n "$(our_namespaces)" || -n "$(our_links)" ]]; then
    log "cleaning up a stale testbed of the same name"
    cmd_down >&2 || die "could not clean up the stale testbed"
  fi
  if ip -4 -o addr show | awk '{print $4}' | grep -q "^${SUBNET//./\\.}\."; then
    die "the subnet $SUBNET.0/24 is in use already ($(ip -4 -o addr show | awk -v s="$SUBNET." 'index($4, s) == 1 {print $2}' | head -1)): another testbed? Set POSEFR_TESTBED_SUBNET"
  fi
  if [[ -n "$WORKER_RESOURCES" ]]; then
    [[ "$WORKER_RESOURCES" =~ ^[[:space:]]*\{.*\}[[:space:]]*$ ]] ||
      die "POSEFR_TESTBED_WORKER_RESOURCES: give a JSON object, e.g. '{\"train_slot\": 1}'"
  fi
  WORKERS="$n"
  mkdir -p "$STATE"
  save_conf
  save_pass_env
  log "network: bridge $BRIDGE $SUBNET.1, head $(ip_of head), workers $SUBNET.11..$SUBNET.$((10 + n))"
  if ! net_up; then
    log "could not set up the network"
    cmd_down >&2 || true
    return 1
  fi

  # the head first; every worker at once as soon as the head's GCS listens (each host has its
  # own ports). Not all together: on a small machine that slows the head's own start, and a node
  # that does not register within 30 s gives up (wait_hosts gives it one more try).
  local deadline=$((SECONDS + TIMEOUT)) workers=() ok=1
  log "starting S3 on $(ip_of head):$S3_PORT, the Ray head, then $n worker(s)"
  start_s3
  start_ray head
  wait_port head ray "$GCS_PORT" "$deadline" || ok=0
  for host in $(hosts); do [[ "$host" == head ]] || workers+=("$host"); done
  if ((ok)); then
    for host in "${workers[@]}"; do start_ray "$host"; done
    wait_s3 || ok=0
  fi
  if ((ok)); then
    log "waiting for $((n + 1)) Ray nodes (at most $((deadline - SECONDS))s)"
    wait_hosts "$((deadline - SECONDS))" head "${workers[@]}" || ok=0
  fi
  if ((!ok)); then
    for host in $(hosts); do log_tail "$host" 15; done
    cmd_down >/dev/null 2>&1 || true
    return 1
  fi
  log "up: $((n + 1)) Ray nodes; RAY_ADDRESS=$(ip_of head):$GCS_PORT, S3 http://$(ip_of head):$S3_PORT (bucket $BUCKET)$(
    [[ "$DASHBOARD" == 1 ]] && echo ", job API http://$(ip_of head):$DASHBOARD_PORT")"
}

cmd_down() {
  require_root_ip
  local ns f pid left=0 nss
  # pending reapers first (they would otherwise kill whatever runs later)
  for f in "$STATE"/*/reaper.pid; do
    [[ -e "$f" ]] && stop_reaper "$(basename "$(dirname "$f")")"
  done
  nss="$(our_namespaces)"
  # SIGTERM to every process of every namespace at once (no drain: the raylets get it directly
  # too), up to POSEFR_TESTBED_STOP_WAIT seconds (default 3) for them to exit, then SIGKILL
  for ns in $nss; do
    pid="$(ns_pids "$ns")"
    # shellcheck disable=SC2086
    if [[ -n "$pid" ]]; then kill -TERM $pid 2>/dev/null || true; fi
  done
  local i wait_s="${POSEFR_TESTBED_STOP_WAIT:-3}"
  for ((i = 0; i < wait_s * 5; i++)); do
    pid=""
    for ns in $nss; do pid+="$(ns_pids "$ns")"; done
    [[ -z "$pid" ]] && break
    sleep 0.2
  done
  for ns in $nss; do kill_ns "$ns" || left=1; done
  # processes whose namespace is already gone (a run that crashed half-way): by their pid files
  for f in "$STATE"/*/*.pid; do
    [[ -e "$f" ]] || continue
    pid="$(cat "$f")"
    if running "$pid" && grep -qa -- "$STATE" "/proc/$pid/cmdline" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for ns in $nss; do
    if [[ -n "$(ns_pids "$ns")" ]]; then
      log "not deleting namespace $ns: processes $(ns_pids "$ns" | tr '\n' ' ') are still in it"
      left=1
    else
      ip netns delete "$ns" 2>/dev/null || true
    fi
  done
  # deleting a namespace deletes its veth pairs; links left over (a half-made pair) and the bridge
  for f in $(our_links); do [[ "$f" == "$BRIDGE" ]] || ip link delete "$f" 2>/dev/null || true; done
  ip link delete "$BRIDGE" 2>/dev/null || true
  if [[ -d "$STATE" && "${POSEFR_TESTBED_KEEP_STATE:-0}" != 1 ]]; then rm -rf "$STATE"; fi
  # check
  if [[ -n "$(our_namespaces)" ]]; then log "namespaces left: $(our_namespaces | tr '\n' ' ')"; left=1; fi
  if [[ -n "$(our_links)" ]]; then log "links left: $(our_links | tr '\n' ' ')"; left=1; fi
  if ((left)); then return 1; fi
  log "down"
}

cmd_kill() {
  require_root_ip
  check_host "$1"
  stop_reaper "$1"
  log "SIGKILL to every process of $1"
  kill_ns "$(ns_of "$1")"
}

cmd_link() {  # HOST up|down
  require_root_ip
  check_host "$1"
  ip link set "$(link_of "$1")" "$2"
  if [[ "$2" == down ]]; then log "cut $1 ($(ip_of "$1")) off"; else log "healed $1 ($(ip_of "$1"))"; fi
}

cmd_preempt() {
  require_root_ip
  local host="" grace="" wait=0 a pid
  for a in "$@"; do
    case "$a" in
      --wait) wait=1 ;;
      *) if [[ -z "$host" ]]; then host="$a"; elif [[ -z "$grace" ]]; then grace="$a"; else usage; fi ;;
    esac
  done
  [[ -n "$host" ]] || usage
  check_host "$host"
  grace="${grace:-$((GRACE + 5))}"
  check_number GRACE "$grace"
  pid="$(pid_of "$host" ray)"
  running "$pid" || die "$host: \`ray start\` is not running"
  stop_reaper "$host"
  log "preempting $host: SIGTERM to ray start ($pid), SIGKILL to what is left in ${grace}s"
  kill -TERM "$pid"
  if ((wait)); then
    cmd_reap "$host" "$grace"
  else
    setsid "$SELF" _reap "$host" "$grace" >>"$STATE/$host/reaper.log" 2>&1 </dev/null &
    echo $! >"$(pid_file "$host" reaper)"
  fi
}

# wait until a host's namespace is empty, at most GRACE seconds, then SIGKILL what is left
cmd_reap() {
  local host="$1" grace="$2" ns deadline
  ns="$(ns_of "$host")"
  deadline=$((SECONDS + grace))
  while ((SECONDS < deadline)) && [[ -n "$(ns_pids "$ns")" ]]; do sleep 0.5; done
  if [[ -n "$(ns_pids "$ns")" ]]; then
    log "$host: grace of ${grace}s over, SIGKILL to $(ns_pids "$ns" | wc -l) processes"
    kill_ns "$ns"
  else
    log "$host: every process exited within the grace of ${grace}s"
  fi
}

cmd_restart() {
  require_root_ip
  local host="" force=0 a
  for a in "$@"; do
    case "$a" in
      --force) force=1 ;;
      *) [[ -z "$host" ]] || usage; host="$a" ;;
    esac
  done
  [[ -n "$host" ]] || usage
  check_host "$host"
  [[ -n "$(ip netns list | awk '{print $1}' | grep -Fx "$(ns_of "$host")")" ]] ||
    die "no namespace $(ns_of "$host"): the testbed is not up"
  ip -o link show "$(link_of "$host")" | grep -q '[<,]UP[,>]' ||
    die "$host's link is cut: \`heal $host\` first"
  # a host that runs and whose node Ray sees alive is left alone (unless --force); not one with
  # a preemption under way (its node drains, still alive)
  if ((!force)) && running "$(pid_of "$host" ray)" && ! running "$(pid_of "$host" reaper)" &&
    { [[ "$host" != head ]] || running "$(pid_of head s3)"; } &&
    head_python -c "$NODES_PY" "$(ip_of head):$GCS_PORT" wait 1 "$(ip_of "$host")" >/dev/null 2>&1; then
    log "$host runs and its node is alive: nothing to restart (--force restarts it all the same)"
    return 0
  fi
  stop_reaper "$host"
  if [[ -n "$(ns_pids "$(ns_of "$host")")" ]]; then
    log "$host: ending the processes still running there"
    kill_ns "$(ns_of "$host")"
  fi
  log "restarting $host"
  if [[ "$host" == head ]]; then
    start_s3
    start_ray head
    wait_s3 || { log_tail head; return 1; }
  else
    start_ray "$host"
  fi
  if ! wait_hosts "$TIMEOUT" "$host"; then
    log_tail "$host"
    return 1
  fi
  log "$host is back ($(ip_of "$host"))"
}

cmd_exec() {
  require_root_ip
  local host="$1" env_lines=()
  shift
  check_host "$host"
  (($#)) || usage
  mapfile -t env_lines < <(testbed_env)
  exec ip netns exec "$(ns_of "$host")" env "${env_lines[@]}" \
    "RAY_ADDRESS=$(ip_of head):$GCS_PORT" "$@"
}

cmd_nodes() {
  require_root_ip
  [[ -f "$CONF" ]] || die "no testbed $NAME: run \`up\` first"
  head_python -c "$NODES_PY" "$(ip_of head):$GCS_PORT" nodes
}

# wait until HOST's node is alive / dead in Ray; prints the seconds it took
cmd_wait() {
  require_root_ip
  local host="$1" want="$2" timeout="${3:-60}"
  check_host "$host"
  check_number TIMEOUT "$timeout"
  case "$want" in
    alive) head_python -c "$NODES_PY" "$(ip_of head):$GCS_PORT" wait "$timeout" "$(ip_of "$host")" ;;
    dead) head_python -c "$NODES_PY" "$(ip_of head):$GCS_PORT" gone "$timeout" "$(ip_of "$host")" ;;
    *) usage ;;
  esac
}

cmd_status() {
  require_root_ip
  if [[ ! -f "$CONF" ]]; then
    log "not up (no $CONF)"
    if [[ -n "$(our_namespaces)$(our_links)" ]]; then
      log "stale: $(our_namespaces | tr '\n' ' ')$(our_links | tr '\n' ' ') (run \`down\`)"
    fi
    return 3
  fi
  local host ns link state n ray bad=0
  printf '%-6s %-15s %-6s %-6s %-10s %s\n' HOST ADDRESS LINK PROCS "RAY START" NAMESPACE
  for host in $(hosts); do
    ns="$(ns_of "$host")"
    link="$(ip -o link show "$(link_of "$host")" 2>/dev/null || true)"
    if [[ -z "$link" ]]; then state=none; elif grep -q '[<,]UP[,>]' <<<"$link"; then state=up; else state=cut; fi
    n="$(ns_pids "$ns" | grep -c . || true)"
    if running "$(pid_of "$host" ray)"; then ray="pid $(pid_of "$host" ray)"; else ray=exited; bad=1; fi
    printf '%-6s %-15s %-6s %-6s %-10s %s\n' "$host" "$(ip_of "$host")" "$state" "$n" "$ray" "$ns"
  done
  echo "S3 http://$(ip_of head):$S3_PORT (bucket $BUCKET): $(running "$(pid_of head s3)" && echo running || echo exited)"
  echo "RAY_ADDRESS=$(ip_of head):$GCS_PORT$([[ "$DASHBOARD" == 1 ]] && echo "  job API http://$(ip_of head):$DASHBOARD_PORT")"
  echo "Ray nodes (from the head):"
  if running "$(pid_of head ray)"; then
    timeout 30 "$SELF" nodes || bad=1
  else
    echo "  (the head is not running)"
    bad=1
  fi
  return "$bad"
}

cmd_env() {
  [[ -f "$CONF" ]] || die "no testbed $NAME: run \`up\` first"
  local line
  while IFS= read -r line; do
    printf 'export %s=%q\n' "${line%%=*}" "${line#*=}"
  done < <(testbed_env; echo "RAY_ADDRESS=$(ip_of head):$GCS_PORT")
}

cmd="${1:-}"
(($#)) && shift
case "$cmd" in
  up) (($# <= 1)) || usage; cmd_up "$@" ;;
  down) (($# == 0)) || usage; load_conf; cmd_down ;;
  kill) (($# == 1)) || usage; load_conf; cmd_kill "$1" ;;
  cut) (($# == 1)) || usage; load_conf; cmd_link "$1" down ;;
  heal) (($# == 1)) || usage; load_conf; cmd_link "$1" up ;;
  preempt) (($# >= 1)) || usage; load_conf; cmd_preempt "$@" ;;
  _reap) (($# == 2)) || usage; load_conf; cmd_reap "$@" ;;
  restart) (($# == 1 || $# == 2)) || usage; load_conf; cmd_restart "$@" ;;
  exec) (($# >= 2)) || usage; load_conf; cmd_exec "$@" ;;
  nodes) (($# == 0)) || usage; load_conf; cmd_nodes ;;
  wait) (($# == 2 || $# == 3)) || usage; load_conf; cmd_wait "$@" ;;
  status) (($# == 0)) || usage; load_conf; cmd_status ;;
  env) (($# == 0)) || usage; load_conf; cmd_env ;;
  *) usage ;;
esac
