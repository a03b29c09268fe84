#!/usr/bin/env bash
# The CUDA check: the CUDA-marked tests, then the GPU benchmark, on one H100 / H200 in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # from any folder; PYTHON=... picks the interpreter
#
# Installs nothing. It needs torch (with CUDA), optree, einops and safetensors importable, and the
# package itself (installed, or this checkout through PYTHONPATH, which the script sets). pytest
# and hypothesis are optional: without pytest the tests are skipped, without hypothesis the test
# modules that import it cannot be collected and only the others run; both are reported.
# Writes into $OUT when set (else benchmarks/gpu_results/): summary.txt, deps.txt, nvidia-smi.txt,
# pytest_cuda.txt, run.log, results.json and RESULTS.md.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
DEST="${OUT:-$ROOT/benchmarks/gpu_results}"
mkdir -p "$DEST"
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
TOTAL_S=${GPU_CHECK_SECONDS:-470}  # leaves a margin under 8 minutes
TEST_S=${GPU_CHECK_TEST_SECONDS:-150}
START=$(date +%s)
SUMMARY="$DEST/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - START )); }

# 1. What is there (nothing is installed).
"$PY" - > "$DEST/deps.txt" 2>&1 <<'PYEOF'
import importlib

required = ["torch", "optree", "einops", "safetensors"]
optional = ["pytest", "hypothesis", "transformers", "tqdm"]
missing = []
for name in required + optional:
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', 'present')}")
    except Exception as err:  # report every missing package, not only the first
        print(f"{name} MISSING ({type(err).__name__}: {err})")
        if name in required:
            missing.append(name)
if "torch" not in missing:
    import torch

    ok = torch.cuda.is_available()
    print("cuda", ok, torch.version.cuda, torch.cuda.get_device_name(0) if ok else "no device")
    if not ok:
        missing.append("a CUDA device")
if not missing:
    try:
        import importlib.util

        import functional_memopt  # noqa: F401  (importable, not only found)

        origin = importlib.util.find_spec("functional_memopt").origin or ""
        print("functional_memopt importable from", "the checkout" if "site-packages" not in origin else "site-packages")
    except Exception as err:
        print(f"functional_memopt NOT importable ({type(err).__name__}: {err})")
        missing.append("functional_memopt (pip install -e . --no-deps, or PYTHONPATH=.)")
print("REQUIRED_MISSING:" + ",".join(missing))
PYEOF
cat "$DEST/deps.txt" >> "$SUMMARY"
MISSING="$(sed -n 's/^REQUIRED_MISSING://p' "$DEST/deps.txt")"
if [ -n "$MISSING" ] || ! grep -q '^REQUIRED_MISSING' "$DEST/deps.txt"; then
    note "cannot run: missing ${MISSING:-python or torch} (this script installs nothing; see deps.txt)."
    exit 2
fi
nvidia-smi > "$DEST/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" > "$DEST/nvidia-smi.txt"

# 2. The CUDA-marked tests.
if grep -q '^pytest MISSING' "$DEST/deps.txt"; then
    note "pytest -m cuda: not run (pytest is not installed)"
else
    EXTRA=()
    if grep -q '^hypothesis MISSING' "$DEST/deps.txt"; then
        # tests/conftest.py imports hypothesis: skip it and collect what does not need hypothesis.
        EXTRA=(--noconftest --continue-on-collection-errors)
        note "hypothesis is missing: running without tests/conftest.py; modules that import hypothesis are not collected"
    fi
    timeout "$TEST_S" "$PY" -m pytest -m cuda -q -p no:cacheprovider ${EXTRA[@]+"${EXTRA[@]}"} tests \
        > "$DEST/pytest_cuda.txt" 2>&1
    RC=$?
    case $RC in
        0) WHY="passed" ;;
        5) WHY="no test is marked cuda" ;;
        124) WHY="timed out after $TEST_S s" ;;
        *) WHY="failures or errors, see pytest_cuda.txt" ;;
    esac
    note "pytest -m cuda: exit $RC ($WHY); $(tail -n 1 "$DEST/pytest_cuda.txt")"
fi

# 3. The GPU benchmark, in the time that is left.
LEFT=$(( TOTAL_S - $(elapsed) ))
if [ "$LEFT" -lt 120 ]; then
    note "benchmark: not run, only $LEFT s left"
    exit 1
fi
BUDGET=$(( LEFT - 25 ))
timeout "$LEFT" "$PY" benchmarks/run.py --device cuda --out "$DEST" --budget-s "$BUDGET" > "$DEST/run.log" 2>&1
RC=$?
note "benchmark: exit $RC$( [ $RC -eq 124 ] && echo ' (timed out)') after $(elapsed) s in all; see RESULTS.md and run.log"
tail -n 5 "$DEST/run.log" >> "$SUMMARY"
exit $RC
