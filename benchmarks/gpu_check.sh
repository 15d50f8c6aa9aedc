#!/usr/bin/env bash
# GPU checks in one prepared script; installs nothing from the network.
#
#   bash benchmarks/gpu_check.sh [bench_gpu.py options, e.g. --quick]
#
# 1. wheels: if .whl/ holds wheels (array-api-compat, tensorly, scipy... for a
#    machine that lacks them), they are installed offline into /tmp/site.
# 2. environment: versions, GPU detection. Without a GPU: prints
#    'no GPU: skipped' and exits 0.
# 3. the gpu-marked tests: CuPy (every test over the xp fixture) and torch on CUDA.
# 4. the torch binding's tests, when the binding exists.
# 5. benchmarks/bench_gpu.py: CuPy vs torch-on-CUDA timings of reconstruct, vjp, fit.
#
# Each section runs even when an earlier one failed; the exit status is 1 if
# any failed. Everything is also written to "${OUT:-/tmp}/gpu_check.log".
set -u
cd "$(dirname "$0")/.." || exit 1
OUTDIR="${OUT:-/tmp}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if command -v python3 >/dev/null 2>&1; then PY=python3; else PY=python; fi
fi
STEP_TIMEOUT="${GPU_CHECK_TIMEOUT:-300}"
failed=()

section() { echo; echo "=== $* ==="; }
run_step() {  # run_step NAME CMD...: never aborts the script
    local name="$1"; shift
    local t0=$SECONDS rc
    timeout "$STEP_TIMEOUT" "$@"
    rc=$?
    echo "--- $name: rc=$rc in $((SECONDS - t0)) s"
    if [ "$rc" -ne 0 ]; then failed+=("$name (rc=$rc)"); fi
    return 0
}

section "wheels"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
shopt -s nullglob
wheels=()
for w in .whl/*.whl; do
    # Only what is missing (GPU_CHECK_ALL_WHEELS=1 installs every wheel).
    mod=$(basename "$w"); mod=${mod%%-*}; mod=${mod//-/_}; mod=${mod,,}
    if [ "${GPU_CHECK_ALL_WHEELS:-0}" != "1" ] && "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$mod') else 1)" 2>/dev/null; then
        echo "$mod: already installed; $(basename "$w") not used"
    else
        wheels+=("$w")
    fi
done
if [ "${#wheels[@]}" -gt 0 ]; then
    site=/tmp/site
    mkdir -p "$site"
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$site" "${wheels[@]}" \
            || echo "pip install of .whl/ failed; continuing"
    else
        # Without pip: a wheel is a zip archive of the files to put on the path.
        for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$site" || echo "unpacking $w failed"; done
    fi
    export PYTHONPATH="$site:$PYTHONPATH"
    echo "installed ${#wheels[@]} wheel(s) from .whl/ into $site"
else
    echo "no wheel from .whl/ needed: using the installed packages"
fi

section "environment"
"$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("numpy", "opt_einsum", "array_api_compat", "tensorly", "scipy", "safetensors", "hypothesis",
             "pytest", "array_api_strict", "torch", "cupy"):
    try:
        m = importlib.import_module(name)
        print(f"{name:18s} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"{name:18s} missing ({type(exc).__name__}: {exc})")
try:
    import torch
    print("torch.cuda", torch.cuda.is_available(), torch.version.cuda,
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception as exc:
    print("torch.cuda: unavailable", exc)
try:
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
    print("cupy devices", n, cupy.cuda.runtime.runtimeGetVersion())
except Exception as exc:
    print("cupy devices: unavailable", exc)
import tucker_peft, tucker_peft.backends.cupy
print("tucker_peft", tucker_peft.__version__, "imports OK")
EOF
[ $? -eq 0 ] || failed+=("environment")

gpu=$("$PY" - 2>/dev/null <<'EOF'
ok = False
try:
    import cupy
    ok = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:
    pass
try:
    import torch
    ok = ok or torch.cuda.is_available()
except Exception:
    pass
print(1 if ok else 0)
EOF
)
if [ "$gpu" != "1" ]; then
    section "gpu"
    echo "no GPU: skipped"
    exit 0
fi

section "pytest -m gpu (CuPy and torch on CUDA)"
run_step "gpu tests" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests

section "torch binding"
torch_tests=(tests/test_torch*.py tests/test_backend_torch*.py)
if [ -e tucker_peft/backends/torch.py ] || [ -d tucker_peft/backends/torch ]; then
    if [ "${#torch_tests[@]}" -gt 0 ]; then
        run_step "torch binding tests" "$PY" -m pytest -q -rs -p no:cacheprovider "${torch_tests[@]}"
    else
        echo "torch binding found but no tests/test_torch*.py: skipped"
    fi
else
    echo "torch binding (tucker_peft/backends/torch) not built yet: skipped"
fi

section "benchmark: CuPy vs torch on CUDA"
run_step "bench_gpu" "$PY" benchmarks/bench_gpu.py "$@"

section "summary"
if [ "${#failed[@]}" -eq 0 ]; then
    echo "gpu_check: all sections passed"
    exit 0
fi
echo "gpu_check: failed sections: ${failed[*]}"
exit 1
