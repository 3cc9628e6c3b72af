#!/usr/bin/env bash
# Fetch, on a machine WITH network, the wheels a bare GPU machine lacks, into .whl/ (git-ignored),
# for perf/gpu_session.sh to install there with pip --no-index.
#
#   bash perf/fetch_gpu_wheels.sh [--dest DIR] [--python-version 3.12] [--dry-run]
#
# GPU machines without network (perf/README.md, "A one-command session") may have Python 3.12,
# torch 2.11, triton 3.6 and jax 0.11.2 with CUDA plugins, but not jax-triton, jax-bitempered-loss
# (the original implementation perf compares against) or liger-kernel (the Liger cross-entropy
# provider). --no-deps: their dependencies are already there, and a second copy of
# torch/triton/jax would shadow the machine's CUDA builds.
# --dry-run prints the pip commands without running them.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
DEST=".whl"; PYVER="3.12"; DRY_RUN=0
# jax-triton 0.3.1 needs jax >= 0.8.2 and triton >= 3.6 (pyproject's jax-gpu extra); the newest
# liger-kernel (a pure-Python wheel) is what perf compares against. Override with WHEELS="a==1 b".
read -r -a WHEELS <<< "${WHEELS:-jax-triton==0.3.1 jax-bitempered-loss==0.0.2 liger-kernel}"
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dest) [[ $# -ge 2 ]] || { echo "--dest needs a folder" >&2; exit 2; }; DEST="$2"; shift 2 ;;
    --python-version) [[ $# -ge 2 ]] || { echo "--python-version needs X.Y" >&2; exit 2; }
                      PYVER="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "fetch_gpu_wheels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || { echo "--python-version must look like 3.12, got '$PYVER'" >&2; exit 2; }

platform_flags=()
for p in "${PLATFORMS[@]}"; do platform_flags+=(--platform "$p"); done
for wheel in "${WHEELS[@]}"; do
  cmd=("$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER"
       --implementation cp "${platform_flags[@]}" -d "$DEST" "$wheel")
  if (( DRY_RUN )); then
    printf '%q ' "${cmd[@]}"; echo
  else
    mkdir -p "$DEST"
    "${cmd[@]}"
  fi
done
if (( ! DRY_RUN )); then
  echo "in $DEST:"; ls -1 "$DEST"
  echo "carry it to the GPU machine (device tool: carry=[\"$DEST\"]); perf/gpu_session.sh installs it"
fi
