#!/usr/bin/env bash
# GPU check of recbole-mm, for a CUDA machine without a package registry (under 8 minutes):
#   1. installs the CUDA kernels from files shipped beside the project: wheels in $KERNEL_WHEELS
#      (default ./wheels/*.whl) or source trees $KERNEL_SOURCES (default ./wheels/src/{causal-conv1d,mamba}),
#      built with --no-build-isolation against the machine's own torch (no registry, no other torch);
#   2. runs the GPU tests with RECBOLE_MM_REQUIRE_KERNELS=1 (a kernel that does not import fails, never skips);
#   3. times the SSD core vs length (benchmarks/bench_ssd.py --device cuda) and one MMM4Rec epoch on
#      Scientific at the default config with and without bf16 autocast, with peak GPU memory.
# Results go to $OUT_DIR (default benchmarks/results/gpu_check/): install.log, tests.log, ssd.md, epoch.md.
#
#   bash benchmarks/gpu_check.sh [--dry-run]
# --dry-run: check what is there (python, torch, CUDA, kernel files, dataset) and print the plan; runs nothing.
set -u
cd "$(dirname "$0")/.."
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
PYTHON=${PYTHON:-python}
OUT_DIR=${OUT_DIR:-benchmarks/results/gpu_check}
KERNEL_WHEELS=${KERNEL_WHEELS:-wheels}
KERNEL_SOURCES=${KERNEL_SOURCES:-wheels/src}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

cuda=$("$PYTHON" -c "import torch; print(torch.version.cuda or 'none', torch.cuda.is_available(), torch.__version__)" 2>&1) || {
  echo "gpu_check: cannot import torch with $PYTHON: $cuda"; exit 2; }
read -r cuda_version cuda_ok torch_version <<<"$cuda"
echo "gpu_check: torch $torch_version, CUDA build $cuda_version, CUDA device available: $cuda_ok"
wheels=$(ls "$KERNEL_WHEELS"/*.whl 2>/dev/null | tr '\n' ' ')
sources=$(for d in causal-conv1d mamba; do [ -d "$KERNEL_SOURCES/$d" ] && printf '%s ' "$KERNEL_SOURCES/$d"; done)
echo "gpu_check: kernel wheels: ${wheels:-none}; kernel sources: ${sources:-none}"
data=$("$PYTHON" -c "from recbole_mm.config import default_data_path; p = default_data_path() / 'Scientific'; print(p if p.is_dir() else 'missing: ' + str(p))" 2>&1)
echo "gpu_check: Scientific dataset: $data"

if [ "$cuda_ok" != "True" ]; then
  echo "gpu_check: no CUDA device here, nothing to check (the GPU tests and timings need one)."
  [ "$DRY_RUN" = 1 ] && exit 0 || exit 2
fi
if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_check: dry run; would install the kernels above, run the GPU tests and write $OUT_DIR/{install.log,tests.log,ssd.md,epoch.md}"
  exit 0
fi

mkdir -p "$OUT_DIR"
{
  if [ -n "$wheels" ]; then
    "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation $wheels
  fi
  for source in $sources; do
    # setup.py imports torch: build against the installed one (no isolation); *_FORCE_BUILD skips wheel downloads
    CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-8} \
      "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation "$source"
  done
  "$PYTHON" -c "from recbole_mm.model.layers import ssd; print('mamba_ssm:', ssd.mamba_import_error() or 'ok'); print('causal_conv1d:', ssd.causal_conv1d_import_error() or 'ok')"
} > "$OUT_DIR/install.log" 2>&1
tail -3 "$OUT_DIR/install.log"

RECBOLE_MM_REQUIRE_KERNELS=1 timeout 240 "$PYTHON" -m pytest -q tests/test_ssd.py tests/test_trainer.py -k "kernel or cuda or bf16" \
  > "$OUT_DIR/tests.log" 2>&1
echo "gpu_check: GPU tests exit $? (log $OUT_DIR/tests.log)"; tail -3 "$OUT_DIR/tests.log"

timeout 90 "$PYTHON" benchmarks/bench_ssd.py --device cuda --lengths 20 50 200 1000 > "$OUT_DIR/ssd.md" 2>&1
echo "gpu_check: SSD timing exit $?"; tail -8 "$OUT_DIR/ssd.md"

timeout 240 "$PYTHON" - > "$OUT_DIR/epoch.md" 2>&1 <<'PY'
import logging, os, tempfile, time
import torch
from recbole_mm.quick_start import build
from recbole_mm.experiments.measure import machine_description
logging.disable(logging.INFO)
os.chdir(tempfile.mkdtemp())
rows = []
for precision in (None, "bf16"):
    _, (train, _, _), model, trainer = build("MMM4Rec", "Scientific", config_dict={"show_progress": False, "mixed_precision": precision})
    trainer._train_epoch(train, 0)  # warm-up (Triton compilation)
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter(); trainer._train_epoch(train, 1); torch.cuda.synchronize()
    rows.append((precision or "fp32", time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20))
print(f"machine: {machine_description()}\n\nMMM4Rec default config, one Scientific training epoch (after a warm-up epoch)\n")
print("| precision | s / epoch | peak GPU memory MiB |\n|---|---:|---:|")
for precision, seconds, memory in rows:
    print(f"| {precision} | {seconds:.2f} | {memory:.0f} |")
PY
echo "gpu_check: epoch timing exit $?"; cat "$OUT_DIR/epoch.md" | tail -5
