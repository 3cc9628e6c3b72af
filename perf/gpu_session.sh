#!/usr/bin/env bash
# One command that turns a short GPU slot into recorded results (perf/README.md, "A one-command session").
#
#   bash perf/gpu_session.sh [--out DIR] [--budget-s S] [--archive FILE] [--skip STAGE]...
#                            [--only STAGE]... [--dry-run [--fake-stage-s S]] [--list]
#
# On a GPU machine, even one without network: installs the wheels carried in .whl/ (see
# perf/fetch_gpu_wheels.sh) and this package, then runs the stages below in order, most important
# first, each under its own time limit. Every stage writes its results into DIR before the next
# starts and DIR/session.md gets one row per stage, so a session cut short still leaves evidence.
# DIR defaults to perf/results/<device-slug>/ (commit it). --archive FILE packs DIR into one
# .tar.gz after every stage (handy where only one file can be copied back from the machine).
#
# Budgets: the nominal seconds below sum to DEFAULT_TOTAL_S (8.5 minutes, so that the session fits a
# 10-minute slot on an H100/H200 with room to start); --budget-s S scales every stage by S/DEFAULT_TOTAL_S.
# A stage gets min(its budget, time left before the report's reserve) and is skipped when that is
# under MIN_STAGE_S. tune-more takes whatever is left; the report stage always runs.
# --dry-run runs everything that needs no GPU (arguments, budgets, the output layout, session.md),
# writes each stage's command into its log instead of running it, and exits 0 on a CPU machine;
# each stage counts as its whole budget, so it shows when every stage would start at the latest;
# --fake-stage-s S makes each count S seconds instead, to see how the budgets give way.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"

DEFAULT_TOTAL_S=510
MIN_STAGE_S=${GPU_SESSION_MIN_STAGE_S:-15}
REPORT_RESERVE_S=25
KILL_GRACE_S=${GPU_SESSION_KILL_GRACE_S:-10}   # SIGINT this long before a stage's limit, SIGKILL at it
# The grid of the autotune sweep and of its side-by-side report (perf's own grid for the perf stages).
TUNE_SHAPES="65536x1000 16384x32000 8192x128256 4096x262144"

# name | nominal seconds | what it runs (see stage_command)
STAGES=(
  "env:40"
  "tests:150"
  "tune:55"
  "tuning:30"
  "perf-bf16:80"
  "perf-fp32:35"
  "perf-fwd-bwd:30"
  "linear:30"
  "vocab-parallel:20"
  "tune-more:15"       # nominal; takes whatever is left
  "report:$REPORT_RESERVE_S"
)

# The env stage (also runnable alone): versions, GPU facts, carried wheels, the package itself.
env_stage() {
  local out=$1
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)   git: $(git rev-parse HEAD 2>/dev/null)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  } > "$out/env.txt"
  if compgen -G ".whl/*.whl" > /dev/null; then
    echo "installing carried wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || return 1
  else
    echo "no .whl/*.whl: nothing carried (jax-triton, liger-kernel, jax-bitempered-loss stay missing)"
  fi
  PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pip install -q --no-index --no-deps \
    --no-build-isolation -e . || return 1
  PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" "$PY" - >> "$out/env.txt" 2>&1 <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "jax", "jaxlib", "jax_triton", "liger_kernel", "bitempered"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as err:  # noqa: BLE001
        print(name, "missing:", type(err).__name__, err)
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("cuda device:", p.name, p.multi_processor_count, "SMs", p.total_memory >> 20, "MiB")
EOF
  cat "$out/env.txt"
}
if [[ "${1:-}" == "--env-stage" ]]; then env_stage "$2"; exit $?; fi

usage() { sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_session.sh: $*" >&2; exit 2; }
is_number() { [[ "$1" =~ ^[0-9]+([.][0-9]+)?$ ]]; }

ORIGINAL_ARGS=("$@")
OUT_DIR=""; TOTAL_S="$DEFAULT_TOTAL_S"; ARCHIVE=""; DRY_RUN=0; FAKE_STAGE_S=""; LIST=0
SKIP=(); ONLY=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) [[ $# -ge 2 ]] || die "--out needs a folder"; OUT_DIR="$2"; shift 2 ;;
    --out=*) OUT_DIR="${1#*=}"; shift ;;
    --budget-s) [[ $# -ge 2 ]] || die "--budget-s needs seconds"; TOTAL_S="$2"; shift 2 ;;
    --budget-s=*) TOTAL_S="${1#*=}"; shift ;;
    --archive) [[ $# -ge 2 ]] || die "--archive needs a file"; ARCHIVE="$2"; shift 2 ;;
    --archive=*) ARCHIVE="${1#*=}"; shift ;;
    --skip) [[ $# -ge 2 ]] || die "--skip needs a stage"; SKIP+=("$2"); shift 2 ;;
    --only) [[ $# -ge 2 ]] || die "--only needs a stage"; ONLY+=("$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --fake-stage-s) [[ $# -ge 2 ]] || die "--fake-stage-s needs seconds"; FAKE_STAGE_S="$2"; shift 2 ;;
    --list) LIST=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
is_number "$TOTAL_S" || die "--budget-s must be a number of seconds, got '$TOTAL_S'"
TOTAL_S="${TOTAL_S%.*}"
(( TOTAL_S >= REPORT_RESERVE_S + MIN_STAGE_S )) || die "--budget-s must be >= $((REPORT_RESERVE_S + MIN_STAGE_S)), got $TOTAL_S"
if [[ -n "$FAKE_STAGE_S" ]]; then  # unset: a dry-run stage counts as its whole budget
  (( DRY_RUN )) || die "--fake-stage-s only goes with --dry-run"
  is_number "$FAKE_STAGE_S" || die "--fake-stage-s must be a number of seconds, got '$FAKE_STAGE_S'"
  FAKE_STAGE_S="${FAKE_STAGE_S%.*}"
fi
STAGE_NAMES=()
for entry in "${STAGES[@]}"; do STAGE_NAMES+=("${entry%%:*}"); done
for name in "${SKIP[@]}" "${ONLY[@]}"; do
  [[ " ${STAGE_NAMES[*]} " == *" $name "* ]] || die "unknown stage '$name' (stages: ${STAGE_NAMES[*]})"
done
if (( LIST )); then  # the default plan: every stage using its whole budget
  printf '%-15s %8s %11s\n' stage "budget s" "starts at s"
  at=0
  for entry in "${STAGES[@]}"; do
    case "${entry%%:*}" in tune-more) note="  (takes what is left)" ;; report) note="  (and what is left)" ;; *) note="" ;; esac
    printf '%-15s %8s %11s%s\n' "${entry%%:*}" "${entry##*:}" "$at" "$note"
    at=$(( at + ${entry##*:} ))
  done
  echo "total $at s; --budget-s S scales every budget by S/$DEFAULT_TOTAL_S"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# The clock (a dry run's is only the seconds its stages count as: their budgets or --fake-stage-s)
# and the budgets
# ---------------------------------------------------------------------------------------------
START_S=$SECONDS
FAKE_ELAPSED_S=0
elapsed() { (( DRY_RUN )) && echo "$FAKE_ELAPSED_S" || echo $(( SECONDS - START_S )); }

# stage_budget NOMINAL IS_LAST_PERF IS_REPORT -> seconds this stage may run (0: skip it)
stage_budget() {
  local nominal=$1 takes_rest=$2 is_report=$3 left scaled
  left=$(( TOTAL_S - $(elapsed) ))
  if (( is_report )); then
    (( left > REPORT_RESERVE_S )) && echo "$left" || echo "$REPORT_RESERVE_S"
    return
  fi
  left=$(( left - REPORT_RESERVE_S ))
  scaled=$(( nominal * TOTAL_S / DEFAULT_TOTAL_S ))
  (( takes_rest )) && scaled=$left
  (( scaled > left )) && scaled=$left
  (( scaled >= MIN_STAGE_S )) && echo "$scaled" || echo 0
}

# ---------------------------------------------------------------------------------------------
# Output folder
# ---------------------------------------------------------------------------------------------
if [[ -z "$OUT_DIR" ]]; then
  if (( DRY_RUN )); then
    OUT_DIR="${TMPDIR:-/tmp}/bitempered-gpu-session-dry-run"
  else
    slug=$("$PY" -c 'import torch; from perf.measure import device_slug
print(device_slug(torch.device("cuda" if torch.cuda.is_available() else "cpu")))' 2>/dev/null) || slug=""
    [[ -n "$slug" ]] || die "could not name the device (torch import failed?); pass --out DIR"
    OUT_DIR="perf/results/$slug"
  fi
fi
mkdir -p "$OUT_DIR/logs" "$OUT_DIR/autotune" || die "cannot create $OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
SESSION_MD="$OUT_DIR/session.md"
GIT_SHA=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
export BITEMPERED_CACHE_DIR="$OUT_DIR/autotune"   # the sweep's cache travels with the results
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false MPLBACKEND=Agg
unset TRITON_INTERPRET   # tests and perf run compiled (tests/conftest.py sets it only without CUDA)

{
  echo "# GPU session $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "git $GIT_SHA; command: \`bash perf/gpu_session.sh ${ORIGINAL_ARGS[*]}\`; total budget ${TOTAL_S} s$( (( DRY_RUN )) && echo '; DRY RUN (nothing was run)')."
  echo "Folder layout: env.txt, logs/<stage>.log, tests.xml (JUnit), autotune/ (the sweep's cache),"
  echo "tuning.csv/md (heuristic vs tuned), results.csv/md and plot_*.png (python -m perf)."
  echo
  echo "| stage | starts at s | budget s | used s | status | log |"
  echo "|---|---|---|---|---|---|"
} > "$SESSION_MD"

# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------
# stage_command NAME BUDGET -> the command line of the stage (one line; runs in $REPO)
stage_command() {
  local name=$1 budget=$2 inner=$(( $2 * 7 / 10 )) override="GPU_SESSION_OVERRIDE_${1//-/_}"
  if [[ -n "${!override:-}" ]]; then echo "${!override}"; return; fi  # tests of the runner
  case "$name" in
    env) echo "bash perf/gpu_session.sh --env-stage $(printf %q "$OUT_DIR")" ;;
    tests)
      echo "$PY -m pytest -q -rfE -p no:cacheprovider --durations=20 --junitxml=$OUT_DIR/tests.xml" \
           "\$(python_plugin_flags) tests" ;;
    tune)
      echo "$PY -m bitempered.tune --shapes $TUNE_SHAPES --dtypes bf16 fp32 --labels int" \
           "--families loss --time-budget-s $inner" ;;
    tuning)
      echo "$PY -m bitempered.tune --shapes $TUNE_SHAPES --dtypes bf16 fp32 --labels int --families loss" \
           "--report $OUT_DIR --time-budget-s $inner" ;;
    perf-bf16)
      echo "$PY -m perf --dtypes bf16 --directions fwdbwd --labels int --out $OUT_DIR --no-plots" \
           "--time-budget-s $inner" ;;
    perf-fp32)
      echo "$PY -m perf --dtypes fp32 --directions fwdbwd --labels int --out $OUT_DIR --no-plots" \
           "--time-budget-s $inner" ;;
    perf-fwd-bwd)
      echo "$PY -m perf --dtypes bf16 --directions fwd bwd --labels int --providers bitempered-triton" \
           "naive-port torch-ce liger-ce --out $OUT_DIR --no-plots --time-budget-s $inner" ;;
    linear)
      echo "$PY -m perf.linear --device cuda --shapes 8192x4096x128256 --dtypes bf16 --temps 0.8:1.2" \
           "--providers torch-fused torch-materialized liger-flce cce --repeats 3 --no-truth --out $OUT_DIR" ;;
    vocab-parallel)
      echo "$PY -m perf.vocab_parallel --device cuda --ranks 1 --rows 4096 --classes 32000 --dtype bf16" \
           "--repeats 5 --timeout $inner --out $OUT_DIR" ;;
    tune-more)
      echo "$PY -m bitempered.tune --shapes $TUNE_SHAPES --dtypes bf16 fp32 --labels dense int" \
           "--families loss softmax binary --time-budget-s $inner" ;;
    report) echo "$PY -m perf --report-only --out $OUT_DIR" ;;
  esac
}

# pytest flags for the plugins the GPU image has (pytest-timeout, pytest-xdist), none otherwise
python_plugin_flags() {
  local flags=""
  "$PY" -c 'import pytest_timeout' 2>/dev/null && flags+=" --timeout=120"
  # one file per worker (--dist loadfile): files keep their own order and shared state
  local workers="${GPU_SESSION_TEST_WORKERS:-8}"
  (( workers > 0 )) && "$PY" -c 'import xdist' 2>/dev/null && flags+=" -n $workers --dist loadfile"
  echo "$flags"
}
export -f python_plugin_flags
export PY


archive() {
  [[ -n "$ARCHIVE" ]] || return 0
  mkdir -p "$(dirname "$ARCHIVE")"
  tar -czf "$ARCHIVE.tmp" -C "$(dirname "$OUT_DIR")" "$(basename "$OUT_DIR")" && mv "$ARCHIVE.tmp" "$ARCHIVE"
}

RECORD_FORMAT='%-15s %11s %8s %6s  %s\n'
record() {  # record NAME STARTED BUDGET USED STATUS (seconds since the session started, its own budget)
  echo "| $1 | $2 | $3 | $4 | $5 | logs/$1.log |" >> "$SESSION_MD"
  printf "$RECORD_FORMAT" "$1" "$2" "$3" "$4" "$5"
  archive
}

selected() {
  local name=$1 s
  for s in "${SKIP[@]}"; do [[ "$s" == "$name" ]] && return 1; done
  (( ${#ONLY[@]} == 0 )) && return 0
  for s in "${ONLY[@]}" report; do [[ "$s" == "$name" ]] && return 0; done
  return 1
}

printf "$RECORD_FORMAT" stage "starts at s" "budget s" "used s" status
for entry in "${STAGES[@]}"; do
  name="${entry%%:*}"; nominal="${entry##*:}"; log="$OUT_DIR/logs/$name.log"
  began=$(elapsed)
  if ! selected "$name"; then record "$name" "$began" 0 0 "skipped (asked)"; continue; fi
  budget=$(stage_budget "$nominal" "$([[ $name == tune-more ]] && echo 1 || echo 0)" \
                        "$([[ $name == report ]] && echo 1 || echo 0)")
  if (( budget == 0 )); then record "$name" "$began" 0 0 "skipped (under ${MIN_STAGE_S} s left)"; continue; fi
  command=$(stage_command "$name" "$budget")
  echo "command: $command" > "$log"
  if (( DRY_RUN )); then
    echo "dry run: not run (time limit ${budget} s)" >> "$log"
    spent=${FAKE_STAGE_S:-$budget}
    FAKE_ELAPSED_S=$(( FAKE_ELAPSED_S + (spent < budget ? spent : budget) ))
    status="dry-run"
  else
    # SIGINT first: pytest and python -m perf then still print their summaries
    timeout -s INT -k "$KILL_GRACE_S" "$(( budget - KILL_GRACE_S ))" bash -c "$command" >> "$log" 2>&1
    rc=$?
    case $rc in
      0) status="ok" ;;
      124|130|137) status="timed out (rc $rc)" ;;
      *) status="failed (rc $rc)" ;;
    esac
    # the carried wheels for every later stage (the editable install needs no path)
    if [[ $name == env && $rc == 0 ]]; then export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"; fi
    if [[ $name == tests ]]; then tail -n 40 "$log" > "$OUT_DIR/tests-summary.txt"; fi
  fi
  record "$name" "$began" "$budget" $(( $(elapsed) - began )) "$status"
done
echo "" >> "$SESSION_MD"
echo "Finished after $(elapsed) s of $TOTAL_S." >> "$SESSION_MD"
archive
echo "wrote $OUT_DIR (session.md)${ARCHIVE:+ and $ARCHIVE}"
exit 0
