"""Building and loading the C++ extension: the JIT build, its one-warning fallback, the
DEFINE_KERNELS_NO_JIT switch, two processes building into one fresh cache at once, the
`define_kernels.build` command, and the CMake build. Fresh builds run in subprocesses (a
TORCH_LIBRARY namespace can be defined once per process) with one compile job each."""
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from define_kernels.backends import cpp_build, cpp_ext, cpp_library

import expectations

NO_JIT = os.environ.get(cpp_library.ENV_NO_JIT, "0") not in ("", "0")
# An expected cpu_cpp (DEFINE_KERNELS_EXPECT) runs these anyway, and they fail under NO_JIT.
needs_jit = pytest.mark.skipif(NO_JIT and not expectations.is_expected("cpu_cpp"),
                               reason=f"{cpp_library.ENV_NO_JIT}=1 disables the JIT build")

# Runs the op once through the registry and checks it against the reference; prints the load state.
RUN_ONCE = textwrap.dedent("""
    import warnings
    warnings.simplefilter("always")
    import torch
    from define_kernels import backends, functional, reference
    from define_kernels.backends import cpp_library
    from define_kernels.config import HGTConfig
    config = HGTConfig(16, 40, 12, 3, 4, align=4, shuffle=True)
    params = [torch.randn(s, dtype=torch.float64) for s in config.param_shapes()]
    x, ids = torch.randn(20, 16, dtype=torch.float64), torch.randint(0, 20, (33,))
    inputs = backends.OpInputs(x, ids, params, config, 1.0, None)
    expected = reference.hgt_forward(x, ids, params, config)
    with warnings.catch_warnings(record=True) as caught:
        available = backends.available_backends()  # loads (or fails to build) the extension
        chosen = [backends.select("auto", inputs).name for _ in range(3)]
        torch.testing.assert_close(functional.hgt(x, params, config, ids=ids), expected)
        if "cpu_cpp" in available:
            torch.testing.assert_close(functional.hgt(x, params, config, ids=ids, backend="cpu_cpp"), expected)
    print("STATE", cpp_library.load_library())
    print("CPP_AVAILABLE", "cpu_cpp" in available)
    print("CHOSEN", chosen)
    print("WARNINGS", len(caught))
    for w in caught:
        print("WARNING", w.message)
""")


def run_python(code, env_updates, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != cpp_library.ENV_LIB}
    env.update({"MAX_JOBS": "1", **env_updates})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"


@needs_jit
def test_jit_build_loads_in_this_process():
    state = cpp_library.load_library()
    assert state.reason is None, state.reason
    if state.source.startswith("jit:"):
        assert Path(state.source[4:]).is_file()
    import torch
    assert torch._C._dispatch_has_kernel_for_dispatch_key("define_kernels_C::hgt_forward", "CPU")
    assert "cpu_cpp" in __import__("define_kernels").backends.available_backends()


@needs_jit
def test_build_command_reports_the_library():
    result = subprocess.run([sys.executable, "-m", "define_kernels.build"], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "MAX_JOBS": "1"})
    assert_ok(result)
    assert "define_kernels_C loaded from" in result.stdout
    assert "CUDA toolkit:" in result.stdout and "CUDA sources:" in result.stdout
    assert "ready after" in result.stderr


def test_require_cuda_fails_on_a_cpu_only_library():
    if __import__("torch").version.cuda:
        pytest.skip("a CUDA torch: the CUDA build check (.ci/cuda_build_check.sh) covers --require-cuda")
    result = run_python("import sys; from define_kernels.build import main; sys.exit(main(['--require-cuda']))",
                        {cpp_library.ENV_NO_JIT: "0"})
    assert result.returncode in (1, 2), result.stdout + result.stderr
    assert "torch was built without CUDA" in result.stdout


BLOCK_TRITON = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # as if not installed: find_spec -> None, import -> ImportError
    import torch
    import define_kernels as dk
    from define_kernels import backends
    print("STATUS", dict(backends.backend_status())["triton"])
    embed = dk.DeFINE(50, 8, map_dim=8, expand_dim=16, depth=2, max_groups=2)
    print("OUT", tuple(embed(torch.randint(0, 50, (3, 4))).shape))
""")


def test_package_works_without_triton():
    result = run_python(BLOCK_TRITON, {cpp_library.ENV_NO_JIT: "1"})
    assert_ok(result)
    assert "OUT (3, 4, 8)" in result.stdout, result.stdout
    status = next(line for line in result.stdout.splitlines() if line.startswith("STATUS"))
    assert "triton" in status and ("not installed" in status or "import failed" in status), status


def test_failed_build_warns_once_and_falls_back(tmp_path):
    broken = tmp_path / "csrc"
    shutil.copytree(cpp_build.csrc_dir(), broken, ignore=shutil.ignore_patterns("cuda"))
    for source in [broken / "define_ops.cpp", *(broken / "cpu").glob("*.cpp")]:
        source.write_text("#error broken on purpose by test_build\n" + source.read_text())
    result = run_python(RUN_ONCE, {cpp_build.ENV_CSRC: str(broken),
                                   "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
                                   cpp_library.ENV_NO_JIT: "0"})
    assert_ok(result)
    assert "WARNINGS 1" in result.stdout, result.stdout
    assert "JIT build failed" in result.stdout and "broken on purpose" in result.stdout, result.stdout
    assert "CPP_AVAILABLE False" in result.stdout and "CHOSEN ['torch', 'torch', 'torch']" in result.stdout


def test_no_jit_disables_the_build(tmp_path):
    result = run_python(RUN_ONCE, {cpp_library.ENV_NO_JIT: "1", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert_ok(result)
    assert "WARNINGS 0" in result.stdout, result.stdout
    assert cpp_library.ENV_NO_JIT in result.stdout and "CHOSEN ['torch', 'torch', 'torch']" in result.stdout
    assert "CPP_AVAILABLE False" in result.stdout
    assert not (tmp_path / "ext").exists()


@needs_jit
def test_two_processes_build_into_one_fresh_cache(tmp_path):
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    full_env = {**{k: v for k, v in os.environ.items() if k != cpp_library.ENV_LIB}, "MAX_JOBS": "1", **env}
    processes = [subprocess.Popen([sys.executable, "-c", RUN_ONCE], env=full_env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for process in processes:
        stdout, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, f"{stdout}\n{stderr[-4000:]}"
        assert "WARNINGS 0" in stdout and "CPP_AVAILABLE True" in stdout, stdout
        assert "source='jit:" in stdout
        # one line when the first-use build starts, one when it ends with its time (no logging
        # configured in the child: the lines still reach stderr)
        assert "define_kernels: building or loading define_kernels_C" in stderr, stderr[-2000:]
        assert re.search(r"define_kernels_C ready after \d+\.\d s", stderr), stderr[-2000:]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_build_loads_with_load_library(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = subprocess.run(["cmake", "-S", str(repo), "-B", str(build), *generator,
                                f"-DPython3_EXECUTABLE={sys.executable}"],
                               capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compiled = subprocess.run(["cmake", "--build", str(build), "-j1"], capture_output=True, text=True,
                              timeout=600)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    library = build / "libdefine_kernels_C.so"
    assert library.is_file() and (build / "compile_commands.json").is_file()
    code = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({str(library)!r})
        from define_kernels import reference
        from define_kernels.backends import cpp_ext, cpp_library
        from define_kernels.config import HGTConfig
        config = HGTConfig(16, 40, 12, 3, 4, align=4, transform="define_nomix", act="silu")
        params = [torch.randn(s, dtype=torch.float64) for s in config.param_shapes()]
        x, ids = torch.randn(20, 16, dtype=torch.float64), torch.randint(0, 20, (33,))
        y = torch.ops.define_kernels_C.hgt_forward(x, ids, params, *cpp_ext.cpp_args(config, 1.0, None))
        torch.testing.assert_close(y, reference.hgt_forward(x, ids, params, config))
        print("STATE", cpp_library.load_library())
    """)
    result = run_python(code, {})
    assert_ok(result)
    assert "source='preloaded'" in result.stdout
