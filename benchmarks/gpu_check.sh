#!/usr/bin/env bash
# The GPU check, one command on a machine with a GPU and no network (every step has a time limit: 8 minutes in
# all at most):
#
#   OUT=/tmp/gpu-check GIT_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh
#
# .whl/ (ignored by git, 22 MB) is filled beforehand on a machine with network, for CPython 3.12 on x86-64 Linux:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 \
#     pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
#     bm25s==0.3.16 faiss-cpu==1.15.1 fla-core==0.6.0 einops==0.8.2
# No GPU build of FAISS fits beside them (see NO_FAISS_GPU in gpu_check.py); one installed on the machine is used.
#
# Steps, each allowed to fail without stopping the rest:
#   install  the wheels carried in .whl/ (what torch's environment lacks: pydantic, bm25s, faiss-cpu, fla-core,
#            einops) into /tmp/site, first on PYTHONPATH; without .whl/ the installed packages are used
#   tests    the GPU-only tests (flash-linear-attention kernels against the plain rule), then test files whose
#            stages run on CUDA when present (device "auto"), each against its independent reference
#   demo     `mlpmem run demo` with every stage on DEVICE, into RUN (fresh)
#   bench    `mlpmem bench --quick` on that run
#   faiss    the demo's FAISS index on the GPU against the CPU (benchmarks/gpu_check.py faiss)
# OUT gets gpu-check.json (status and seconds of every step, provenance, test counts, perplexities, FAISS rows),
# log.txt, evaluate-results.json, bench.json and bench.png. Without CUDA the GPU steps are recorded as
# "skipped: no CUDA". DEVICE=cpu rehearses every step on the CPU (DEMO_ARGS shortens the demo, e.g.
# "--train_lm.max_steps 20 --train_memory.epochs 1"); PYTHON picks the interpreter.
set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/gpu-check} DEVICE=${DEVICE:-cuda} PYTHON=${PYTHON:-python3} RUN=${RUN:-/tmp/gpu-check-run}
export WORK=$(mktemp -d) GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
mkdir -p "$OUT" "$WORK/junit"
exec > >(tee -a "$OUT/log.txt") 2>&1

step() { # step NAME SECONDS FUNCTION: run FUNCTION under a time limit; record its exit status and seconds
  local start=$EPOCHREALTIME rc
  echo "== $1 (at most $2 s)"
  timeout -k 5 "$2" bash -c "$3"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$1" "$rc" "$(awk "BEGIN { print $EPOCHREALTIME - $start }")" "$2" >>"$WORK/steps.tsv"
}
skip() { # skip NAME WHY
  echo "== $1 skipped: $2"
  printf '%s\tskipped: %s\t0\t0\n' "$1" "$2" >>"$WORK/steps.tsv"
}

run_install() {
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}
run_tests() { # the GPU-only file first (its Triton kernels compile and tune on first use: ~180 s on an H200, at
  # most 200 s here), then two files whose stages run on CUDA (~50 s); one JUnit file each, so a time-out loses one
  # file's counts only
  local rc=0 t limit
  for t in lm/test_mom_kernels evaluate/test_perplexity inference/test_joint; do
    limit=$([ "$t" = lm/test_mom_kernels ] && echo 200 || echo 600)
    echo "-- tests/$t.py"
    timeout --foreground -k 5 "$limit" \
      $PYTHON -m pytest -q -p no:cacheprovider --junitxml="$WORK/junit/${t/\//.}.xml" "tests/$t.py" || rc=1
  done
  return $rc
}
run_demo() {
  local on_device=() section
  for section in train_lm datastore train_memory evaluate; do on_device+=("--$section.device" "$DEVICE"); done
  # shellcheck disable=SC2086 # DEMO_ARGS is a list of flags
  $PYTHON -m mlpmem.cli run demo --run_dir "$RUN" "${on_device[@]}" ${DEMO_ARGS:-} &&
    cp "$RUN/evaluate/results.json" "$OUT/evaluate-results.json"
}
run_bench() {
  $PYTHON -m mlpmem.cli bench --quick --run-dir "$RUN" --device "$DEVICE" --out "$WORK/bench" &&
    cp "$WORK/bench/bench.json" "$WORK/bench/bench.png" "$OUT/"
}
run_faiss() {
  $PYTHON benchmarks/gpu_check.py faiss --run-dir "$RUN" --device "$DEVICE" --out "$WORK/faiss.json"
}
export -f run_install run_tests run_demo run_bench run_faiss

if compgen -G ".whl/*.whl" >/dev/null; then
  step install 30 run_install
  export PYTHONPATH=/tmp/site:$PWD/src
else
  skip install "no wheels in .whl/"
  export PYTHONPATH=$PWD/src
fi
rm -rf "$RUN"  # a fresh demo; never a stale run's figures
nvidia-smi -L
$PYTHON -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.is_available())"
if [ "$DEVICE" != cpu ] && ! $PYTHON -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  for name in tests demo bench faiss; do skip $name "no CUDA"; done
else
  step tests 260 run_tests
  step demo 90 run_demo
  step bench 70 run_bench
  step faiss 30 run_faiss
fi
$PYTHON benchmarks/gpu_check.py summary --out-dir "$OUT" --steps "$WORK/steps.tsv" --run-dir "$RUN" \
  --junit-dir "$WORK/junit" --faiss "$WORK/faiss.json" --device "$DEVICE" || cp "$WORK/steps.tsv" "$OUT/"
