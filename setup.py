"""Packaging: pure-Python install; csrc/ ships inside the package for the JIT build (ninja).

`pip install .` / `pip install -e .`; extras [test] and [bench].
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC_PATTERNS = ["*.cpp", "*.cu", "*.cuh", "*.h", "**/*.cpp", "**/*.cu", "**/*.cuh", "**/*.h"]

setup(
    name="define-kernels",
    version="0.1.0",
    description="DeFINE embeddings (Mehta et al., ICLR 2020) with fused Triton, CUDA and C++ kernels",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # csrc/ lives at the top of the repo and is installed as define_kernels/csrc, so the JIT build
    # finds it after a non-editable install too.
    packages=find_packages(include=["define_kernels", "define_kernels.*"]) + ["define_kernels.csrc"],
    package_dir={"define_kernels.csrc": "csrc"},
    package_data={"define_kernels.csrc": CSRC_PATTERNS},
    include_package_data=False,
    install_requires=[
        "torch>=2.6",
        "ninja",
        'triton; platform_system == "Linux"',
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "expecttest", "numpy"],
        "bench": ["pytest-benchmark", "tqdm", "matplotlib", "numpy"],
    },
)
