#!/usr/bin/env bash
# Local stack on 127.0.0.1 for dispersion: a Prefect server, a process worker on the pool
# `dispersion` (with the deployments of infra/prefect.yaml) and an S3-compatible server
# (moto) with a bucket.
#
#   bash infra/stack.sh up        # start everything, write .stack/env
#   source .stack/env             # PREFECT_API_URL, AWS_* (local dummy values), RAY_AUTH_MODE
#   prefect deployment run 'scan-models/nightly' --watch
#   bash infra/stack.sh status
#   bash infra/stack.sh down      # stop everything this script started (idempotent)
#
# Settings (environment):
#   STACK_DIR          state folder (default: <repo>/.stack): Prefect home, logs, pids, env
#   STACK_PREFECT_PORT Prefect server port (default 4200)
#   STACK_S3_PORT      moto S3 port (default 9000)
#   STACK_BUCKET       bucket created in moto (default dispersion)
#   STACK_BIN          folder with python and prefect (default: <repo>/.venv/bin, else PATH)
#   STACK_UI           true/false: serve the Prefect UI (default true)
#   STACK_DEPLOY       true/false: create the pool and deploy infra/prefect.yaml (default true)
#   STACK_TIMEOUT      seconds to wait for each server to answer (default 90)
#
# Every server binds 127.0.0.1 only. The AWS keys written to .stack/env are dummy values that
# only the local moto server accepts. Runs started by the worker see the same environment,
# so `-p root=s3://$STACK_BUCKET/...` writes to moto. Without RAY_ADDRESS each flow run
# starts its own local Ray (RAY_TMPDIR under the state folder).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK_DIR="${STACK_DIR:-$REPO/.stack}"
PREFECT_PORT="${STACK_PREFECT_PORT:-4200}"
S3_PORT="${STACK_S3_PORT:-9000}"
BUCKET="${STACK_BUCKET:-dispersion}"
UI="${STACK_UI:-true}"
DEPLOY="${STACK_DEPLOY:-true}"
TIMEOUT="${STACK_TIMEOUT:-90}"
POOL=dispersion
if [[ -n "${STACK_BIN:-}" ]]; then BIN="$STACK_BIN"
elif [[ -x "$REPO/.venv/bin/python" ]]; then BIN="$REPO/.venv/bin"
else BIN="$(dirname "$(command -v python3)")"; fi
PY="$BIN/python"
PREFECT="$BIN/prefect"
PIDS="$STACK_DIR/pids"
LOGS="$STACK_DIR/logs"
COMPONENTS=(worker prefect s3)   # stop order
UP_OK=0
cd "$REPO"

log() { echo "stack: $*" >&2; }
die() { log "error: $*"; exit 1; }

pid_alive() {  # pid_alive PID: running, and not a zombie waiting to be reaped
  kill -0 "$1" 2>/dev/null || return 1
  [[ -r "/proc/$1/stat" ]] || return 0
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [[ "${stat%% *}" != Z ]]
}

alive() {  # alive NAME: the recorded process is running
  local f="$PIDS/$1.pid"
  [[ -f "$f" ]] && pid_alive "$(cat "$f")"
}

port_free() {
  "$PY" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

wait_http() {  # wait_http NAME URL: until URL answers 2xx, the process dies, or TIMEOUT
  local name="$1" url="$2" t=0
  while (( t < TIMEOUT * 2 )); do
    if "$PY" -c "import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$url" 2>/dev/null; then
      return 0
    fi
    alive "$name" || { tail -n 30 "$LOGS/$name.log" >&2 || true; return 1; }
    sleep 0.5; t=$((t + 1))
  done
  tail -n 30 "$LOGS/$name.log" >&2 || true
  return 1
}

start() {  # start NAME CMD...: in its own session (so `down` stops its children too)
  local name="$1"; shift
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"
}

signal_one() {  # signal_one NAME SIG: to the process group of NAME (its own session)
  local f="$PIDS/$1.pid" pid
  [[ -f "$f" ]] || return 0
  pid="$(cat "$f")"
  kill -"$2" -- "-$pid" 2>/dev/null || kill -"$2" "$pid" 2>/dev/null || true
}

write_env() {
  cat >"$STACK_DIR/env" <<EOF
# source this file: the local stack started by infra/stack.sh (dummy credentials for moto only)
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export PREFECT_HOME=$STACK_DIR/prefect-home
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_DEFAULT_REGION=us-east-1
export DISPERSION_BUCKET=$BUCKET
export RAY_AUTH_MODE=disabled
export RAY_TMPDIR=$STACK_DIR/ray
export HF_HUB_OFFLINE=1
export PATH=$BIN:\$PATH
EOF
}

cmd_up() {
  mkdir -p "$PIDS" "$LOGS" "$STACK_DIR/prefect-home" "$STACK_DIR/ray"
  local running=0
  for c in "${COMPONENTS[@]}"; do alive "$c" && running=$((running + 1)); done
  if (( running == ${#COMPONENTS[@]} )); then log "already up"; cmd_status; return 0; fi
  if (( running > 0 )); then log "partly up: restarting"; cmd_down; mkdir -p "$PIDS" "$LOGS"; fi
  [[ -x "$PREFECT" ]] || die "no prefect in $BIN (run make install, or set STACK_BIN)"
  port_free "$PREFECT_PORT" || die "port $PREFECT_PORT is in use (set STACK_PREFECT_PORT)"
  port_free "$S3_PORT" || die "port $S3_PORT is in use (set STACK_S3_PORT)"

  write_env
  # shellcheck disable=SC1091
  set -a; source "$STACK_DIR/env"; set +a
  export PREFECT_UI_ENABLED="$UI" PREFECT_SERVER_API_HOST=127.0.0.1

  trap '[[ $UP_OK == 1 ]] || { log "start failed: stopping what started"; cmd_down; }' EXIT
  log "moto S3 on 127.0.0.1:$S3_PORT"
  start s3 "$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT"
  log "Prefect server on 127.0.0.1:$PREFECT_PORT (state in $PREFECT_HOME)"
  start prefect env -u PREFECT_API_URL "$PREFECT" server start --host 127.0.0.1 --port "$PREFECT_PORT"

  wait_http s3 "$AWS_ENDPOINT_URL/" || die "moto did not come up (log: $LOGS/s3.log)"
  "$PY" - "$BUCKET" <<'EOF'
import sys, boto3
s3 = boto3.client("s3")
if sys.argv[1] not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
    s3.create_bucket(Bucket=sys.argv[1])
EOF
  log "bucket s3://$BUCKET"
  wait_http prefect "$PREFECT_API_URL/health" || die "Prefect server did not come up (log: $LOGS/prefect.log)"

  if "$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1; then :; else
    "$PREFECT" work-pool create "$POOL" --type process >"$LOGS/deploy.log" 2>&1 \
      || die "cannot create work pool $POOL (log: $LOGS/deploy.log)"
  fi
  if [[ "$DEPLOY" == true ]]; then
    # deploy from the repo root: the flow runs' working directory is fixed to it (see prefect.yaml)
    if "$PREFECT" --no-prompt deploy --all --prefect-file infra/prefect.yaml >>"$LOGS/deploy.log" 2>&1; then
      log "deployed $("$PY" -c 'import yaml; print(", ".join(d["entrypoint"].split(":")[1].replace("_", "-") + "/" + d["name"] for d in yaml.safe_load(open("infra/prefect.yaml"))["deployments"]))')"
    else
      log "deploy --all failed (see $LOGS/deploy.log); deploying nightly only"
      "$PREFECT" --no-prompt deploy --name nightly --prefect-file infra/prefect.yaml >>"$LOGS/deploy.log" 2>&1 \
        || die "deploy failed (log: $LOGS/deploy.log)"
      log "deployed scan-models/nightly"
    fi
  fi
  log "worker on pool $POOL"
  start worker "$PREFECT" worker start --pool "$POOL" --type process
  sleep 2
  alive worker || { tail -n 30 "$LOGS/worker.log" >&2; die "worker exited"; }
  UP_OK=1
  log "up; now: source $STACK_DIR/env"
}

cmd_down() {
  # TERM to every process group, up to STACK_STOP_WAIT s (default 5) for all of them, then KILL.
  # (The Prefect worker treats the first TERM/INT as "finish the running flow runs", which
  # can take long: the KILL stops it and the flow runs in its process group.)
  local c pid t
  local -a live=()
  for c in "${COMPONENTS[@]}"; do
    if alive "$c"; then live+=("$c"); signal_one "$c" TERM; else rm -f "$PIDS/$c.pid"; fi
  done
  if (( ${#live[@]} == 0 )); then log "nothing running"; return 0; fi
  for (( t = 0; t < ${STACK_STOP_WAIT:-5} * 4; t++ )); do
    pid=0
    for c in "${live[@]}"; do alive "$c" && pid=1; done
    (( pid )) || break
    sleep 0.25
  done
  local -a killed=()
  for c in "${live[@]}"; do
    pid="$(cat "$PIDS/$c.pid")"
    signal_one "$c" KILL   # whatever is left in its process group
    killed+=("$pid")
    rm -f "$PIDS/$c.pid"
    log "stopped $c (pid $pid)"
  done
  # a killed process takes a moment to be torn down: return once every one is gone (<= 5 s)
  for (( t = 0; t < 20; t++ )); do
    pid=0
    for c in "${killed[@]}"; do
      [[ -r /proc/$c/stat ]] && [[ "$(awk '{print $3}' "/proc/$c/stat" 2>/dev/null)" != "Z" ]] && pid=1
    done
    (( pid )) || break
    sleep 0.25
  done
  return 0
}

cmd_status() {
  local rc=0 state
  for c in "${COMPONENTS[@]}"; do
    if alive "$c"; then state="running (pid $(cat "$PIDS/$c.pid"))"; else state="stopped"; rc=3; fi
    printf '%-8s %s\n' "$c" "$state"
  done
  if alive prefect; then
    "$PY" -c "import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
      "http://127.0.0.1:$PREFECT_PORT/api/health" 2>/dev/null \
      && echo "prefect  http://127.0.0.1:$PREFECT_PORT/api healthy" || { echo "prefect  not answering"; rc=3; }
  fi
  if alive s3; then
    "$PY" -c "import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
      "http://127.0.0.1:$S3_PORT/" 2>/dev/null \
      && echo "s3       http://127.0.0.1:$S3_PORT healthy (bucket $BUCKET)" || { echo "s3       not answering"; rc=3; }
  fi
  return $rc
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
