"""Build and install v2d.

The C++ extension `kernels._C` (CPU, OpenMP) is always built. The CUDA sources are added when the
installed torch has CUDA or when FORCE_CUDA=1. Install with `pip install --no-build-isolation -e .`
so that the extension builds against the torch already in the environment.
"""

import os
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent
CSRC = Path("kernels") / "csrc"


def _extension():
    cpp_sources = sorted(str(p) for p in CSRC.glob("*.cpp"))
    cuda_sources = sorted(str(p) for p in CSRC.glob("*.cu"))
    use_cuda = (torch.cuda.is_available() and CUDA_HOME is not None) or os.environ.get("FORCE_CUDA") == "1"
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]
    if use_cuda:
        return CUDAExtension(
            "kernels._C",
            cpp_sources + cuda_sources,
            define_macros=[("V2D_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "kernels._C",
        cpp_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="v2d",
    version="0.1.0",
    description="Differentiable structure from motion and SLAM (DeepV2D line) in PyTorch",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["v2d", "v2d.*", "slam", "slam.*", "kernels", "kernels.*", "tools", "tools.*"]),
    package_data={"v2d": ["weights/*.pt"], "kernels": ["csrc/*.h", "csrc/*.cuh"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["v2d=tools.cli:main"]},
)
