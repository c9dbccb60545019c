"""Benchmark shapes (docs/math.md §5 by name, or custom) and the token ids they are fed.

Ids come from real text (PTB, WikiText-2 under ../shared/data, never copied into the repo) with
words mapped to the workload's vocabulary by frequency rank, or, as the embedded default, from
a seeded Zipf(s=1.1) sampler: real batches repeat ids, which dedup and sparse updates exploit,
so uniform ids would flatter nn.Embedding's scatter and hide DeFINE's dedup.
"""
from __future__ import annotations

import collections
import functools
import os
from pathlib import Path
import argparse
from typing import List, Optional

import torch

from define_kernels.workloads import WORKLOADS, Workload

ENV_DATA_DIR = "DEFINE_BENCH_DATA"
CORPORA = {"ptb": "ptb", "wikitext-2": "wikitext-2", "wt2": "wikitext-2"}
ZIPF = "zipf"
ZIPF_EXPONENT = 1.1
REPO_ROOT = Path(__file__).resolve().parent.parent
CUSTOM_KEYS = {"V": "vocab_size", "n": "map_dim", "k": "expand_dim", "m": "embedding_dim",
               "N": "depth", "g": "max_groups", "T": "tokens_per_batch"}


def parse_workload(text: str) -> Workload:
    """A docs/math.md §5 name, or `custom:V=..,n=..,k=..,m=..,N=..,g=..[,T=..]` (T defaults to 4096)."""
    if text in WORKLOADS:
        return WORKLOADS[text]
    if not text.startswith("custom:"):
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)} or "
                         f"'custom:V=..,n=..,k=..,m=..,N=..,g=..', got {text!r}")
    fields = {"tokens_per_batch": 4096}
    for item in text[len("custom:"):].split(","):
        key, _, value = item.partition("=")
        if key not in CUSTOM_KEYS or not value.isdigit():
            raise ValueError(f"workload: bad field {item!r} in {text!r} (keys {sorted(CUSTOM_KEYS)})")
        fields[CUSTOM_KEYS[key]] = int(value)
    missing = set(CUSTOM_KEYS.values()) - set(fields)
    if missing:
        raise ValueError(f"workload {text!r} misses {sorted(missing)}")
    name = "custom-V{vocab_size}-n{map_dim}-k{expand_dim}-m{embedding_dim}-N{depth}-g{max_groups}"
    return Workload(name=name.format(**fields), **fields)


def with_vocab(workload: Workload, vocab_size: int) -> Workload:
    """The same shape over another vocabulary (training-step time vs vocabulary size sweeps)."""
    if vocab_size == workload.vocab_size:
        return workload
    return workload._replace(name=f"{workload.name}-V{vocab_size}", vocab_size=vocab_size)


def find_data_dir(data_dir: Optional[str] = None) -> Path:
    """--data-dir, else $DEFINE_BENCH_DATA, else ../shared/data beside the repository."""
    candidates = [data_dir, os.environ.get(ENV_DATA_DIR), REPO_ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise FileNotFoundError(f"no corpus directory: pass --data-dir or set ${ENV_DATA_DIR} "
                            f"(looked in {[str(c) for c in candidates if c]})")


@functools.lru_cache(maxsize=4)
def corpus_stream(corpus: str, data_dir: Optional[str] = None, split: str = "train") -> torch.Tensor:
    """The split's tokens (one `<eos>` per line) as frequency ranks: 0 = most frequent word."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {sorted(CORPORA)} or {ZIPF!r}, got {corpus!r}")
    path = find_data_dir(data_dir) / CORPORA[corpus] / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} not found")
    words = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            words.extend(line.split())
            words.append("<eos>")
    counts = collections.Counter(words)
    # Ties broken by first appearance (Counter keeps insertion order), so ranks are reproducible.
    rank = {word: index for index, (word, _) in enumerate(counts.most_common())}
    return torch.tensor([rank[word] for word in words], dtype=torch.int64)


def zipf_ids(vocab_size: int, tokens: int, seed: int = 0, exponent: float = ZIPF_EXPONENT) -> torch.Tensor:
    """Seeded Zipf(s) ids: id r has probability proportional to (r + 1)^-s."""
    weights = torch.arange(1, vocab_size + 1, dtype=torch.float64).pow(-exponent)
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(weights, tokens, replacement=True, generator=generator)


def lm_batch(stream: torch.Tensor, tokens: int, seq_len: int) -> torch.Tensor:
    """A language-model batch: the stream cut into ceil(tokens/seq_len) equal columns (as
    `batchify` does), the first seq_len positions of each, flattened to `tokens` ids."""
    rows = -(-tokens // seq_len)
    column = stream.numel() // rows
    if column < seq_len:
        raise ValueError(f"tokens={tokens} needs {rows * seq_len} ids, the corpus has {stream.numel()}")
    return stream[: rows * column].reshape(rows, column)[:, :seq_len].reshape(-1)[:tokens].clone()


def batch_ids(workload: Workload, tokens: int, corpus: str = ZIPF, data_dir: Optional[str] = None,
              seed: int = 0) -> torch.Tensor:
    """One batch of `tokens` int64 ids in [0, workload.vocab_size).

    Real text: words ranked at or beyond the vocabulary fold into the last id (an `<unk>`).
    """
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    if corpus == ZIPF:
        return zipf_ids(workload.vocab_size, tokens, seed)
    stream = corpus_stream(corpus, None if data_dir is None else str(data_dir))
    seq_len = 35 if corpus == "ptb" else 128
    return lm_batch(stream, tokens, min(seq_len, tokens)).clamp_(max=workload.vocab_size - 1)


# ------------------------------------------------------------------ command-line list arguments
def comma_list(text: str) -> List[str]:
    """argparse type: a comma-separated list of names."""
    return [item.strip() for item in text.split(",") if item.strip()]


def workload_list(text: str) -> List[str]:
    """Comma list of workloads; the key=value fields of a custom: spec stay with it."""
    names = []
    for item in comma_list(text):
        if "=" in item and names and names[-1].startswith("custom:"):
            names[-1] += "," + item
        else:
            names.append(item)
    return names


def int_list(text: str) -> List[int]:
    try:
        return [int(item) for item in comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
