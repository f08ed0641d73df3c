"""The CUDA kernel's tiling and loop nest, emulated on the CPU.

The programs in tests/cpp include csrc/cuda/gram_hadamard_tiles.cuh, the same
helpers the kernel calls, so the CUDA index arithmetic is tested on machines
without a GPU: cuda_kernel_emulation.cpp walks the kernel's loop nest for random
problems of every mode and compares with the definition; cuda_tiles_emulation.cpp
checks the symmetric tile enumeration up to millions of tiles.
"""

import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler (g++)")


def _build_and_run(source: str, tmp_path, *args: str) -> str:
    binary = tmp_path / source.replace(".cpp", "")
    subprocess.run(
        ["g++", "-O2", "-std=c++20", "-Wall", "-Wextra", "-Werror", "-I", os.path.join(REPO, "csrc"),
         os.path.join(HERE, "cpp", source), "-o", str(binary)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    result = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


@needs_compiler
def test_cuda_kernel_loop_nest_matches_definition(tmp_path):
    printed = _build_and_run("cuda_kernel_emulation.cpp", tmp_path, "120")
    assert printed.endswith("120 trials, 0 mismatches, 0 check failures")


@needs_compiler
def test_symmetric_tile_enumeration_visits_the_upper_triangle_once(tmp_path):
    printed = _build_and_run("cuda_tiles_emulation.cpp", tmp_path)
    assert printed.endswith(", 0 failures")
