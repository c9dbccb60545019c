"""PTB / WikiText-2 token streams: vocabulary from train, one <eos> per line (the standard count).

The corpora live outside the repo: `--data-dir`, else $DEFINE_KERNELS_DATA, else ../shared/data
beside the repository. Ids are ordered by descending train frequency (ties by first occurrence),
which adaptive input's frequency bands rely on.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import torch

EOS = "<eos>"
DATASETS = {"ptb": "ptb", "wt2": "wikitext-2"}
SPLITS = ("train", "valid", "test")
REPO_ROOT = Path(__file__).resolve().parents[2]


def data_root(explicit: Optional[str] = None) -> Path:
    root = Path(explicit or os.environ.get("DEFINE_KERNELS_DATA") or REPO_ROOT.parent / "shared" / "data")
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} not found: pass --data-dir or set DEFINE_KERNELS_DATA")
    return root


def read_words(path: Path) -> list:
    words = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            words.extend(line.split())
            words.append(EOS)
    return words


class Vocabulary:
    """Words by descending train frequency; `index[word]` is its id."""

    def __init__(self, train_words: list):
        counts = collections.Counter(train_words)
        first_seen = {}
        for position, word in enumerate(train_words):
            first_seen.setdefault(word, position)
        self.words = sorted(counts, key=lambda word: (-counts[word], first_seen[word]))
        self.index = {word: i for i, word in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, words: list, split: str) -> torch.Tensor:
        try:
            return torch.tensor([self.index[word] for word in words], dtype=torch.int64)
        except KeyError as error:
            raise ValueError(f"{split} holds {error.args[0]!r}, which train does not") from None


class Corpus(NamedTuple):
    name: str
    vocab: Vocabulary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor


def load_corpus(name: str, root: Optional[str] = None, *, train_tokens: Optional[int] = None,
                eval_tokens: Optional[int] = None) -> Corpus:
    """Token id streams of `name` ("ptb", "wt2" or a directory holding train/valid/test.txt).

    train_tokens / eval_tokens keep only the first that many tokens of train / valid and test
    (quick runs and tests); the vocabulary always comes from the whole train file.
    """
    directory = Path(name) if Path(name).is_dir() else data_root(root) / DATASETS.get(name, name)
    if not directory.is_dir():
        raise ValueError(f"dataset must be one of {sorted(DATASETS)} or a directory, got {name!r}")
    words = {split: read_words(directory / f"{split}.txt") for split in SPLITS}
    vocab = Vocabulary(words["train"])
    streams = {split: vocab.encode(words[split], split) for split in SPLITS}
    limits = {"train": train_tokens, "valid": eval_tokens, "test": eval_tokens}
    streams = {split: s[:limits[split]] if limits[split] else s for split, s in streams.items()}
    return Corpus(name, vocab, streams["train"], streams["valid"], streams["test"])


def batchify(stream: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[N] -> [N // batch_size, batch_size]: column j is the j-th contiguous slice of the text."""
    if batch_size < 1 or stream.numel() < 2 * batch_size:
        raise ValueError(f"batch_size {batch_size} does not fit a stream of {stream.numel()} tokens")
    rows = stream.numel() // batch_size
    return stream[: rows * batch_size].view(batch_size, rows).t().contiguous()


def bptt_chunks(source: torch.Tensor, bptt: int, start: int = 0) -> Iterator[tuple]:
    """(position, inputs [t, B], targets [t, B]) over the rows of a batchified stream."""
    for position in range(start, source.shape[0] - 1, bptt):
        length = min(bptt, source.shape[0] - 1 - position)
        yield position, source[position:position + length], source[position + 1:position + 1 + length]
