""".ci/check_imports.py: finds an import cycle (function-level imports included, TYPE_CHECKING
ones not) and passes on define_kernels/."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "check_imports.py"


def run(package: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(package)], capture_output=True, text=True,
                          timeout=120)


def write(package: Path, files: dict) -> Path:
    package.mkdir()
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).write_text(text)
    return package


def test_the_package_has_no_cycle():
    result = run(REPO / "define_kernels")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 cycle(s)" in result.stdout


def test_a_lazy_import_cycle_is_found(tmp_path):
    package = write(tmp_path / "pkg", {
        "a.py": "from . import b\n",
        "b.py": "def f():\n    from .a import g  # lazy, still a cycle\n",
    })
    result = run(package)
    assert result.returncode == 1 and "pkg.a <-> pkg.b" in result.stdout, result.stdout


def test_package_init_cycle_is_found_and_type_checking_is_not(tmp_path):
    package = write(tmp_path / "pkg", {
        "__init__.py": "from . import reg\n",
        "reg.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .user import X\n",
        "user.py": "from . import register\n",
    })
    (package / "__init__.py").write_text("from . import user\nregister = None\n")
    result = run(package)
    assert result.returncode == 1 and "pkg <-> pkg.user" in result.stdout, result.stdout
    (package / "user.py").write_text("from .reg import Y\n")
    assert run(package).returncode == 0
