"""Builds deconvseg_fast and its C++ extension deconvseg_fast._C.

CPU kernels are always built. CUDA sources under csrc/cuda/ are compiled when FORCE_CUDA=1, or when
the installed torch is a CUDA build and nvcc is found -- never on torch.cuda.is_available(), so a
GPU-less CI still builds them.
"""
import glob
import os
import shutil

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    if os.environ.get("FORCE_CUDA", "") == "0":
        return False
    has_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and has_nvcc


def _cxx_std():
    # torch 2.14's headers require C++20 (ATen.h errors out below it); older ones build as C++17.
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


def _extension():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    cxx = ["-O3", _cxx_std(), "-fopenmp", "-fno-math-errno"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if _want_cuda() and cuda_sources:
        cuda_home = CUDA_HOME or os.path.dirname(os.path.dirname(shutil.which("nvcc")))
        return CUDAExtension(
            "deconvseg_fast._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={
                "cxx": cxx + ["-DDECONVSEG_WITH_CUDA"],
                "nvcc": ["-O3", _cxx_std(), "-gencode=arch=compute_80,code=sm_80",
                         "-gencode=arch=compute_90,code=sm_90", "-DDECONVSEG_WITH_CUDA"],
            },
            library_dirs=[os.path.join(cuda_home, "lib"), os.path.join(cuda_home, "lib64")],
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "deconvseg_fast._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="deconvseg_fast",
    version="0.1.0",
    description="Fast kernels for switch-based and atrous segmentation networks",
    packages=[
        "deconvseg_fast",
        "deconvseg_fast.ops",
        "deconvseg_fast.nn",
        "deconvseg_fast.reference",
        "deconvseg_fast.models",
        "deconvseg_fast.compat",
        "deconvseg_fast.compat.pydensecrf",
        "deconvseg_fast.scenes",
        "deconvseg_fast.video",
        "deconvseg_fast.weights",
        "deconvseg_fast.kernels",
    ],
    # The default demo model's weights ship inside the package: nothing is downloaded at run time.
    package_data={"deconvseg_fast.weights": ["*.pt"]},
    package_dir={"deconvseg_fast.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"triton": ["triton>=3.2"], "bench": ["matplotlib", "pytest-benchmark"],
                    "video": ["av>=14", "tqdm"], "distributed": ["ray[data]>=2.40", "av>=14", "tqdm"]},
    entry_points={"console_scripts": ["deconvseg-fast=deconvseg_fast.cli:main"]},
)
