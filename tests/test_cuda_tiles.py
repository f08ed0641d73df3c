"""The CUDA kernel's tile and index arithmetic, emulated on the CPU.

tests/cpp/cuda_tiles_emulation.cpp includes csrc/cuda/gram_hadamard_tiles.cuh
(the same helpers the kernel calls) and checks every mode, positions, outputs
and the symmetric triangle against the definition, so the CUDA index math is
tested on machines without a GPU.
"""

import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler (g++)")
def test_cuda_tile_index_arithmetic_matches_definition(tmp_path):
    binary = tmp_path / "cuda_tiles_emulation"
    subprocess.run(
        ["g++", "-O2", "-std=c++20", "-Wall", "-Wextra", "-Werror", "-I", os.path.join(REPO, "csrc"),
         os.path.join(HERE, "cpp", "cuda_tiles_emulation.cpp"), "-o", str(binary)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(", 0 failures")
