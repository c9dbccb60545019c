"""Mutation harness (`make mutate`): plant each bug of tools/mutations.py alone in a scratch copy
of the repo, run only its tests there, and report "K/N mutations caught" and the survivors.

A mutation is caught when its tests fail (pytest exit 1); exit 5 (nothing collected) or a
missing `old` text is an error, not a catch. The unmutated copy runs every listed test first
(the baseline must pass). C++ mutations get their own TORCH_EXTENSIONS_DIR; restored files keep
their original mtime, so the baseline build stays valid. Writes bench/results/mutation_<date>.md.

    python -m tools.mutate [--only SUBSTRING] [--out FILE] [--keep]
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.mutations import MUTATIONS, Mutation

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", ".torch_ext*", "__pycache__", "*.egg-info", "build",
                                ".pytest_cache", ".hypothesis", ".benchmarks", "bench")


def is_cpp(mutation: Mutation) -> bool:
    return mutation.file.startswith("csrc/")


def run_tests(copy: Path, tests, ext_dir: Path, extra_env=(), stop_first=True) -> tuple:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFINE_KERNELS_")}
    env.update(PYTHONPATH=str(copy), TORCH_EXTENSIONS_DIR=str(ext_dir), MAX_JOBS="2",
               DEFINE_KERNELS_EXPECT="cpu_cpp,triton", DEFINE_KERNELS_FUZZ_PROFILE="ci")
    env.update(dict(extra_env))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-x"] if stop_first else []),
               *tests]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    tail = lines[-1:] or ["(no output)"]
    if not stop_first:  # the baseline: name what failed (pytest's short summary)
        for line in lines:
            if line.startswith(("FAILED", "ERROR")):
                print("   ", line[:300], flush=True)
    return result.returncode, tail[0], time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only mutations whose name contains this")
    parser.add_argument("--out", type=Path,
                        default=REPO / "bench" / "results" / f"mutation_{datetime.date.today():%Y%m%d}.md")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = parser.parse_args()
    mutations = [m for m in MUTATIONS if not args.only or args.only in m.name]
    scratch = Path(tempfile.mkdtemp(prefix="define_mutate_"))
    copy = scratch / "repo"
    shutil.copytree(REPO, copy, ignore=IGNORE)
    (copy / "bench").mkdir()  # bench/ holds results only needed by bench tests, not by these
    base_ext = scratch / "ext_base"
    check = subprocess.run([sys.executable, "-c", "import define_kernels; print(define_kernels.__file__)"],
                           cwd=copy, env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True)
    assert check.stdout.strip().startswith(str(copy)), f"the copy's package is not imported: {check.stdout}"

    all_tests = sorted({t for m in mutations for t in m.tests if t.endswith(".py")})
    code, tail, seconds = run_tests(copy, all_tests, base_ext, stop_first=False)
    print(f"baseline ({len(all_tests)} files): exit {code}, {tail} [{seconds:.0f} s]", flush=True)
    if code != 0:
        print("baseline fails: fix the tests before mutating", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        return 2
    prebuilt = next(base_ext.rglob("define_kernels_C*.so"))

    rows, caught = [], 0
    for index, mutation in enumerate(mutations):
        target = copy / mutation.file
        original = target.read_text()
        count = original.count(mutation.old)
        if count != 1:
            rows.append((mutation, "ERROR", f"`old` found {count} times", 0.0))
            continue
        backup = scratch / "original"
        shutil.copy2(target, backup)
        target.write_text(original.replace(mutation.old, mutation.new))
        ext_dir = scratch / f"ext_{index}" if is_cpp(mutation) else base_ext
        env = tuple((k, v.format(prebuilt=prebuilt)) for k, v in mutation.env)
        try:
            code, tail, seconds = run_tests(copy, mutation.tests, ext_dir, env)
        finally:
            shutil.copy2(backup, target)  # content and mtime: the baseline build stays up to date
        verdict = "caught" if code == 1 else ("SURVIVED" if code == 0 else f"ERROR (exit {code})")
        caught += verdict == "caught"
        rows.append((mutation, verdict, tail, seconds))
        print(f"[{index + 1}/{len(mutations)}] {verdict}: {mutation.name} ({tail}) [{seconds:.0f} s]", flush=True)

    summary = f"{caught}/{len(mutations)} mutations caught"
    survivors = [m.name for m, verdict, _, _ in rows if verdict != "caught"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    lines = [f"# Mutation report {datetime.date.today():%Y-%m-%d} (commit {commit})", "",
             f"**{summary}**" + (f"; not caught: {', '.join(survivors)}" if survivors else ""), "",
             f"`python -m tools.mutate` (`make mutate`): each bug planted alone in a scratch copy, only the "
             f"listed tests run (`-x`, DEFINE_KERNELS_EXPECT=cpu_cpp,triton, hypothesis ci profile). "
             f"Baseline (unmutated copy, {len(all_tests)} test files) passed.", "",
             "| # | mutation | file | tests | result | last line | s |", "|---|---|---|---|---|---|---|"]
    for index, (mutation, verdict, tail, seconds) in enumerate(rows):
        lines.append(f"| {index + 1} | {mutation.name} | `{mutation.file}` | `{' '.join(mutation.tests)}` | "
                     f"{verdict} | {tail} | {seconds:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(summary + (f"; survivors: {survivors}" if survivors else ""), f"-> {args.out}")
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if not survivors else 1


if __name__ == "__main__":
    sys.exit(main())
