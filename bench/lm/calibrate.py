"""Tokens per second of one variant's training step with a run's settings, on random ids of the
dataset's vocabulary: what the suite sizes its token budget from, on the machine that runs it.

    python -m bench.lm.calibrate --dataset wt2 --variant untied --steps 12 -- --preset transformer

Prints one JSON line: {"dataset", "variant", "tokens_per_s", "seconds_per_step", "steps", "threads"}.
Warm-up steps (the first three) are not timed; the median step is reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Callable

import torch

from . import train
from .data import load_corpus


@dataclasses.dataclass
class Trainer:
    """One variant's model and optimizer with a run's settings; step() trains on random ids and
    returns its wall-clock seconds."""
    variant: str
    args: argparse.Namespace
    vocab: int
    params: dict
    step: Callable[[], float]

    @property
    def tokens_per_step(self) -> int:
        return self.args.bptt * self.args.batch_size


def trainer(dataset: str, variant: str, train_args: list, seed: int = 0) -> Trainer:
    args = train.parse_args(["--dataset", dataset, "--variants", variant, *train_args])
    if args.threads:
        torch.set_num_threads(args.threads)
    vocab = len(load_corpus(dataset, args.data_dir, train_tokens=10, eval_tokens=10).vocab)
    model, params = train.build_model(variant, args, vocab)
    optimizer = train._optimizer(model, args)
    model.train()
    generator = torch.Generator().manual_seed(seed)

    def step() -> float:
        ids = torch.randint(0, vocab, (args.bptt + 1, args.batch_size), generator=generator)
        started = time.perf_counter()
        objective, _, _ = model(ids[:-1], ids[1:])
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        return time.perf_counter() - started

    return Trainer(variant, args, vocab, params, step)


def measure(dataset: str, variant: str, steps: int, train_args: list) -> dict:
    run = trainer(dataset, variant, train_args)
    times = [run.step() for _ in range(steps + 3)][3:]
    median = sorted(times)[len(times) // 2]
    return dict(dataset=dataset, variant=variant, tokens_per_s=round(run.tokens_per_step / median, 1),
                seconds_per_step=round(median, 4), steps=steps, threads=torch.get_num_threads())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.lm.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--variant", default="untied")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: bench.lm.train arguments")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.dataset, args.variant, args.steps, [a for a in args.train_args if a != "--"])))


if __name__ == "__main__":
    main()
