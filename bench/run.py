"""`python -m bench.run`: first the whole model, then DeFINE vs nn.Embedding per provider and mode.

Whole model first (bench/lm_head.py, part "step"; CPU): one LM training step, input layer + a
4-layer pre-LN causal Transformer + tied head + loss, DeFINE + the fused LM-head loss
(lm_head_loss; also its reference backend at small sizes) against nn.Embedding + the same body +
a tied nn.Linear + F.cross_entropy: time, peak memory and parameters (embedding / body / head),
by default on wt2-small at T = 4,096, bf16 autocast and fp32, 3 rounds (a few minutes on 2
cores); its CSV is <csv stem>_whole-model.csv, its plot <stem>_whole-model.png; --no-model skips it.

Then the input layer. With no flags: workload ptb-lstm, 700 Zipf(1.1) ids (20 x 35), every provider and mode,
fp32 on CPU
(bf16 on CUDA). Writes bench/results/<date>_<device>_<commit>.csv and PNG plots beside it and
prints a markdown table. Examples:

    python -m bench.run --workload wt103-base --tokens 8192 --corpus wikitext-2 --modes train
    python -m bench.run --workload custom:V=5000,n=64,k=256,m=128,N=2,g=4 --tokens 512,2048
    python -m bench.run --list          # providers and why any cannot run here
"""
from __future__ import annotations

import argparse
import gc
import itertools
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from . import metrics, providers, report, timing, workloads
from .workloads import comma_list, int_list, workload_list

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64}
MATMUL_SIZE = {"cuda": 8192, "cpu": 1536}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", type=workload_list, default=["ptb-lstm"],
                        help="comma list of docs/math.md §5 names or custom:V=..,n=..,k=..,m=..,N=..,g=..")
    parser.add_argument("--vocab", type=int_list, default=None,
                        help="comma list of vocabulary sizes replacing the workload's (sweeps)")
    parser.add_argument("--tokens", type=int_list, default=None,
                        help="comma list of ids per batch (default: the workload's tokens/batch)")
    parser.add_argument("--corpus", default=workloads.ZIPF,
                        choices=[workloads.ZIPF] + sorted(workloads.CORPORA),
                        help="token ids: seeded Zipf(1.1) sampler, or real text by frequency rank")
    parser.add_argument("--data-dir", default=None,
                        help=f"corpus directory (default ${workloads.ENV_DATA_DIR}, else ../shared/data)")
    parser.add_argument("--providers", type=comma_list, default=None,
                        help="comma list, or 'all' (default: all but define-compile on CPU, whose "
                             "inductor build takes minutes there)")
    parser.add_argument("--exclude", type=comma_list, default=[], help="providers to leave out")
    parser.add_argument("--modes", type=comma_list, default=list(metrics.MODES),
                        help=f"comma list of {metrics.MODES}")
    parser.add_argument("--dtypes", type=comma_list, default=None,
                        help="comma list (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5, help="timed samples per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile-mode", type=comma_list, default=None,
                        help="torch.compile modes to try in order (default: best first per device)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of define-compile (tests use aot_eager)")
    parser.add_argument("--slow-backends", action="store_true",
                        help="also run the Triton interpreter on CPU (TRITON_INTERPRET=1; minutes per call)")
    parser.add_argument("--out-dir", type=Path, default=report.RESULTS_DIR)
    parser.add_argument("--csv", type=Path, default=None, help="CSV path (default <out-dir>/<date>_<device>_<commit>.csv)")
    parser.add_argument("--tag", default="", help="suffix for the CSV name")
    parser.add_argument("--plots-dir", type=Path, default=None, help="PNG directory (default: beside the CSV)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-matmul", action="store_true", help="skip the dense matmul rate")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--list", action="store_true", help="list providers and exit")
    model = parser.add_argument_group("whole model (printed and plotted first; bench/lm_head.py)")
    model.add_argument("--no-model", action="store_true", help="skip the whole-model comparison")
    model.add_argument("--model-workload", default="wt2-small",
                       help="its workload: V, n, m and the DeFINE config (a name or custom:...)")
    model.add_argument("--model-tokens", type=int, default=4096, help="its tokens per step")
    model.add_argument("--model-dtypes", default="bfloat16,float32", help="its dtypes (bf16 = autocast)")
    model.add_argument("--model-rounds", type=int, default=3, help="its rounds (a process per case and round)")
    model.add_argument("--model-seq-len", type=int, default=512, help="its sequence length (B = T / L)")
    args = parser.parse_args(argv)
    for mode in args.modes:
        if mode not in metrics.MODES:
            parser.error(f"--modes: {mode!r} is not one of {metrics.MODES}")
    args.dtypes = args.dtypes or (["bfloat16"] if args.device.startswith("cuda") else ["float32"])
    for name in args.dtypes:
        if name not in DTYPES:
            parser.error(f"--dtypes: {name!r} is not one of {sorted(DTYPES)}")
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    try:
        args.workload = [workloads.parse_workload(name) for name in args.workload]
        every = [p.name for p in providers.all_providers()]
        if args.providers in (None, ["default"]):
            names = [p for p in every if not (p == "define-compile" and args.device == "cpu")]
        else:
            names = every if args.providers == ["all"] else args.providers
        names = [p for p in names if p not in args.exclude]
        args.providers = providers.select_providers(names)
    except ValueError as error:
        parser.error(str(error))
    return args


def matmul_rate(device: torch.device, dtype: torch.dtype, reps: int) -> tuple:
    """TFLOP/s of one square dense matmul in `dtype`, the machine's yardstick for this run."""
    size = MATMUL_SIZE.get(device.type, 1536)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    measured = timing.time_step(lambda: torch.mm(a, b), device, warmup=2, reps=reps)
    return 2 * size ** 3 / measured.median / 1e12, f"{size}x{size}x{size}"


def measure_provider(provider, spec, batches, args, base) -> List[dict]:
    """Every mode of one provider over every batch; rows without the cross-provider ratios."""
    rows = []

    def row(tokens, unique, mode, metric, unit, value, p20=None, p80=None, note=""):
        rows.append(dict(base, provider=provider.name, mode=mode, tokens=tokens, unique_ids=unique,
                         metric=metric, unit=unit, value=value, p20=p20, p80=p80, note=note))

    reason = provider.unavailable(spec)
    prepared = None
    if reason is None:
        try:
            prepared = provider.setup(spec)
        except providers.ProviderUnavailable as error:
            reason = str(error)
        except Exception as error:  # a broken provider must not end the sweep
            row("", "", "", "error", "", None, note=f"setup: {type(error).__name__}: {error}")
            return rows
    if reason is not None:
        row("", "", "", "unavailable", "", None, note=reason)
        return rows
    for (tokens, ids, grad_out, unique), mode in itertools.product(batches, args.modes):
        if mode not in prepared.modes:
            continue
        try:
            step = prepared.step(mode, ids, grad_out)
            prepared.reset()
            measured = timing.time_step(step, spec.device, args.warmup, args.reps)
            peak = timing.peak_memory(step, spec.device, lambda: prepared.live_tensors(mode))
        except Exception as error:
            row(tokens, unique, mode, "error", "", None, note=f"{type(error).__name__}: {error}")
            continue
        cost = prepared.cost(spec, tokens, unique)
        flops, nbytes = metrics.flop_count(cost, mode), metrics.byte_count(cost, mode)
        row(tokens, unique, mode, "time", "ms", measured.median * 1e3, measured.p20 * 1e3,
            measured.p80 * 1e3, note=prepared.note)
        row(tokens, unique, mode, "tokens_per_s", "tokens/s", tokens / measured.median,
            tokens / measured.p80, tokens / measured.p20)
        row(tokens, unique, mode, "params", "count", prepared.parameters)
        row(tokens, unique, mode, "peak_memory", "MB", peak / 2**20,
            note="max_memory_allocated" if spec.device.type == "cuda" else "live tensors + RSS high-water delta")
        row(tokens, unique, mode, "tflops", "TFLOP/s", flops / measured.median / 1e12)
        row(tokens, unique, mode, "gbps", "GB/s", nbytes / measured.median / 1e9)
    del prepared
    gc.collect()
    if spec.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def add_ratios(rows: List[dict], matmul_tflops: dict) -> List[dict]:
    """time_vs_embedding, time_vs_eager and matmul_share rows, from times of the same run."""
    times = {}
    for row in rows:
        if row["metric"] == "time":
            times[(row["workload"], row["dtype"], row["tokens"], row["mode"], row["provider"])] = row
    extra = []
    for (workload, dtype, tokens, mode, provider), row in times.items():
        for baseline, metric in ((providers.EMBEDDING, "time_vs_embedding"), (providers.EAGER, "time_vs_eager")):
            base = times.get((workload, dtype, tokens, mode, baseline))
            if base is not None:
                extra.append(dict(row, metric=metric, unit="x", value=row["value"] / base["value"],
                                  p20=None, p80=None, note=f"median time / {baseline}'s"))
    for row in rows:
        if row["metric"] == "tflops" and row["provider"] != report.MATMUL_PROVIDER \
                and matmul_tflops.get(row["dtype"]):
            extra.append(dict(row, metric="matmul_share", unit="%",
                              value=100 * row["value"] / matmul_tflops[row["dtype"]],
                              note="of the dense matmul rate, same run"))
    return rows + extra


def run(args: argparse.Namespace) -> tuple:
    device = torch.device(args.device)
    meta = report.metadata(device)
    rows, matmul_tflops = [], {}
    plan = [(w, v, d) for w in args.workload for v in (args.vocab or [w.vocab_size]) for d in args.dtypes]
    progress = _progress(len(plan) * len(args.providers), args.no_progress)
    for workload, vocab, dtype_name in plan:
        workload = workloads.with_vocab(workload, vocab)
        dtype = DTYPES[dtype_name]
        spec = providers.Spec(workload, device, dtype, args.compile_backend, args.compile_mode,
                              args.slow_backends)
        batches = []
        for tokens in args.tokens or [workload.tokens_per_batch]:
            ids = workloads.batch_ids(workload, tokens, args.corpus, args.data_dir, args.seed).to(device)
            grad_out = torch.randn(tokens, workload.embedding_dim, generator=torch.Generator().manual_seed(args.seed),
                                   dtype=torch.float32).to(device, dtype)
            batches.append((tokens, ids, grad_out, int(torch.unique(ids).numel())))
        base = dict(meta, workload=workload.name, dtype=dtype_name, vocab_size=workload.vocab_size,
                    corpus=args.corpus)
        for provider in args.providers:
            if progress is not None:
                progress.set_description(f"{workload.name} {dtype_name} {provider.name}")
            torch.manual_seed(args.seed)
            rows += measure_provider(provider, spec, batches, args, base)
            if progress is not None:
                progress.update()
    if progress is not None:
        progress.close()
    if not args.no_matmul:
        for dtype_name in args.dtypes:
            tflops, shape = matmul_rate(device, DTYPES[dtype_name], args.reps)
            matmul_tflops[dtype_name] = tflops
            rows.append(dict(meta, workload="", provider=report.MATMUL_PROVIDER, mode="matmul",
                             dtype=dtype_name, tokens="", metric="tflops", unit="TFLOP/s",
                             value=tflops, note=shape, corpus="", vocab_size="", unique_ids=""))
    rows = add_ratios(rows, matmul_tflops)
    return rows, meta


def _progress(total: int, disabled: bool):
    if disabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="provider", file=sys.stderr, dynamic_ncols=True)


def list_providers(args) -> str:
    device = torch.device(args.device)
    spec = providers.Spec(args.workload[0], device, DTYPES[args.dtypes[0]], args.compile_backend,
                          args.compile_mode, args.slow_backends)
    lines = [f"providers for {spec.workload.name} on {device} {args.dtypes[0]}:"]
    for provider in args.providers:
        reason = provider.unavailable(spec)
        lines.append(f"  {provider.name:24s} {'usable' if reason is None else 'unavailable: ' + reason}"
                     f"  -- {provider.description}")
    return "\n".join(lines)


def whole_model(args: argparse.Namespace, csv_path: Path) -> Optional[Path]:
    """The whole-model comparison (bench/lm_head.py, part "step"): table, CSV and plot."""
    from . import lm_head, lm_head_report
    if args.device != "cpu":
        print(f"## Whole model: skipped on {args.device} (bench/lm_head.py measures on the CPU for now)\n")
        return None
    started = time.perf_counter()
    options = lm_head.parse_args(
        ["--parts", "step", "--workload", args.model_workload, "--tokens", str(args.model_tokens),
         "--dtypes", args.model_dtypes, "--rounds", str(args.model_rounds), "--seq-len", str(args.model_seq_len),
         "--seed", str(args.seed), "--csv", str(csv_path)] + (["--quiet"] if args.no_progress else []))
    results, goals, rows, path = lm_head.run(options)
    print("## Whole model: one LM training step, input layer + body + tied head + loss\n")
    print(lm_head_report.markdown(results, goals).lstrip("\n"))
    print(f"\nCSV: {path}  ({time.perf_counter() - started:.0f}s)")
    if not args.no_plots:
        from .lm_head_plot import plot
        png = Path(args.plots_dir or path.parent) / f"{path.stem}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        print(f"plot: {plot(rows, png)}")
    print("\n## Input layer: DeFINE vs nn.Embedding\n")
    return path


def main(argv: Optional[List[str]] = None) -> Path:
    args = parse_args(argv)
    if args.list:
        print(list_providers(args))
        return None
    if not args.no_model:
        meta = report.metadata(torch.device(args.device))
        stem = args.csv or report.results_path(meta, args.out_dir, args.tag)
        whole_model(args, Path(stem).with_name(Path(stem).stem + "_whole-model.csv"))
    started = time.perf_counter()
    rows, meta = run(args)
    path = report.write_csv(rows, args.csv or report.results_path(meta, args.out_dir, args.tag))
    print(report.markdown(rows))
    print(f"\nCSV: {path}  ({time.perf_counter() - started:.0f}s, device {meta['device']}, "
          f"commit {meta['commit']})")
    if not args.no_plots:
        from . import plot
        for png in plot.plot_all(rows, args.plots_dir or path.parent, prefix=path.stem):
            print(f"plot: {png}")
    return path


if __name__ == "__main__":
    main()
