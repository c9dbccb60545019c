"""Train word-level LMs whose input/output layers are swapped among the variants of
`bench.lm.variants`, and report perplexity against parameters.

    python -m bench.lm.train --quick                      # every variant, a few hundred CPU steps
    python -m bench.lm.train --dataset wt2 --model transformer --variants tied,define
    torchrun --nproc_per_node 2 -m bench.lm.train --quick # DistributedDataParallel (gloo / nccl)

Each variant is seeded (same init for every rank), trained with Adam and gradient clipping on
truncated-BPTT windows, evaluated on validation every --eval-interval steps (learning rate
decayed on a plateau, early stop after --patience evaluations without improvement), and scored
with its best weights. A checkpoint per variant (the run's settings hashed into its folder) is
written at each evaluation; --resume continues from it and skips finished variants. Results
go to bench/results/lm_<date>_<device>_<commit>.csv and .png (see report.py).
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
from .model import LanguageModel, LSTMContext, TransformerContext, detach_state
from .report import append_rows, commit_id, device_name, plot, results_path
from .variants import VARIANTS, LayerSizes, build_layers, parameter_split

# --quick: CPU minutes for all variants; full: a GPU run near the ptb-lstm workload (docs/math.md §5).
QUICK = dict(layers=1, emb_dim=128, hidden=128, heads=4, dropout=0.2, batch_size=20, bptt=35,
             lr=3e-3, steps=200, epochs=None, eval_interval=100, eval_tokens=10_000,
             train_tokens=None, map_dim=64, expand_dim=256, depth=3, max_groups=4, slim_pool=1024)
FULL = dict(layers=2, emb_dim=400, hidden=400, heads=8, dropout=0.4, batch_size=20, bptt=35,
            lr=1e-3, steps=None, epochs=40, eval_interval=None, eval_tokens=None,
            train_tokens=None, map_dim=128, expand_dim=1024, depth=3, max_groups=4, slim_pool=2048)
# Settings that do not change what a variant computes: left out of the checkpoint key.
NOT_IN_KEY = ("resume", "tag", "threads", "no_progress", "out", "checkpoint_dir", "variants", "ddp_dump", "no_plot",
              "max_minutes", "data_dir")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.lm.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model, few steps, eval slices (CPU)")
    p.add_argument("--dataset", default="ptb", help="ptb, wt2, or a folder with train/valid/test.txt")
    p.add_argument("--data-dir", help="folder holding ptb/ and wikitext-2/ (default $DEFINE_KERNELS_DATA "
                                      "or ../shared/data)")
    p.add_argument("--model", default="lstm", choices=("lstm", "transformer"))
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    for name, kind in (("layers", int), ("emb_dim", int), ("hidden", int), ("heads", int),
                       ("dropout", float), ("batch_size", int), ("bptt", int), ("lr", float),
                       ("steps", int), ("epochs", int), ("eval_interval", int), ("eval_tokens", int),
                       ("train_tokens", int), ("map_dim", int), ("expand_dim", int), ("depth", int),
                       ("max_groups", int), ("slim_pool", int)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"default {QUICK[name]} with --quick, else {FULL[name]}")
    p.add_argument("--eval-batch-size", type=int, default=10)
    p.add_argument("--clip", type=float, default=0.25, help="gradient-norm clip")
    p.add_argument("--lr-decay", type=float, default=0.5, help="lr factor after a worse validation")
    p.add_argument("--patience", type=int, default=3, help="evaluations without improvement before stopping")
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
    p.add_argument("--ddp-dump", default=None, help="folder: each rank saves its final parameters and losses")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {VARIANTS}")
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


def train_variant(variant: str, args, corpus, cluster: Cluster, key: str) -> dict:
    checkpoint = Path(args.checkpoint_dir) / key / f"{variant}.pt"
    saved = torch.load(checkpoint, weights_only=False) if args.resume and checkpoint.exists() else None
    if saved is not None and saved.get("row"):
        return saved["row"]

    torch.manual_seed(args.seed)  # same initial weights on every rank and every run
    sizes = layer_sizes(args, len(corpus.vocab))
    layers = build_layers(variant, sizes)
    context = make_context(args, sizes)
    model = LanguageModel(layers.encoder, context, layers.decoder, args.dropout, layers.loss).to(cluster.device)
    split = parameter_split(layers, context)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    runner = DistributedDataParallel(model) if cluster.world > 1 else model
    torch.manual_seed(args.seed + 1 + cluster.rank)  # per-rank dropout

    if args.batch_size % cluster.world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the world size {cluster.world}")
    train = batchify(corpus.train, args.batch_size)[:, cluster.rank::cluster.world].to(cluster.device)
    valid = batchify(corpus.valid, args.eval_batch_size).to(cluster.device)
    test = batchify(corpus.test, args.eval_batch_size).to(cluster.device)
    steps_per_epoch = math.ceil((train.shape[0] - 1) / args.bptt)
    max_steps = args.steps or args.epochs * steps_per_epoch
    eval_interval = args.eval_interval or steps_per_epoch

    progress = dict(step=0, position=0, best_val=math.inf, best_step=0, bad=0, lr=args.lr,
                    seconds=0.0, losses=[])
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
    while progress["step"] < max_steps:
        if progress["position"] >= train.shape[0] - 1:  # next epoch
            progress["position"], state = 0, None
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
        bar.update(1)
        if progress["step"] % 10 == 0:
            bar.set_postfix(loss=f"{progress['losses'][-1]:.3f}", best_val=f"{progress['best_val']:.1f}")

        if progress["step"] % eval_interval == 0 or progress["step"] == max_steps:
            progress["seconds"] = time.perf_counter() - started
            val = evaluate(model, valid, args.bptt)
            model.train()
            if val < progress["best_val"]:
                progress.update(best_val=val, best_step=progress["step"], bad=0)
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                progress["bad"] += 1
                progress["lr"] *= args.lr_decay
                for group in optimizer.param_groups:
                    group["lr"] = progress["lr"]
            out_of_time = args.max_minutes is not None and progress["seconds"] > 60 * args.max_minutes
            stop = _agree(progress["bad"] >= args.patience or out_of_time, cluster)
            if cluster.main:
                _save(checkpoint, model, optimizer, progress, best_state)
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
    row = dict(variant=variant, steps=progress["step"], best_step=progress["best_step"],
               train_tokens=progress["step"] * args.bptt * args.batch_size,
               train_seconds=round(progress["seconds"], 1),
               val_ppl=round(evaluate(model, valid, args.bptt), 2),
               test_ppl=round(evaluate(model, test, args.bptt), 2),
               **{f"params_{group}": count for group, count in split.items()})
    if cluster.main:
        _save(checkpoint, model, optimizer, progress, best_state, row)
    return row


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
                      mode=args.tag or ("quick" if args.quick else "full"), dataset=corpus.name, model=args.model,
                      world_size=cluster.world, seed=args.seed, torch=torch.__version__,
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
    names = ("layers", "emb_dim", "hidden", "dropout", "batch_size", "bptt", "lr", "map_dim",
             "expand_dim", "depth", "max_groups", "slim_subvectors", "slim_pool", "al_tau", "al_alpha",
             "train_tokens", "eval_tokens", "max_minutes")
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
