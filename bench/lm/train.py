"""Train word-level LMs whose input/output layers are swapped among the variants of
`bench.lm.variants`, and report perplexity against parameters.

    python -m bench.lm.train --quick                      # every variant, a few hundred CPU steps
    python -m bench.lm.train --preset transformer --dataset wt2 --variants tied_unfused,define
    torchrun --nproc_per_node 2 -m bench.lm.train --quick # DistributedDataParallel (gloo / nccl)

Presets: `quick` and `full` are the LSTM recipe (Adam, learning rate decayed on a plateau, epochs
or steps); `transformer` is the pre-LN causal Transformer of the seeded suite (bench/lm/suite.py):
AdamW, warm-up + cosine schedule over a fixed token budget (--train-budget), bf16 autocast, the
fused LM head for tied variants. Each variant is seeded (same init for every rank), trained on
windows of --bptt tokens, evaluated on validation (its first --val-tokens, or all) every
--eval-interval steps (or --evals times per run); early stop after --patience evaluations
without improvement; scored with its best weights on the full validation and test splits. A
checkpoint per variant (the run's settings hashed into its folder) is written at each
evaluation; --resume continues from it and skips finished variants. Results go to
bench/results/lm_<date>_<device>_<commit>.csv and .png (see report.py); --curve-out adds the
validation curve (step, tokens, seconds, val ppl) of each variant.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .data import batchify, bptt_chunks, load_corpus
from .memory import PeakRSS
from .model import LanguageModel, LSTMContext, TransformerContext, detach_state
from .report import (CURVE_COLUMNS, append_rows, commit_id, device_name, plot, read_rows, results_path,
                     write_rows)
from .schedule import SCHEDULES, cosine_lr
from .variants import VARIANTS, LayerSizes, build_layers, parameter_split

# --quick: CPU minutes for all variants; full: a GPU run near the ptb-lstm workload (docs/math.md §5);
# transformer: the seeded suite's model (bench/lm/suite.py; one run <= ~10 min on 2 quiet cores).
_LSTM = dict(optimizer="adam", schedule="plateau", warmup=0, weight_decay=0.0, amp="none", clip=0.25,
             patience=3, train_budget=None, evals=None, val_tokens=None)
QUICK = dict(layers=1, emb_dim=128, hidden=128, heads=4, dropout=0.2, batch_size=20, bptt=35,
             lr=3e-3, steps=200, epochs=None, eval_interval=100, eval_tokens=10_000,
             train_tokens=None, map_dim=64, expand_dim=256, depth=3, max_groups=4, slim_pool=1024, **_LSTM)
FULL = dict(layers=2, emb_dim=400, hidden=400, heads=8, dropout=0.4, batch_size=20, bptt=35,
            lr=1e-3, steps=None, epochs=40, eval_interval=None, eval_tokens=None,
            train_tokens=None, map_dim=128, expand_dim=1024, depth=3, max_groups=4, slim_pool=2048, **_LSTM)
TRANSFORMER = dict(layers=4, emb_dim=256, hidden=256, heads=4, dropout=0.1, batch_size=8, bptt=128,
                   lr=2e-3, steps=None, epochs=None, eval_interval=None, eval_tokens=None,
                   train_tokens=None, map_dim=64, expand_dim=512, depth=3, max_groups=4, slim_pool=2048,
                   optimizer="adamw", schedule="cosine", warmup=50, weight_decay=0.01, amp="bf16",
                   clip=1.0, patience=3, train_budget=500_000, evals=8, val_tokens=20_000)
PRESETS = {"quick": QUICK, "full": FULL, "transformer": TRANSFORMER}
_TYPES = dict(layers=int, emb_dim=int, hidden=int, heads=int, dropout=float, batch_size=int, bptt=int, lr=float,
              steps=int, epochs=int, eval_interval=int, eval_tokens=int, train_tokens=int, map_dim=int,
              expand_dim=int, depth=int, max_groups=int, slim_pool=int, optimizer=str, schedule=str, warmup=int,
              weight_decay=float, amp=str, clip=float, patience=int, train_budget=int, evals=int, val_tokens=int)
_HELP = dict(clip="gradient-norm clip", patience="evaluations without improvement before stopping",
             train_budget="training tokens per variant (sets the steps)", evals="evaluations per run "
             "(sets --eval-interval)", val_tokens="validation tokens of the periodic evaluations (the "
             "final score uses all)", amp="bf16 (torch.autocast) or none", optimizer="adam or adamw",
             schedule=f"one of {SCHEDULES}", warmup="warm-up steps of the cosine schedule")
# Settings that do not change what a variant computes: left out of the checkpoint key.
NOT_IN_KEY = ("resume", "tag", "threads", "no_progress", "out", "checkpoint_dir", "variants", "ddp_dump", "no_plot",
              "max_minutes", "data_dir", "curve_out", "target_ppl")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.lm.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model, few steps, eval slices (CPU): --preset quick")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="defaults of every setting below (default: quick with --quick, else full)")
    p.add_argument("--dataset", default="ptb", help="ptb, wt2, or a folder with train/valid/test.txt")
    p.add_argument("--data-dir", help="folder holding ptb/ and wikitext-2/ (default $DEFINE_KERNELS_DATA "
                                      "or ../shared/data)")
    p.add_argument("--model", default="lstm", choices=("lstm", "transformer"))
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    for name, kind in _TYPES.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"{_HELP.get(name, '')}; default {QUICK[name]} (quick), {FULL[name]} (full), "
                            f"{TRANSFORMER[name]} (transformer)".lstrip("; "))
    p.add_argument("--eval-batch-size", type=int, default=10)
    p.add_argument("--lr-decay", type=float, default=0.5, help="plateau schedule: lr factor after a worse validation")
    p.add_argument("--head", choices=("auto", "unfused"), default="auto",
                   help="auto: each variant's head (fused for tied variants); unfused: F.linear + "
                        "F.cross_entropy (materialised logits) for every variant that has logits")
    p.add_argument("--max-minutes", type=float, default=None, help="training-time cap per variant")
    p.add_argument("--slim-subvectors", type=int, default=4)
    p.add_argument("--al-tau", type=float, default=10.0)
    p.add_argument("--al-alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest for small models on a busy machine)")
    p.add_argument("--checkpoint-dir", default=os.path.join(tempfile.gettempdir(), "define_kernels_lm"))
    p.add_argument("--resume", action="store_true", help="continue from checkpoints, skip finished variants")
    p.add_argument("--out", default=None, help="CSV path (default bench/results/lm_<date>_<device>_<commit>.csv)")
    p.add_argument("--tag", default=None, help="the CSV's mode column (default quick / full)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--curve-out", default=None, help="CSV of every evaluation (variant, step, tokens, seconds, "
                                                     "val ppl); rewritten at each evaluation")
    p.add_argument("--target-ppl", type=float, default=None,
                   help="report the training seconds until validation perplexity first reaches this")
    p.add_argument("--ddp-dump", default=None, help="folder: each rank saves its final parameters and losses")
    args = p.parse_args(argv)
    defaults = PRESETS[args.preset or ("quick" if args.quick else "full")]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {VARIANTS}")
    if args.schedule not in SCHEDULES or args.optimizer not in ("adam", "adamw") or args.amp not in ("bf16", "none"):
        p.error(f"--schedule one of {SCHEDULES}, --optimizer adam|adamw, --amp bf16|none; got "
                f"{args.schedule}, {args.optimizer}, {args.amp}")
    return args


@dataclasses.dataclass
class Cluster:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_cluster(device_arg) -> Cluster:
    """One process, or one rank of a torchrun job (gloo on CPU, nccl on GPU)."""
    use_cuda = device_arg == "cuda" or (device_arg is None and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Cluster(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Cluster(dist.get_rank(), world, torch.device(f"cuda:{local}" if use_cuda else "cpu"))


def layer_sizes(args, vocab: int) -> LayerSizes:
    return LayerSizes(vocab=vocab, emb_dim=args.emb_dim, hidden_dim=args.hidden, map_dim=args.map_dim,
                      expand_dim=args.expand_dim, depth=args.depth, max_groups=args.max_groups,
                      slim_subvectors=args.slim_subvectors, slim_pool=args.slim_pool,
                      al_tau=args.al_tau, al_alpha=args.al_alpha, seed=args.seed)


def make_context(args, sizes: LayerSizes):
    if args.model == "lstm":
        return LSTMContext(sizes.emb_dim, sizes.hidden_dim, args.layers, args.dropout)
    if sizes.emb_dim != sizes.hidden_dim:
        raise ValueError(f"--emb-dim ({sizes.emb_dim}) must equal --hidden ({sizes.hidden_dim}) "
                         "for the transformer")
    return TransformerContext(sizes.hidden_dim, args.layers, args.heads, args.dropout)


def run_key(args, world: int) -> str:
    settings = {k: v for k, v in vars(args).items() if k not in NOT_IN_KEY}
    settings["world"] = world
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


@torch.no_grad()
def evaluate(model: LanguageModel, source: torch.Tensor, bptt: int) -> float:
    model.eval()
    total, count, state = 0.0, 0, None
    for _, inputs, targets in bptt_chunks(source, bptt):
        _, cross_entropy, state = model(inputs, targets, state)
        total, count = total + float(cross_entropy), count + targets.numel()
    return math.exp(total / count)


def _agree(flag: bool, cluster: Cluster) -> bool:
    """True on every rank when it is true on any (stop decisions must not diverge)."""
    if cluster.world == 1:
        return flag
    value = torch.tensor([float(flag)], device=cluster.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.lr)
    # AdamW: decay matrices only (not biases, norms, or 1-D tables)
    params = list({id(p): p for p in model.parameters()}.values())
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay),
                              dict(params=rest, weight_decay=0.0)], lr=args.lr)


def build_model(variant: str, args, vocab: int):
    """(model, parameter split) of `variant` with this run's settings, seeded by --seed."""
    torch.manual_seed(args.seed)  # same initial weights on every rank and every run
    sizes = layer_sizes(args, vocab)
    layers = build_layers(variant, sizes)
    context = make_context(args, sizes)
    head = "logits" if args.head == "unfused" and layers.head == "fused" else layers.head
    amp = torch.bfloat16 if args.amp == "bf16" else None
    model = LanguageModel(layers.encoder, context, layers.decoder, args.dropout, layers.loss, head, amp)
    return model, parameter_split(layers, context)


def seconds_to_target(curve: list, target) -> tuple:
    """(training seconds, tokens) when validation perplexity first reached `target`: linear in
    log perplexity between the evaluation before and the first at or below it (the first
    evaluation's own figures when that one already is); ("", "") if never reached."""
    previous = None
    for point in curve:
        if target is not None and point["val_ppl"] <= target:
            if previous is None or previous["val_ppl"] <= point["val_ppl"]:
                return point["train_seconds"], point["tokens"]
            share = ((math.log(previous["val_ppl"]) - math.log(target))
                     / (math.log(previous["val_ppl"]) - math.log(point["val_ppl"])))
            return tuple(round(previous[k] + share * (point[k] - previous[k]), 2) for k in ("train_seconds", "tokens"))
        previous = point
    return "", ""


def train_variant(variant: str, args, corpus, cluster: Cluster, key: str) -> dict:
    checkpoint = Path(args.checkpoint_dir) / key / f"{variant}.pt"
    saved = torch.load(checkpoint, weights_only=False) if args.resume and checkpoint.exists() else None
    if saved is not None and saved.get("row"):
        return saved["row"]

    model, split = build_model(variant, args, len(corpus.vocab))
    model = model.to(cluster.device)
    optimizer = _optimizer(model, args)
    runner = DistributedDataParallel(model) if cluster.world > 1 else model
    torch.manual_seed(args.seed + 1 + cluster.rank)  # per-rank dropout

    if args.batch_size % cluster.world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the world size {cluster.world}")
    train = batchify(corpus.train, args.batch_size)[:, cluster.rank::cluster.world].to(cluster.device)
    valid = batchify(corpus.valid, args.eval_batch_size).to(cluster.device)
    valid_slice = valid if not args.val_tokens else batchify(corpus.valid[:args.val_tokens],
                                                             args.eval_batch_size).to(cluster.device)
    test = batchify(corpus.test, args.eval_batch_size).to(cluster.device)
    steps_per_epoch = math.ceil((train.shape[0] - 1) / args.bptt)
    tokens_per_step = args.bptt * args.batch_size
    if args.steps:
        max_steps = args.steps
    elif args.train_budget:
        max_steps = math.ceil(args.train_budget / tokens_per_step)
    else:
        max_steps = args.epochs * steps_per_epoch
    eval_interval = args.eval_interval or (max(1, max_steps // args.evals) if args.evals else steps_per_epoch)

    progress = dict(step=0, position=0, best_val=math.inf, best_step=0, bad=0, lr=args.lr,
                    seconds=0.0, train_seconds=0.0, losses=[], curve=[], stop="budget")
    best_state = None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        progress, best_state = saved["progress"], saved["best_state"]
        torch.set_rng_state(saved["rng"])

    bar = tqdm(total=max_steps, initial=progress["step"], desc=f"{variant:>12}", leave=True,
               disable=not cluster.main or args.no_progress, dynamic_ncols=True)
    state, started = None, time.perf_counter() - progress["seconds"]
    model.train()
    with PeakRSS() as memory:
        while progress["step"] < max_steps:
            step_started = time.perf_counter()
            if progress["position"] >= train.shape[0] - 1:  # next epoch
                progress["position"], state = 0, None
            if args.schedule == "cosine":
                progress["lr"] = cosine_lr(progress["step"], max_steps, args.lr, args.warmup)
                for group in optimizer.param_groups:
                    group["lr"] = progress["lr"]
            position = progress["position"]
            length = min(args.bptt, train.shape[0] - 1 - position)
            inputs, targets = train[position:position + length], train[position + 1:position + 1 + length]
            objective, cross_entropy, state = runner(inputs, targets, state)
            state = detach_state(state)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            progress["position"] += length
            progress["step"] += 1
            progress["losses"].append(float(cross_entropy) / targets.numel())
            progress["train_seconds"] += time.perf_counter() - step_started
            bar.update(1)
            if progress["step"] % 10 == 0:
                bar.set_postfix(loss=f"{progress['losses'][-1]:.3f}", best_val=f"{progress['best_val']:.1f}")

            if progress["step"] % eval_interval == 0 or progress["step"] == max_steps:
                progress["seconds"] = time.perf_counter() - started
                val = evaluate(model, valid_slice, args.bptt)
                model.train()
                recent = progress["losses"][-eval_interval:]
                progress["curve"].append(dict(
                    variant=variant, seed=args.seed, step=progress["step"],
                    tokens=progress["step"] * tokens_per_step, train_seconds=round(progress["train_seconds"], 2),
                    wall_seconds=round(progress["seconds"], 2), lr=progress["lr"],
                    train_ppl=round(math.exp(sum(recent) / len(recent)), 2), val_ppl=round(val, 2)))
                if val < progress["best_val"]:
                    progress.update(best_val=val, best_step=progress["step"], bad=0)
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    progress["bad"] += 1
                    if args.schedule == "plateau":
                        progress["lr"] *= args.lr_decay
                        for group in optimizer.param_groups:
                            group["lr"] = progress["lr"]
                out_of_time = args.max_minutes is not None and progress["seconds"] > 60 * args.max_minutes
                early = progress["bad"] >= args.patience
                stop = _agree(early or out_of_time, cluster)
                if stop:
                    progress["stop"] = "early_stop" if early else "max_minutes"
                if cluster.main:
                    _save(checkpoint, model, optimizer, progress, best_state)
                    if args.curve_out:
                        _write_curve(Path(args.curve_out), variant, args.seed, progress["curve"])
                bar.set_postfix(loss=f"{progress['losses'][-1]:.3f}", val_ppl=f"{val:.1f}")
                if stop:
                    break
    bar.close()
    progress["seconds"] = time.perf_counter() - started

    if args.ddp_dump:
        dump = Path(args.ddp_dump)
        dump.mkdir(parents=True, exist_ok=True)
        flat = torch.nn.utils.parameters_to_vector([p.detach().cpu() for p in model.parameters()])
        torch.save({"params": flat, "losses": progress["losses"]}, dump / f"{variant}_rank{cluster.rank}.pt")

    if best_state is not None:
        model.load_state_dict(best_state)
    train_tokens = progress["step"] * tokens_per_step
    epochs = train_tokens / (steps_per_epoch * tokens_per_step)
    target_seconds, target_tokens = seconds_to_target(progress["curve"], args.target_ppl)
    row = dict(variant=variant, steps=progress["step"], best_step=progress["best_step"],
               train_tokens=train_tokens, train_seconds=round(progress["train_seconds"], 1),
               wall_seconds=round(progress["seconds"], 1),
               tokens_per_s=round(train_tokens / max(progress["train_seconds"], 1e-9), 1),
               epochs=round(epochs, 3), seconds_per_epoch=round(progress["train_seconds"] / max(epochs, 1e-9), 1),
               peak_rss_mb=round(memory.peak_mb, 1), load_avg=_load_average(), head=model.head, amp=args.amp, stop_reason=progress["stop"],
               target_ppl=args.target_ppl if args.target_ppl is not None else "",
               seconds_to_target=target_seconds, tokens_to_target=target_tokens,
               val_ppl=round(evaluate(model, valid, args.bptt), 2),
               test_ppl=round(evaluate(model, test, args.bptt), 2),
               **{f"params_{group}": count for group, count in split.items()})
    if cluster.main:
        _save(checkpoint, model, optimizer, progress, best_state, row)
    return row


def _load_average() -> str:
    """The machine's 1-minute load average when training ended: timings from a loaded machine
    (load above its core count) are not the machine's speed."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (OSError, AttributeError):
        return ""


def _write_curve(path: Path, variant: str, seed: int, curve: list) -> None:
    """Rewrite `path` with this (variant, seed)'s evaluations, keeping other variants' rows."""
    others = [row for row in (read_rows(path) if path.exists() else [])
              if (row["variant"], row["seed"]) != (variant, str(seed))]
    write_rows(path, others + curve, CURVE_COLUMNS)


def _save(path: Path, model, optimizer, progress, best_state, row=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), progress=progress,
                    best_state=best_state, rng=torch.get_rng_state(), row=row), temporary)
    os.replace(temporary, path)  # a crash mid-write never leaves a broken checkpoint


def main(argv=None) -> list:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cluster = init_cluster(args.device)
    try:
        corpus = load_corpus(args.dataset, args.data_dir, train_tokens=args.train_tokens,
                             eval_tokens=args.eval_tokens)
        key = run_key(args, cluster.world)
        if cluster.main:
            print(f"{corpus.name}: V={len(corpus.vocab)}, train {corpus.train.numel()} / valid "
                  f"{corpus.valid.numel()} / test {corpus.test.numel()} tokens; {args.model} "
                  f"x{args.layers}, emb {args.emb_dim}, hidden {args.hidden}; world {cluster.world}; "
                  f"checkpoints {Path(args.checkpoint_dir) / key}", flush=True)
        common = dict(date=time.strftime("%Y-%m-%d"), device=device_name(cluster.device), commit=commit_id(),
                      mode=args.tag or args.preset or ("quick" if args.quick else "full"), dataset=corpus.name,
                      model=args.model,
                      world_size=cluster.world, seed=args.seed, torch=torch.__version__,
                      threads=torch.get_num_threads(),
                      config=_config_string(args))
        rows = [dict(common, **train_variant(v, args, corpus, cluster, key)) for v in args.variants]
        if cluster.main:
            path = Path(args.out) if args.out else results_path(cluster.device)
            append_rows(path, rows)
            print(_table(rows))
            print(f"results: {path}")
            if not args.no_plot:
                print(f"plot: {plot(path)}")
        return rows
    finally:
        if cluster.world > 1:
            dist.destroy_process_group()


def _config_string(args) -> str:
    names = ("preset", "layers", "emb_dim", "hidden", "heads", "dropout", "batch_size", "bptt", "lr", "optimizer",
             "schedule", "warmup", "weight_decay", "clip", "amp", "head", "train_budget", "map_dim",
             "expand_dim", "depth", "max_groups", "slim_subvectors", "slim_pool", "al_tau", "al_alpha",
             "train_tokens", "eval_tokens", "val_tokens", "evals", "patience", "max_minutes")
    return " ".join(f"{name}={getattr(args, name)}" for name in names)


def _table(rows: list) -> str:
    lines = [f"{'variant':>13} {'params(M)':>9} {'emb':>8} {'transf':>8} {'context':>8} {'output':>8} "
             f"{'steps':>6} {'sec':>7} {'val ppl':>8} {'test ppl':>8}"]
    for row in rows:
        lines.append(f"{row['variant']:>13} {row['params_total'] / 1e6:9.3f} {row['params_embedding']:8d} "
                     f"{row['params_transform']:8d} {row['params_context']:8d} {row['params_output']:8d} "
                     f"{row['steps']:6d} {row['train_seconds']:7.1f} {row['val_ppl']:8.2f} {row['test_ppl']:8.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
