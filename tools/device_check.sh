#!/usr/bin/env bash
# Run THERE: on a GPU machine that has its own torch and reaches nothing (docs/gpu.md gives the device tool's
# call). Needs .device/ from tools/device_wheels.sh, carried with the tree. In at most 8 minutes:
#   install  a venv on that machine's torch (--system-site-packages, and a .pth to the site of a python3 that
#            is itself a venv), the carried wheels (pip --no-index), detectron2 v0.6's sources copied in;
#   tests    the CUDA cases of the test suite (pytest -k cuda: the `device` fixture's [cuda] ids);
#   teacher, stage_one, student, decode   tools/device_bench.py, one process per part.
# Each part has its own timeout, within one deadline, so a slow part still leaves the others' results.
# Writes to $OUT (or output/device_check): device_check.json (per part: exit code, seconds, timed out; the
# machine; the tests' summary), bench.json (the figures), install.log, tests.log, bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/device_check}
PY=${PYTHON:-python3}
VENV=${DEVICE_VENV:-/tmp/device-venv}
WORK=${DEVICE_WORK:-/tmp/device-bench}
BUDGET=${DEVICE_CHECK_SECONDS:-465}  # the whole check; the device tool's run gets timeout_s 540 (docs/gpu.md)
BENCH_OPTS=${BENCH_OPTS:-}           # e.g. --quick --device cpu, to try this script on a CPU
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD PYTHONWARNINGS=ignore::FutureWarning,ignore::UserWarning
START=$(date +%s)
RESULTS=()

# part NAME LIMIT_S LOG COMMAND...: run COMMAND under min(LIMIT_S, what is left of BUDGET), appending to LOG.
part() {
  local name=$1 limit=$2 logfile=$3
  shift 3
  local left=$((START + BUDGET - $(date +%s)))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    RESULTS+=("{\"part\": \"$name\", \"rc\": null, \"seconds\": 0, \"timed_out\": false, \"skipped\": \"no time left\"}")
    echo "device_check: $name skipped, no time left" | tee -a "$OUT/$logfile"
    return 1
  fi
  local t0=$(date +%s)
  echo "device_check: $name (limit ${limit} s)" | tee -a "$OUT/$logfile"
  timeout -k 10 "$limit" "$@" >> "$OUT/$logfile" 2>&1
  local rc=$?
  local timed_out=false
  ((rc == 124 || rc == 137)) && timed_out=true
  RESULTS+=("{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0)), \"timed_out\": $timed_out}")
  echo "device_check: $name exited $rc after $(($(date +%s) - t0)) s" | tee -a "$OUT/$logfile"
  return $rc
}

install_packages() {
  [ -d .device/wheelhouse ] && [ -d .device/detectron2 ] || {
    echo "no .device/wheelhouse or .device/detectron2: run tools/device_wheels.sh here first and carry .device"; return 2; }
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "$("$PY" -V): zarr 3 needs Python >= 3.11, and .device/ holds wheels for 3.11 and 3.12 only"; return 2; }
  rm -rf "$VENV"
  "$PY" -m venv --without-pip --system-site-packages "$VENV" || return 2
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # A python3 that is itself a venv (as the GPU image's is) is not the "system" of a venv made from it: its
  # site-packages, with torch and pip, join the new venv through a .pth, after the venv's own.
  "$PY" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site/_device_base.pth"
  "$VENV/bin/python" -m pip install --no-index --find-links .device/wheelhouse --no-cache-dir \
    --disable-pip-version-check --no-compile -r .device/requirements.txt || return 3
  cp -r .device/detectron2 "$site/detectron2"
  "$VENV/bin/python" -c '
import torch, zarr, numcodecs, fvcore, detectron2, pipeline
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("zarr", zarr.__version__, "numcodecs", numcodecs.__version__, "detectron2", detectron2.__version__)
print("shims applied:", pipeline._compat.applied)'
}

{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$OUT/install.log" 2>&1 || true
# timeout runs programs, not shell functions: the install runs in a child bash that is handed the function.
export -f install_packages
export PY VENV
if part install 75 install.log bash -c install_packages; then
  VPY="$VENV/bin/python"
  part tests 120 tests.log "$VPY" -m pytest -q -rs -p no:cacheprovider tests -k cuda
  for p in teacher stage_one student decode; do
    case $p in teacher) limit=45 ;; stage_one) limit=90 ;; student) limit=90 ;; decode) limit=40 ;; esac
    # shellcheck disable=SC2086  # BENCH_OPTS is a word list
    part "$p" "$limit" bench.log "$VPY" -m tools.device_bench --parts "$p" --out "$OUT/bench.json" --work "$WORK" $BENCH_OPTS
  done
fi

summary=$(grep -E "^[0-9]+ (passed|failed|skipped|error)|(passed|failed|error).* in [0-9.]+s" "$OUT/tests.log" 2>/dev/null | tail -n1)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
parts=$(IFS=,; echo "${RESULTS[*]}")
cat > "$OUT/device_check.json" <<EOF
{"gpu": "${gpu}", "python": "$("$PY" -V 2>&1)", "seconds": $(($(date +%s) - START)), "budget_s": $BUDGET,
 "tests_summary": "${summary//\"/\'}", "parts": [${parts}]}
EOF
cat "$OUT/device_check.json"
