"""Packaging: pure-Python install; csrc/ ships inside the package for the JIT build (ninja).

`pip install .` / `pip install -e .`; extras [triton] (the Triton backend; CUDA builds of torch
already bring triton, so only CPU installs that want the interpreter tests need it), [test]
(includes triton) and [bench].
`DEFINE_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .` also builds the C++ extension
ahead of time as define_kernels._C (CUDA sources too when torch has CUDA and a complete CUDA
toolkit is found, through a wrapper nvcc too: define_kernels/backends/cuda_toolkit.py; archs from
TORCH_CUDA_ARCH_LIST, default 9.0;8.0 without a visible GPU; DEBUG=1 for -O0 -g); it needs torch
installed first.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _load_toolkit_module():
    """define_kernels/backends/cuda_toolkit.py by path: importing the package here would import
    all of it (and its backends) before it is installed."""
    import importlib.util
    path = os.path.join(HERE, "define_kernels", "backends", "cuda_toolkit.py")
    spec = importlib.util.spec_from_file_location("_dk_cuda_toolkit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_options() -> dict:
    """setup() arguments of the optional ahead-of-time build (env DEFINE_KERNELS_BUILD_EXT=1)."""
    if os.environ.get("DEFINE_KERNELS_BUILD_EXT", "0") in ("", "0"):
        return {}
    import torch
    from torch.utils import cpp_extension

    debug = os.environ.get("DEBUG", "0") == "1"
    cxx_flags = (["-O0", "-g"] if debug else ["-O3"]) + ["-fopenmp", "-DDEFINE_KERNELS_PYTHON_MODULE"]
    sources = [os.path.join(CSRC, "define_ops.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    kwargs = dict(include_dirs=[os.path.join(CSRC, "include")], extra_link_args=["-fopenmp"],
                  extra_compile_args={"cxx": cxx_flags})
    cuda_toolkit = _load_toolkit_module()
    toolkit = cuda_toolkit.find_toolkit()
    if toolkit.root:
        cuda_toolkit.use_toolkit(toolkit)
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_toolkit.cuda_arch_list()
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
        kwargs["extra_compile_args"]["nvcc"] = ["-O0", "-g"] if debug else ["-O3"]
        extension = cpp_extension.CUDAExtension("define_kernels._C", sources, **kwargs)
    else:
        extension = cpp_extension.CppExtension("define_kernels._C", sources, **kwargs)
    return dict(ext_modules=[extension], cmdclass={"build_ext": cpp_extension.BuildExtension})


CSRC_PATTERNS = ["*.cpp", "*.cu", "*.cuh", "*.h", "**/*.cpp", "**/*.cu", "**/*.cuh", "**/*.h"]

setup(
    name="define-kernels",
    version="0.1.0",
    description="DeFINE embeddings (Mehta et al., ICLR 2020) with fused Triton, CUDA and C++ kernels",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author="the define-kernels authors",
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    keywords=["pytorch", "embeddings", "define", "language-modeling", "triton", "cuda"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Developers",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: C++",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.9",
    # csrc/ lives at the top of the repo and is installed as define_kernels/csrc, so the JIT build
    # finds it after a non-editable install too.
    packages=find_packages(include=["define_kernels", "define_kernels.*"]) + ["define_kernels.csrc"],
    package_dir={"define_kernels.csrc": "csrc"},
    package_data={"define_kernels.csrc": CSRC_PATTERNS,
                  "define_kernels.backends": ["measured_ranking.json"]},
    include_package_data=False,
    install_requires=[
        "torch>=2.6",
        "ninja",
        "numpy",  # torch warns on import without it
    ],
    extras_require={
        "triton": ['triton; platform_system == "Linux"'],
        # accelerate: transformers' device_map needs it (python_tests/test_hf_loading.py)
        "test": ["pytest", "pytest-benchmark", "expecttest", "numpy", "hypothesis", "accelerate",
                 'triton; platform_system == "Linux"'],
        "bench": ["pytest-benchmark", "tqdm", "matplotlib", "numpy"],
        # define_kernels.integrations.transformers; CI runs its tests at both ends of the range
        "hf": ["transformers>=5.4,<6"],
    },
    **extension_options(),
)
