#!/usr/bin/env bash
# One-call GPU check, run from the repository root on a CUDA machine without network:
#
#     bash bench/gpu_check.sh
#
# 1. installs the wheels in .whl/ (pydantic and its dependencies, which the machine's Python
#    lacks) into /tmp/site, offline, and puts /tmp/site and the repository on PYTHONPATH;
# 2. tests/test_gpu.py (extraction, training, auxiliary losses, metrics on CUDA vs CPU refs);
# 3. bench/bench_losses.py on CUDA at a GPT-2-124M-like shape;
# 4. bench/bench_extract.py on CUDA in bfloat16: ours vs the two-pass pattern vs the per-segment
#    loop at three shapes (a synthetic d 1024 Llama, SmolLM2-135M's config, Llama-3.2-1B's config;
#    random weights, since the packaged GGUF is larger than what travels to the machine).
#
# Logs go to $OUT (default /tmp/gpu_check_out): gpu_tests.log, bench_losses_gpu.log,
# bench_extract_gpu.log and summary.txt (the exit status of every step). A failing step does
# not stop the later ones; each has a time limit so the whole script stays under ~8 minutes.
# The script exits with the first non-zero step status (0 when all passed).

set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"   # overridable for a dry run elsewhere
SITE="${SITE:-/tmp/site}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$(date +%s)

step() {  # step NAME TIMEOUT_S LOG -- command...: run with a time limit, tee the log, record rc
    local name=$1 limit=$2 log=$3
    shift 4
    echo
    echo "=== $name (limit ${limit}s) ==="
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    echo "$name: rc=$rc ($(( $(date +%s) - t0 ))s)" | tee -a "$SUMMARY"
    return 0
}

# -- 1. environment ------------------------------------------------------------------------
echo "=== install wheels ==="
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    ls -1 "$WHEELS"/*.whl
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
            || echo "pip install failed (rc=$?)"
    else  # no pip: a wheel is a zip of the installed files
        echo "no pip; unpacking the wheels into $SITE"
        "$PY" -c 'import glob, sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[2]) for w in glob.glob(sys.argv[1] + "/*.whl")]' "$WHEELS" "$SITE"
    fi
else
    echo "no wheels in $WHEELS/ (pydantic must then be installed already)"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg

echo
echo "=== machine ==="
nvidia-smi -L || echo "nvidia-smi failed"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
cat > /tmp/gpu_env_check.py <<'EOF'
import sys
print("python", sys.version.split()[0], sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "",
      "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
import transformers, numpy, pyarrow
print("transformers", transformers.__version__, "numpy", numpy.__version__, "pyarrow", pyarrow.__version__)
import importlib
missing = []
for m in ["pydantic", "dispersion", "dispersion.measure.extract", "dispersion.training.train", "dispersion.training.losses",
          "dispersion.measure.metrics", "dispersion.measure.modeling", "dispersion.core.config", "dispersion.training.zoo",
          "dispersion.core.storage", "dispersion.measure.corpus", "dispersion.analyses.condensation"]:
    try:
        importlib.import_module(m)
    except Exception as err:  # report every missing piece at once
        missing.append(f"{m}: {type(err).__name__}: {err}")
print("pydantic", getattr(sys.modules.get("pydantic"), "VERSION", "?"),
      "from", getattr(sys.modules.get("pydantic"), "__file__", "?"))
print("imports OK" if not missing else "IMPORT FAILURES:\n  " + "\n  ".join(missing))
sys.exit(1 if missing or not torch.cuda.is_available() else 0)
EOF
step "environment (imports, CUDA)" 90 "$OUT/versions.txt" -- "$PY" /tmp/gpu_env_check.py

# -- 2. tests ------------------------------------------------------------------------------
step "pytest tests/test_gpu.py" 180 "$OUT/gpu_tests.log" -- \
    "$PY" -m pytest -q -p no:cacheprovider -raP --durations=10 tests/test_gpu.py

# -- 3. loss benchmark: GPT-2-124M-like (d 768, 12 layers, 12 heads), T 512, B 8, vocab 50304 --
step "bench_losses (cuda)" 110 "$OUT/bench_losses_gpu.log" -- \
    "$PY" bench/bench_losses.py --device cuda --d 768 --layers 12 --T 512 --B 8 --vocab 50304 \
    --rounds 10 --warmup 3 --repeats 3 --n-list 4096 16384 65536 262144 --naive-max 32768

# -- 4. extraction benchmark: (b) 1024 x 512 tokens at three shapes, batch 32;
#       (c) memory runs with a d 1024 / 8-layer model and 512-token segments, batch 32 --------
step "bench_extract (cuda, bf16)" 220 "$OUT/bench_extract_gpu.log" -- \
    "$PY" bench/bench_extract.py --device cuda --dtype bfloat16 --d 1024 --layers 8 --T 512 --batch 32 \
    --shapes llama-d1024,smollm2-135m,llama-3.2-1b --naive-n 128

echo
echo "=== summary ($(( $(date +%s) - START ))s) ==="
cat "$SUMMARY"
awk -F'rc=' '{split($2, a, " "); if (a[1] != 0) { print a[1]; exit }}' "$SUMMARY" | { read -r rc; exit "${rc:-0}"; }
