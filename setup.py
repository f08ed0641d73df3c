"""Build script of lazykernel and its compiled operator library `lazykernel._C`.

The C++ CPU kernels are always built. The CUDA kernels are built when the
installed torch has CUDA and nvcc is found; LAZYKERNEL_CUDA=1 forces a CUDA
build (a compile check on a machine without a GPU), LAZYKERNEL_CUDA=0 skips it.
TORCH_CUDA_ARCH_LIST chooses the architectures (default "8.0;9.0").

torch must already be installed: build with `pip install --no-build-isolation .`
so that the extension is compiled against the torch it will run with.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as error:  # pragma: no cover - exercised only on broken set-ups
    raise SystemExit(
        "lazykernel needs torch at build time. Install it first, e.g.\n"
        "    pip install torch==2.13.0   # CPU build\n"
        "then build with\n"
        "    pip install --no-build-isolation .\n"
        f"({error})"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("LAZYKERNEL_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if torch.version.cuda is None:
            raise SystemExit(
                "LAZYKERNEL_CUDA=1 but the installed torch "
                f"{torch.__version__} has no CUDA support; install a CUDA build of torch."
            )
        if cpp_extension.CUDA_HOME is None:
            raise SystemExit("LAZYKERNEL_CUDA=1 but nvcc was not found; set CUDA_HOME.")
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _cuda_library_includes() -> list:
    """Header folders of the CUDA libraries shipped as wheels beside torch.

    torch's CUDA headers include cuBLAS/cuSPARSE headers that a bare toolkit may
    lack; the nvidia-* wheels installed with torch carry them.
    """
    found = []
    for root in sys.path:
        for pattern in ("nvidia/*/include", "nvidia/cu*/include"):
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                if os.path.isdir(path) and path not in found:
                    found.append(path)
    return found


def _extension():
    sources = [
        "csrc/lazykernel.cpp",
        "csrc/cpu/gram_hadamard_cpu.cpp",
        "csrc/linear_jvp_checks.cpp",
        "csrc/cpu/linear_jvp_cpu.cpp",
    ]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        if os.environ.get("LAZYKERNEL_PTXAS_VERBOSE", "") == "1":
            nvcc_flags.append("-Xptxas=-v")
        return cpp_extension.CUDAExtension(
            "lazykernel._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")] + _cuda_library_includes(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "lazykernel._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["lazykernel", "lazykernel.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
