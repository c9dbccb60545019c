"""`make gpu-check` (= `python -m bench.gpu_check`): the GPU check that fits one 10-minute slot.

Stages, each a subprocess with its own time budget (seconds, scaled down to what is left of the
total), and a summary printed and written even when a stage fails or times out:
  a. info + build     define_kernels.info, then the C++/CUDA extension (JIT with ninja, else
                      setup.py build_ext --inplace), which must register CUDA kernels;
  b. correctness      bench.gpu_correctness: triton and cuda vs the float64 reference,
                      bf16/fp16/fp32, 3 configs (one with odd widths), forward, every gradient,
                      dropout off and on;
  c. memcheck         compute-sanitizer memcheck on one small case per backend;
  d. benchmark        bench.run: wt103-base/wide/deep, 16,384 real-text ids (WikiText-2, else
                      Zipf), bf16: nn.Embedding dense/sparse, eager reference, one compile mode,
                      triton, cuda; forward / forward+backward / train / inference; dense bf16
                      matmul rate; peak (activation) memory;
  e. lm-head          bench.gpu_lm_head: the LM-head loss's triton backend vs reference.py in
                      float64 (fp32, bf16; CE with bias and padding, smoothing, z-loss, augmented,
                      many small chunks), then wt103-base's output layer (V = 267,735, n = 128,
                      T = 4,096 and 8,192, bf16) timed and its peak memory taken against unfused
                      F.linear + F.cross_entropy and torch's chunked F.linear_cross_entropy.
Needs only torch (CUDA) and triton; pytest, ninja, matplotlib are used when present.
Results: <out>/gpucheck_<date>_<commit>_{summary.md,summary.json,<stage>.log,bench.csv,...};
<out> = --out, else $DEFINE_RESULTS_DIR, else bench/results/.

  python -m bench.gpu_check                 # on the GPU machine (about 6-8 minutes)
  python -m bench.gpu_check --dry-run       # CPU: every stage's plumbing at tiny sizes (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, NamedTuple, Optional

REPO = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 480  # 8 minutes: a 15-minute slot minus start-up and transfers
# lm-head's 60 s (two Python starts, ~20 Triton compiles, 24 timed steps) came out of the other
# stages; an estimate, not yet a measured split: the summary's per-stage seconds will tell
BUDGETS = {"info+build": 110, "correctness": 95, "memcheck": 75, "benchmark": 140, "lm-head": 60}
WORKLOADS = "wt103-base,wt103-wide,wt103-deep"
PROVIDERS = "embedding,embedding-sparse,define-torch,define-compile,define-triton,define-cuda"
TINY = "custom:V=997,n=32,k=128,m=64,N=2,g=4"


class Stage(NamedTuple):
    name: str
    commands: List[List[str]]   # run in order; the stage fails at the first non-zero exit
    env: dict
    skip_reason: Optional[str] = None


def find_sanitizer() -> Optional[str]:
    candidates = [shutil.which("compute-sanitizer")]
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            candidates.append(str(Path(root) / "bin" / "compute-sanitizer"))
    try:
        from define_kernels.backends import cuda_toolkit
        if cuda_toolkit.find_toolkit().root:
            candidates.append(str(Path(cuda_toolkit.find_toolkit().root) / "bin" / "compute-sanitizer"))
    except Exception:  # noqa: BLE001 - discovery is best effort here
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def corpus() -> str:
    try:
        from bench import workloads
        workloads.find_data_dir()
        return "wikitext-2"
    except Exception:  # noqa: BLE001 - no data directory: synthetic ids, said in the summary
        return "zipf"


def build_commands(py: str, dry_run: bool) -> List[List[str]]:
    info = [py, "-m", "define_kernels.info"]
    if shutil.which("ninja") or dry_run:
        return [info, [py, "-m", "define_kernels.build"] + ([] if dry_run else ["--require-cuda"])]
    # torch's JIT needs ninja; setuptools compiles without it (define_kernels._C, loaded next)
    return [info, [py, "setup.py", "-q", "build_ext", "--inplace"],
            [py, "-m", "define_kernels.build", "--require-cuda"]]


def lm_head_commands(py: str, prefix: Path, dry_run: bool) -> List[List[str]]:
    """Correctness and timing as two runs: a timeout in the timing keeps the correctness verdict."""
    return [[py, "-m", "bench.gpu_lm_head", "--parts", part, "--json", f"{prefix}_lm_head_{part}.json"]
            + (["--csv", f"{prefix}_lm_head.csv"] if part == "timing" else [])
            + (["--dry-run"] if dry_run else []) for part in ("correctness", "timing")]


def stages(py: str, prefix: Path, dry_run: bool) -> List[Stage]:
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "PYTHONUNBUFFERED": "1",
           "DEFINE_KERNELS_BUILD_EXT": "1", "MAX_JOBS": str(os.cpu_count() or 4)}
    if dry_run:
        correctness = [[py, "-m", "bench.gpu_correctness", "--device", "cpu", "--backends", "cpu_cpp",
                        "--dtypes", "float32", "--json", f"{prefix}_correctness.json"]]
        small = [py, "-m", "bench.gpu_correctness", "--device", "cpu", "--backends", "cpu_cpp", "--small"]
        memcheck = [small]  # the plumbing only: no compute-sanitizer on CPU
        bench = [[py, "-m", "bench.run", "--device", "cpu", "--dtypes", "float32", "--reps", "1", "--warmup", "1",
                  "--workload", TINY, "--tokens", "256", "--providers", "embedding,embedding-sparse,define-torch",
                  "--corpus", corpus(), "--no-plots", "--no-progress", "--no-model", "--csv", f"{prefix}_bench.csv"]]
        sanitizer_skip = None
        lm_head_env = {**env, "TRITON_INTERPRET": "1"}  # CPU tensors: Triton's interpreter
    else:
        correctness = [[py, "-m", "bench.gpu_correctness", "--json", f"{prefix}_correctness.json"]]
        sanitizer = find_sanitizer()
        memcheck = [[sanitizer, "--tool", "memcheck", "--error-exitcode", "1", "--target-processes", "all",
                     py, "-m", "bench.gpu_correctness", "--small", "--backends", backend]
                    for backend in ("cuda", "triton")] if sanitizer else []
        sanitizer_skip = None if sanitizer else "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"
        # one run per workload, each writing its CSV: a timeout loses only the workload it cut; the
        # whole-model comparison (CPU-only, minutes) is left out: the lm-head stage times the head
        bench = [[py, "-m", "bench.run", "--device", "cuda", "--dtypes", "bfloat16", "--reps", "10",
                  "--warmup", "2", "--workload", workload, "--tokens", "16384", "--corpus", corpus(),
                  "--providers", PROVIDERS, "--compile-mode", "default", "--no-progress", "--no-plots", "--no-model",
                  "--csv", f"{prefix}_bench_{workload}.csv"] for workload in WORKLOADS.split(",")]
        lm_head_env = env
    return [
        Stage("info+build", build_commands(py, dry_run), env),
        Stage("correctness", correctness, env),
        # the caching allocator hides out-of-bounds accesses inside its blocks: turn it off
        Stage("memcheck", memcheck, {**env, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, sanitizer_skip),
        Stage("benchmark", bench, env),
        Stage("lm-head", lm_head_commands(py, prefix, dry_run), lm_head_env),
    ]


def run_stage(stage: Stage, budget: float, log: Path) -> dict:
    started = time.monotonic()
    if stage.skip_reason:
        return dict(stage=stage.name, status="not run", detail=stage.skip_reason, seconds=0.0, log=None)
    status, detail = "ok", ""
    with open(log, "w") as handle:
        for command in stage.commands:
            left = budget - (time.monotonic() - started)
            if left <= 1:
                status, detail = "timeout", f"budget {budget:.0f} s spent before: {' '.join(command[:4])}"
                break
            handle.write(f"$ {' '.join(command)}\n")
            handle.flush()
            print(f"--- {stage.name}: {' '.join(command)}", flush=True)
            process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **stage.env}, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                output, _ = process.communicate(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)  # the whole process group: sanitizer, python, compilers
                output, _ = process.communicate()
                status, detail = "timeout", f"killed after its {budget:.0f} s budget: {' '.join(command[:4])}"
            handle.write(output or "")
            sys.stdout.write(_tail(output or "", 25))
            if status == "timeout":
                break
            if process.returncode != 0:
                status = "failed"
                detail = f"exit {process.returncode}: {' '.join(command[:4])}; {_last_line(output or '')}"
                break
    return dict(stage=stage.name, status=status, detail=detail, seconds=round(time.monotonic() - started, 1),
                log=str(log))


def _tail(text: str, lines: int) -> str:
    kept = text.splitlines()[-lines:]
    return "\n".join(kept) + ("\n" if kept else "")


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU: each stage's plumbing at tiny size")
    parser.add_argument("--out", default=os.environ.get("DEFINE_RESULTS_DIR"), help="results directory")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="total seconds (default 480)")
    parser.add_argument("--stages", default=",".join(BUDGETS), help="comma list of stages to run")
    args = parser.parse_args(argv)
    py = sys.executable
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); use --dry-run on a CPU machine")
        return 2
    out = Path(args.out) if args.out else REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    from bench import report
    stamp = time.strftime("%Y-%m-%d-%H%M%S")
    prefix = out / f"gpucheck_{stamp}_{'cpu-dry-run' if args.dry_run else 'cuda'}_{report.commit_id()}"
    wanted = [s for s in args.stages.split(",") if s]
    unknown = set(wanted) - set(BUDGETS)
    if unknown:
        parser.error(f"--stages: unknown {sorted(unknown)} (known: {list(BUDGETS)})")
    started = time.monotonic()
    results = []
    scale = min(1.0, args.budget / TOTAL_BUDGET_S)
    for stage in stages(py, prefix, args.dry_run):
        if stage.name not in wanted:
            continue
        left = args.budget - (time.monotonic() - started)
        budget = min(BUDGETS[stage.name] * scale, left)
        print(f"\n=== gpu_check: {stage.name} (budget {budget:.0f} s, {left:.0f} s left in total)", flush=True)
        if budget < 5:
            results.append(dict(stage=stage.name, status="not run", detail="total budget spent", seconds=0.0, log=None))
            continue
        results.append(run_stage(stage, budget, Path(f"{prefix}_{stage.name.replace('+', '_')}.log")))
    total = round(time.monotonic() - started, 1)
    lines = [f"# gpu_check {prefix.name}", "", f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, total {total} s "
             f"of {args.budget:.0f} s", "", "| stage | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['detail'] or ''} |" for r in results]
    summary = "\n".join(lines) + "\n"
    Path(f"{prefix}_summary.md").write_text(summary)
    Path(f"{prefix}_summary.json").write_text(json.dumps(dict(total_s=total, stages=results), indent=1))
    print("\n=== gpu_check summary\n" + summary + f"(written to {prefix}_summary.md)")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
