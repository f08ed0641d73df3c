#!/usr/bin/env bash
# One-shot GPU check: build the CUDA kernels in place, run the CUDA tests and the
# GPU benchmark, and leave a log and JSON in the folder given as argument.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Written for a GPU machine without network access: it uses the python3, torch
# (with CUDA), ninja and pytest already installed there and downloads nothing;
# test modules that need a package the machine lacks are left out, and the log
# says which. The whole check shares one time budget, GPU_CHECK_SECONDS (default
# 480, i.e. 8 minutes): each step runs under `timeout` for its own limit or what
# is left of the budget, whichever is less, the steps only a GPU can do come
# first, and a step with too little time left is skipped and logged. The exit
# status is 0 only when every step ran and passed.
set -uo pipefail
out="${1:?usage: gpu_check.sh OUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
log="$out/gpu_check.log"
status=0
budget="${GPU_CHECK_SECONDS:-480}"
deadline=$(( $(date +%s) + budget ))
grace=10   # seconds a step gets to stop after its limit's TERM, before KILL
step() { echo "== $* ($(date +%T))" | tee -a "$log"; }
# bounded LIMIT COMMAND...: COMMAND under timeout, for LIMIT seconds or what is left of the budget
bounded() {
  local limit=$1 left=$(( deadline - $(date +%s) - grace ))
  shift
  (( left < limit )) && limit=$left
  if (( limit < 15 )); then
    echo "SKIPPED: less than 15 s of the ${budget} s budget left for: $*" >>"$log"
    return 124
  fi
  timeout -k "$grace" "$limit" "$@"
}

step "environment"
{ bounded 30 nvidia-smi || true
  bounded 60 python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} >>"$log" 2>&1

step "build (LAZYKERNEL_CUDA=1, in place)"
export LAZYKERNEL_CUDA=1 LAZYKERNEL_PTXAS_VERBOSE=1 MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
build_with_setuptools() { python3 -c "import setuptools" 2>/dev/null && python3 setup.py build_ext --inplace; }
# Should setup.py fail, torch's JIT builder (ninja) compiles the same sources.
build_with_torch() {
  python3 - <<'PY'
import glob, os, shutil, sysconfig
from torch.utils.cpp_extension import load
sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
module = load(name="_C", sources=sources, extra_include_paths=[os.path.abspath("csrc")],
              extra_cflags=["-O3", "-std=c++20", "-fopenmp"], extra_ldflags=["-fopenmp"],
              extra_cuda_cflags=["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-Xptxas=-v"],
              is_python_module=False, verbose=True)
shutil.copy(module if isinstance(module, str) else module.__file__,
            os.path.join("lazykernel", "_C" + sysconfig.get_config_var("EXT_SUFFIX")))
PY
}
if ! bounded 240 bash -c "$(declare -f build_with_setuptools); build_with_setuptools" >"$out/build.log" 2>&1 \
   && ! bounded 240 bash -c "$(declare -f build_with_torch); build_with_torch" >>"$out/build.log" 2>&1; then
  tail -50 "$out/build.log" | tee -a "$log"; echo "BUILD FAILED" | tee -a "$log"; exit 1
fi
grep -E "registers|spill" "$out/build.log" | sort -u >>"$log"
bounded 60 python3 -m lazykernel doctor >>"$log" 2>&1 || status=1
# Without its CUDA kernels (an extension that failed to load, a build without nvcc) lazykernel
# runs the reference path: the CUDA kernel tests would skip and pass, the benchmarks time the wrong code.
loaded="import sys, lazykernel; info = lazykernel.backend(); sys.exit(0 if info.cuda_kernels and info.cuda_devices else 1)"
bounded 60 python3 -c "$loaded" >>"$log" 2>&1
case $? in
  0) ;;
  1) echo "CUDA kernels did not load (the doctor's report above says why): the CUDA kernel tests skip and the" \
          "benchmarks below time the reference path" | tee -a "$log"; status=1 ;;
  *) echo "the check that the CUDA kernels loaded did not finish" | tee -a "$log"; status=1 ;;
esac

# Test modules whose extra dependencies this machine lacks are left out of every pytest run,
# since one module failing to import stops the collection of all: the GPU machine has no
# package index to install them from.
ignores=()
if ! python3 -c "import hypothesis" 2>/dev/null; then
  ignores+=(--ignore=tests/test_ntk.py --ignore=tests/test_random_architectures.py)
fi
if ! python3 -c "import sklearn, matplotlib" 2>/dev/null; then
  ignores+=(--ignore=tests/test_demo.py)
fi
echo "left out for missing packages: ${ignores[*]:-none}" >>"$log"

step "CUDA tests"
bounded 120 python3 -m pytest -q -p no:cacheprovider -m cuda tests/ ${ignores[@]+"${ignores[@]}"} >>"$log" 2>&1 || status=1

step "GPU benchmark: MLPs"
# width 4096, O = 10, N = 4096 and 16384, trace and full (the full kernel at
# N = 16384, 107 GB, is skipped by --max-result-gib); against the plain-PyTorch
# structured baseline and the tutorial's Jacobian contraction where they fit; the
# -tf32 twins give the TF32 mode's speed and its error against float32. The JSON
# is rewritten after every measurement, so a step stopped by its limit keeps the rest.
bounded 150 python3 benchmarks/bench_ntk.py --device cuda --widths 4096 --n 4096 16384 \
  --outputs 10 --modes trace full --methods structured structured-tf32 plain-structured \
  plain-structured-tf32 tutorial-jacobian \
  --repeats 3 --max-seconds 20 --peer-memory-gib 60 --max-result-gib 40 \
  --json "$out/gpu_mlp.json" >>"$log" 2>&1 || status=1
step "GPU benchmark: CNNs and transformer"
bounded 120 python3 benchmarks/bench_ntk.py --device cuda --suite cnn transformer \
  --model-methods auto tutorial-jacobian --repeats 3 --max-seconds 10 --peer-memory-gib 60 \
  --json "$out/gpu_models.json" >>"$log" 2>&1 || status=1

if command -v compute-sanitizer >/dev/null 2>&1; then
  step "compute-sanitizer memcheck on a short subset"
  # Some machines' sanitizer refuses the device ("Device not supported"): that is the
  # machine's limit, not a finding, so a trivial CUDA program is tried first.
  if bounded 60 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -c \
       "import torch; torch.zeros(1, device='cuda').add_(1); torch.cuda.synchronize()" >>"$log" 2>&1; then
    # the small and the odd sizes (6×6 and 65×130: partial tiles) of every layer set, and opcheck
    bounded 120 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider \
      -m cuda "tests/test_ops.py::test_cuda_opcheck" "tests/test_ops.py::test_cuda_kernel_matches_reference" \
      -k "opcheck or sizes0 or sizes1" >>"$log" 2>&1 || status=1
  else
    echo "compute-sanitizer did not run a trivial CUDA program (see above): memcheck left out" | tee -a "$log"
  fi
fi

step "all tests on this machine"
bounded 240 python3 -m pytest -q -p no:cacheprovider -x tests/ ${ignores[@]+"${ignores[@]}"} >>"$log" 2>&1 || status=1

step "done (status $status)"
exit $status
