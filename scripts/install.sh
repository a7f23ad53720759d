#!/usr/bin/env bash
# Installs posefr-dist into a Python environment. The one install path of both the Makefile
# (`make setup`, `make test`, `make demo`: --cpu) and the Dockerfile (the image that k8s/ and
# cluster/aws-gpu.yaml run: --cuda).
#
#   scripts/install.sh [--cpu | --cuda] [--deps-only] [--dry-run] PYTHON ENV
#   scripts/install.sh [--dry-run] --pushgateway
#
#   --cpu          (default) development and CI: creates the virtual environment ENV with PYTHON,
#                  installs torch==$TORCH_VERSION first (pip takes the CPU build that lies on the
#                  machine's disk / index, so that no dependency pulls a multi-GB CUDA build), then
#                  this project editable with its test extras.
#   --cuda         the container image: ENV is an existing Python environment (the base image's
#                  /home/ray/anaconda3, which already holds Ray), or a virtual environment created
#                  with PYTHON when ENV has no bin/pip. Installs the CUDA build of the same torch
#                  from $TORCH_INDEX_URL (default $DEFAULT_TORCH_INDEX_URL, below), then this
#                  project, not editable, without test extras.
#   --deps-only    (--cuda) torch and the project's dependencies only, not the project: the
#                  Dockerfile installs them in a layer that only pyproject.toml invalidates.
#   --dry-run      print the commands instead of running them.
#   --pushgateway  tests/test_nightly.py runs Debian's prometheus-pushgateway: install it with
#                  apt-get when it is missing (as root, or through sudo that needs no password).
#                  Where that is impossible, say what to install and exit 0 all the same: only
#                  that test needs it (`make test-fast` does not run it).
#
# Every command is printed before it runs. The project is the folder above this script; relative
# paths in the arguments are taken from the current directory.
set -euo pipefail

TORCH_VERSION=2.13.0
DEFAULT_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
PUSHGATEWAY_BIN="${POSEFR_PUSHGATEWAY_BIN:-/usr/bin/prometheus-pushgateway}"

usage() {
  echo "usage: $0 [--cpu | --cuda] [--deps-only] [--dry-run] PYTHON ENV" >&2
  echo "       $0 [--dry-run] --pushgateway" >&2
  exit 2
}

mode=cpu
deps_only=0
dry_run=0
pushgateway=0
args=()
while (($#)); do
  case "$1" in
    --cpu) mode=cpu ;;
    --cuda) mode=cuda ;;
    --deps-only) deps_only=1 ;;
    --dry-run) dry_run=1 ;;
    --pushgateway) pushgateway=1 ;;
    -h | --help) usage ;;
    -*) echo "$0: unknown option $1" >&2; usage ;;
    *) args+=("$1") ;;
  esac
  shift
done

# print a command as a shell would read it back, then run it (unless --dry-run)
run() {
  local line="" word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./=:@%+,-]+$ ]]; then
      line+="$word "
    else
      line+="'${word//\'/\'\\\'\'}' "
    fi
  done
  echo "${line% }"
  if ((!dry_run)); then "$@"; fi
}

ensure_pushgateway() {
  local found sudo=() why=""
  if [[ -x "$PUSHGATEWAY_BIN" ]]; then return 0; fi
  if found="$(command -v prometheus-pushgateway)"; then
    echo "prometheus-pushgateway: using $found"
    return 0
  fi
  if ! command -v apt-get >/dev/null; then
    why="there is no apt-get on this machine"
  elif [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      sudo=(sudo)
    else
      why="this is not root and sudo is missing or asks for a password"
    fi
  fi
  if [[ -z "$why" ]]; then
    echo "$PUSHGATEWAY_BIN is missing (tests/test_nightly.py runs it): installing Debian's prometheus-pushgateway"
    if run "${sudo[@]}" apt-get update -q &&
      run "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends prometheus-pushgateway; then
      if ((dry_run)) || [[ -x "$PUSHGATEWAY_BIN" ]]; then return 0; fi
      why="the package was installed but $PUSHGATEWAY_BIN is still missing"
    else
      why="apt-get failed (see above)"
    fi
  fi
  cat >&2 <<MSG
WARNING: the Prometheus Pushgateway is not installed and could not be installed here: $why.
  tests/test_nightly.py (a slow test, part of 'make test') starts a real one and fails without it.
  Install Debian's package prometheus-pushgateway, e.g. as root:
      apt-get update && apt-get install -y --no-install-recommends prometheus-pushgateway
  (it provides $PUSHGATEWAY_BIN; a prometheus-pushgateway found on PATH is used too).
  'make test-fast' does not need it. Setup goes on.
MSG
  return 0
}

if ((pushgateway)); then
  ((${#args[@]} == 0)) || usage
  ensure_pushgateway
  exit 0
fi

((${#args[@]} == 2)) || usage
PYTHON="${args[0]}"
ENV="${args[1]}"
if ((deps_only)) && [[ "$mode" != cuda ]]; then
  echo "$0: --deps-only goes with --cuda" >&2
  usage
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "$(pwd)" != "$ROOT" ]]; then
  [[ "$ENV" == /* ]] || ENV="$(pwd)/$ENV"
  cd "$ROOT"
fi
PIP="$ENV/bin/pip"

if [[ "$mode" == cpu ]]; then
  run "$PYTHON" -m venv "$ENV"
  run "$PIP" install --upgrade --quiet pip
  # the CPU build of torch first, so no dependency pulls a CUDA build
  run "$PIP" install --quiet "torch==$TORCH_VERSION"
  run "$PIP" install --quiet -e '.[test]'
  exit 0
fi

# --cuda: the image
if [[ ! -x "$PIP" ]]; then
  run "$PYTHON" -m venv "$ENV"
fi
# the CUDA build of the same torch, from PyTorch's index (its CUDA libraries come as wheels)
run "$PIP" install --quiet --index-url "${TORCH_INDEX_URL:-$DEFAULT_TORCH_INDEX_URL}" "torch==$TORCH_VERSION"
if ((deps_only)); then
  # read with the environment's Python (3.11+: tomllib), else PYTHON, else python3
  reader=python3
  if [[ -x "$ENV/bin/python" ]]; then reader="$ENV/bin/python"
  elif command -v "$PYTHON" >/dev/null; then reader="$PYTHON"; fi
  mapfile -t deps < <("$reader" -c '
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))')
  ((${#deps[@]})) || { echo "$0: no dependencies read from pyproject.toml" >&2; exit 1; }
  run "$PIP" install --quiet "${deps[@]}"
else
  run "$PIP" install --quiet .
fi
