"""The cases of `python -m bench.lm_head`: what each variant computes, its FLOP, its parameters,
the memory it is expected to need (to skip what cannot fit before starting it), and the child
process that builds and times one case.

Head alone (`part="head"`), forward + backward of hidden states h [T, m] (h.requires_grad, as
in a model) against Zipf(1.1) targets over V, the DeFINE-style tied head: a bias-free
projection m -> n and a table [V, n] (DeFINE.map_weight's shape and init):
    unfused                    TiedOutput (logits = proj(h) Eᵀ, [T, V]) + F.cross_entropy
    fused                      define_kernels.lm_head_loss(backend="cpu_cpp")
    fused-reference            lm_head_loss(backend="reference") (small sizes only)
    chunked                    F.linear_cross_entropy(proj(h), E, y, options=LinearCrossEntropyOptions()),
                               as the issue wrote it (small sizes only: torch's CPU "auto" picks 1 to
                               32 rows per chunk for these shapes, minutes per step)
    chunked-tuned              the same with batch_chunk_size = chunk_rows(V) (~64M logits per chunk)
    adaptive                   nn.AdaptiveLogSoftmaxWithLoss(m, V, cutoffs), untied, div_value 4
    unfused-augmented          TiedOutput + relatives.AugmentedLoss(tau, alpha)
    fused-augmented            lm_head_loss(alpha, tau, backend="cpu_cpp")
    fused-augmented-reference  the same on the reference backend (small sizes only)
Whole training step (`part="step"`), ids [B, L] -> input layer -> pre-LN causal Transformer
body (nn.TransformerEncoderLayer, norm_first, GELU, no dropout, causal mask) -> final
LayerNorm -> tied head + loss -> backward -> AdamW (fused):
    step-embedding             nn.Embedding(V, m) + body + tied nn.Linear(m, V) + F.cross_entropy
    step-define-fused          DeFINE (the workload's config) + body + lm_head_loss(proj m -> n,
                               DeFINE.map_weight, backend="cpu_cpp")
    step-define-reference      the same with the reference head backend (small sizes only)
bf16 means torch.autocast("cpu", bfloat16) around the forward, fp32 master weights.
"""
from __future__ import annotations

import dataclasses
import os
import resource
import time
import traceback
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

import define_kernels
from define_kernels.backends import BackendUnavailableError
from define_kernels.relatives import AugmentedLoss, TiedOutput

from .workloads import parse_workload, zipf_ids

HEAD_VARIANTS = ("unfused", "fused", "fused-reference", "chunked", "chunked-tuned", "adaptive", "unfused-augmented",
                 "fused-augmented", "fused-augmented-reference")
STEP_VARIANTS = ("step-embedding", "step-define-fused", "step-define-reference")
VARIANTS = {"head": HEAD_VARIANTS, "step": STEP_VARIANTS}
BASELINE = {"head": "unfused", "step": "step-embedding"}
# Run only at small sizes (T x V <= --reference-max-elements): too slow beyond.
SMALL_ONLY = ("fused-reference", "fused-augmented-reference", "step-define-reference", "chunked")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WT103_VOCAB, WT103_CUTOFFS = 267_735, (20_000, 60_000)
YARDSTICK_K, YARDSTICK_N = 512, 2048  # the same-round matmul: [min(T, 4096), 512] x [512, 2048]
# Bytes per element of the [T, V] buffers a variant holds at its peak (logits, their fp32
# copies, log-softmax, their gradients), measured at V=33,278 T=1,024 with this harness
# (bench/results CSV of the calibration run; peak RSS above the start, minus parameters).
# The reference backend measured as much as the unfused head there (495 vs 497 MB fp32).
TV_BYTES = {("unfused", "float32"): 14, ("unfused", "bfloat16"): 15,
            ("unfused-augmented", "float32"): 31, ("unfused-augmented", "bfloat16"): 34,
            ("fused-reference", "float32"): 14, ("fused-reference", "bfloat16"): 15,
            ("fused-augmented-reference", "float32"): 17, ("fused-augmented-reference", "bfloat16"): 18,
            ("step-embedding", "float32"): 14, ("step-embedding", "bfloat16"): 15,
            ("step-define-reference", "float32"): 14, ("step-define-reference", "bfloat16"): 15}
CHUNK_LOGITS = 1 << 26  # chunked-tuned: logits per chunk


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration; `fail` makes the child raise (the harness's own tests)."""
    part: str
    workload: str      # a define_kernels workload name or a bench custom: spec
    tokens: int
    dtype: str         # "float32" or "bfloat16" (autocast)
    variant: str
    seed: int = 0
    seq_len: int = 512
    layers: int = 4
    heads: int = 8
    alpha: float = 0.5
    tau: float = 10.0
    warmup: int = 1
    fail: bool = False

    @property
    def spec(self):
        return parse_workload(self.workload)

    @property
    def key(self) -> tuple:
        """What a ratio is taken within: the same part, workload, T and dtype."""
        return (self.part, self.spec.name, self.tokens, self.dtype)

    @property
    def name(self) -> str:
        return f"{self.part} {self.spec.name} T={self.tokens} {self.dtype} {self.variant}"


def adaptive_cutoffs(vocab: int) -> list:
    """20k / 60k for WikiText-103's 267,735 words, scaled by V / 267,735 for a smaller vocabulary."""
    if vocab >= WT103_VOCAB:
        return list(WT103_CUTOFFS)
    cutoffs = []
    for c in WT103_CUTOFFS:
        value = max(round(c * vocab / WT103_VOCAB), (cutoffs[-1] + 1) if cutoffs else 1)
        cutoffs.append(min(value, vocab - 1 - (len(WT103_CUTOFFS) - 1 - len(cutoffs))))
    return cutoffs


def chunk_rows(vocab: int, tokens: int) -> int:
    """chunked-tuned's batch_chunk_size: the power of two nearest below 2^26 / V, at most T."""
    rows = max(1, CHUNK_LOGITS // vocab)
    return min(1 << (rows.bit_length() - 1), tokens)


def sequence_shape(case: Case) -> tuple:
    """(batch, length) of the whole step's ids: length = seq_len when it divides T, else T."""
    length = case.seq_len if case.tokens % case.seq_len == 0 else case.tokens
    return case.tokens // length, length


# ----------------------------------------------------------------------------- counts
def body_macs_per_token(case: Case) -> int:
    d, (_, length) = case.spec.embedding_dim, sequence_shape(case)
    return case.layers * (12 * d * d + 2 * length * d)  # qkv + out + 4d FFN; QKᵀ and PV in full


def adaptive_macs(case: Case, targets: torch.Tensor) -> int:
    w = case.spec
    cutoffs = adaptive_cutoffs(w.vocab_size) + [w.vocab_size]
    macs = case.tokens * w.embedding_dim * (cutoffs[0] + len(cutoffs) - 1)
    for i in range(len(cutoffs) - 1):
        rows = int(((targets >= cutoffs[i]) & (targets < cutoffs[i + 1])).sum())
        width = max(w.embedding_dim // 4 ** (i + 1), 1)
        macs += rows * width * (w.embedding_dim + cutoffs[i + 1] - cutoffs[i])
    return macs


def flop_count(case: Case, targets: torch.Tensor, unique: int) -> int:
    """GEMM FLOP of one forward + backward (3 x 2 x MACs); the whole step adds the body and
    the input layer (DeFINE's stack over the distinct ids). Softmax, norms, AdamW: not counted."""
    w, t = case.spec, case.tokens
    if case.variant == "adaptive":
        return 6 * adaptive_macs(case, targets)
    if case.part == "head":
        macs = t * w.vocab_size * w.map_dim + t * w.embedding_dim * w.map_dim
        extra = 2 * t * w.vocab_size * w.map_dim if "augmented" in case.variant else 0  # E[y] Eᵀ, no grad
        return 6 * macs + extra
    body = t * body_macs_per_token(case)
    if case.variant == "step-embedding":
        return 6 * (body + t * w.vocab_size * w.embedding_dim)
    head = t * w.vocab_size * w.map_dim + t * w.embedding_dim * w.map_dim
    return 6 * (body + head + unique * w.config().macs_per_token)


def estimate_bytes(case: Case) -> int:
    """Peak bytes the case should need above the process's start, from the shapes alone (the
    [T, V] buffers of TV_BYTES, parameters with gradient and AdamW state, activations)."""
    w, t = case.spec, case.tokens
    tv = t * w.vocab_size
    if case.part == "head":
        params = w.vocab_size * (w.embedding_dim if case.variant == "adaptive" else w.map_dim) + \
            w.embedding_dim * w.map_dim
        base = 2 * 4 * params + 3 * 4 * t * w.embedding_dim
        if case.variant == "adaptive":
            head = t * (adaptive_cutoffs(w.vocab_size)[0] + 2)
            return base + 14 * head + 4 * w.vocab_size * w.embedding_dim
        if case.variant == "chunked":  # measured 8 B per T x V element at V=33,278, T=1,024
            return base + 8 * tv
        if case.variant == "chunked-tuned":
            return base + 2 * 4 * w.vocab_size * w.map_dim + 14 * chunk_rows(w.vocab_size, t) * w.vocab_size
        if (case.variant, case.dtype) in TV_BYTES:
            return base + TV_BYTES[(case.variant, case.dtype)] * tv
        return base + 2 * 4 * t * min(w.vocab_size, 4096)  # fused: a [T, 4096] tile of logits and its gradient
    d = w.embedding_dim
    batch, length = sequence_shape(case)
    body_params = case.layers * 12 * d * d
    table = w.vocab_size * (d if case.variant == "step-embedding" else w.map_dim)
    params = 4 * 4 * (body_params + table)  # weights, gradients, AdamW's two moments
    heads = case.heads
    activations = case.layers * (4 * t * d * 16 + 4 * batch * heads * length * length * 3)
    head = TV_BYTES.get((case.variant, case.dtype), 0) * tv
    return params + activations + head


# ----------------------------------------------------------------------------- the child
def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Unavailable(Exception):
    """The variant cannot run here (backend not built, torch without the API)."""


def _chunked_api():
    fn = getattr(F, "linear_cross_entropy", None)
    options = getattr(nn, "LinearCrossEntropyOptions", None)
    if fn is None:
        raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")
    import inspect
    if options is None or "options" not in inspect.signature(fn).parameters:
        raise Unavailable(f"torch {torch.__version__}: F.linear_cross_entropy has no options= "
                          "(LinearCrossEntropyOptions), so no chunked path")
    return fn, options


def _table(vocab: int, width: int) -> nn.Embedding:
    """An nn.Embedding holding a [V, n] table with DeFINE.map_weight's init, N(0, n^-1/2)."""
    table = nn.Embedding(vocab, width)
    with torch.no_grad():
        table.weight.normal_(0.0, width ** -0.5)
    return table


def build_head(case: Case):
    """(step callable, parameter counts, targets) for a head-alone case."""
    w = case.spec
    t, m, n, vocab = case.tokens, w.embedding_dim, w.map_dim, w.vocab_size
    torch.manual_seed(case.seed)
    h = torch.randn(t, m, requires_grad=True)
    targets = zipf_ids(vocab, t, case.seed)
    v = case.variant
    autocast = case.dtype == "bfloat16"
    if v == "adaptive":
        head = nn.AdaptiveLogSoftmaxWithLoss(m, vocab, adaptive_cutoffs(vocab), div_value=4.0)
        if autocast:  # it fails under CPU autocast (index_copy_ of bf16 into fp32): bf16 weights
            head, h, autocast = head.to(torch.bfloat16), h.detach().to(torch.bfloat16).requires_grad_(), False
        params = list(head.parameters())

        def loss_fn():
            return head(h, targets).loss
    else:
        table_module = _table(vocab, n)
        tied = TiedOutput(table_module, hidden_dim=m)
        table, proj = table_module.weight, tied.proj.weight
        params = [table, proj]
        backend = "reference" if v.endswith("-reference") else "cpu_cpp"
        if v == "unfused":
            def loss_fn():
                return F.cross_entropy(tied(h), targets)
        elif v == "unfused-augmented":
            augmented = AugmentedLoss(tau=case.tau, alpha=case.alpha)

            def loss_fn():
                return augmented(tied(h), targets, tied.table)
        elif v in ("chunked", "chunked-tuned"):
            linear_ce, options = _chunked_api()
            chosen = options() if v == "chunked" else \
                options(batch_chunk_size=chunk_rows(vocab, t), chunking_method=None)

            def loss_fn():
                return linear_ce(F.linear(h, proj), table, targets, options=chosen)
        elif v in ("fused", "fused-reference"):
            def loss_fn():
                return define_kernels.lm_head_loss(h, table, targets, proj=proj, backend=backend)
        elif v in ("fused-augmented", "fused-augmented-reference"):
            def loss_fn():
                return define_kernels.lm_head_loss(h, table, targets, proj=proj, alpha=case.alpha,
                                                   tau=case.tau, backend=backend)
        else:
            raise ValueError(f"unknown head variant {v!r}")

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        loss.backward()
        for p in params + [h]:
            p.grad = None
        return loss
    counts = {"head": sum(p.numel() for p in params)}
    return step, counts, targets, int(torch.unique(targets).numel())


class Body(nn.Module):
    """`layers` pre-LN causal Transformer layers of width d, then a final LayerNorm."""

    def __init__(self, d: int, layers: int, heads: int):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.norm(self.encoder(x, mask=mask, is_causal=True))


def build_step(case: Case):
    """(training step callable, parameter counts, targets) for a whole-step case."""
    w = case.spec
    batch, length = sequence_shape(case)
    d, vocab = w.embedding_dim, w.vocab_size
    torch.manual_seed(case.seed)
    ids = zipf_ids(vocab, case.tokens, case.seed).reshape(batch, length)
    targets = zipf_ids(vocab, case.tokens, case.seed + 1)
    body = Body(d, case.layers, case.heads)
    if case.variant == "step-embedding":
        embedding = nn.Embedding(vocab, d)
        with torch.no_grad():  # tied: N(0, d^-1/2) keeps the logits (and the loss) near log V
            embedding.weight.normal_(0.0, d ** -0.5)
        head = nn.Linear(d, vocab, bias=False)
        head.weight = embedding.weight  # tied
        head_params = []

        def loss_fn():
            hidden = body(embedding(ids)).reshape(-1, d)
            return F.cross_entropy(head(hidden), targets)
    elif case.variant in ("step-define-fused", "step-define-reference"):
        embedding = define_kernels.DeFINE(**w.define_kwargs(), cache=False)
        proj = nn.Linear(d, w.map_dim, bias=False)
        head_params = [proj.weight]
        backend = "reference" if case.variant.endswith("-reference") else "cpu_cpp"

        def loss_fn():
            hidden = body(embedding(ids)).reshape(-1, d)
            return define_kernels.lm_head_loss(hidden, embedding.map_weight, targets, proj=proj.weight,
                                               backend=backend)
    else:
        raise ValueError(f"unknown step variant {case.variant!r}")
    params = list(embedding.parameters()) + list(body.parameters()) + head_params
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    autocast = case.dtype == "bfloat16"

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    counts = {"embedding": sum(p.numel() for p in embedding.parameters()),
              "body": sum(p.numel() for p in body.parameters()),
              "head": sum(p.numel() for p in head_params)}
    return step, counts, targets, int(torch.unique(ids).numel())


def yardstick(tokens: int, block_seconds: float = 0.05, blocks: int = 3) -> Dict[str, float]:
    """FLOP/s of [min(T, 4096), 512] x [512, 2048] per dtype: the best of `blocks` blocks of
    calls lasting >= block_seconds each (one bf16 call can take a millisecond: single calls are
    all noise on a shared machine)."""
    rows = min(tokens, 4096)
    rates = {}
    for name, dtype in DTYPES.items():
        a = torch.randn(rows, YARDSTICK_K).to(dtype)
        b = torch.randn(YARDSTICK_K, YARDSTICK_N).to(dtype)
        started = time.perf_counter()
        a @ b
        number = max(1, int(block_seconds / max(time.perf_counter() - started, 1e-6)))
        best = float("inf")
        for _ in range(blocks):
            started = time.perf_counter()
            for _ in range(number):
                a @ b
            best = min(best, (time.perf_counter() - started) / number)
        rates[name] = 2 * rows * YARDSTICK_K * YARDSTICK_N / best
    return rates


def case_note(case: Case) -> str:
    """What differs from the variant's description for this case."""
    if case.variant.startswith("chunked"):
        _, options = _chunked_api()
        chosen = options() if case.variant == "chunked" else \
            options(batch_chunk_size=chunk_rows(case.spec.vocab_size, case.tokens), chunking_method=None)
        w = case.spec
        try:  # torch's own resolution of "auto" (a private method: may change)
            chosen = chosen._adjust(num_batches=case.tokens, in_features=w.map_dim, num_classes=w.vocab_size,
                                    dtype=DTYPES[case.dtype], device=torch.device("cpu"))
        except Exception:  # noqa: BLE001 - the note is informative only
            pass
        return f"batch_chunk_size={chosen.batch_chunk_size}, acc_policy={chosen.acc_policy}"
    if case.variant == "adaptive" and case.dtype == "bfloat16":
        return ("bf16 weights and input, no autocast: AdaptiveLogSoftmaxWithLoss fails under CPU "
                "autocast (index_copy_ of bf16 into fp32)")
    return ""


def measure(case: Case) -> dict:
    """Build, warm up, time one step; peak RSS from getrusage before the yardstick runs."""
    rss_start = _rss_mb()
    if case.fail:
        raise RuntimeError("failure injected by --fail (harness test)")
    build = build_head if case.part == "head" else build_step
    step, counts, targets, unique = build(case)
    for _ in range(case.warmup):
        step()
    started = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - started
    peak = _maxrss_mb()
    result = dict(status="ok", seconds=seconds, peak_rss_mb=peak, start_rss_mb=rss_start,
                  peak_mb=peak - rss_start, params=counts, flop=flop_count(case, targets, unique),
                  unique=unique, loss=float(loss.detach()), threads=torch.get_num_threads(),
                  note=case_note(case))
    result["yardstick"] = yardstick(case.tokens)
    return result


def child_main(case_fields: dict, connection) -> None:
    """Entry point of the case's process: sends one result dict and exits."""
    try:
        result = measure(Case(**case_fields))
    except (BackendUnavailableError, Unavailable) as error:
        result = dict(status="unavailable", message=f"{type(error).__name__}: {error}")
    except Exception as error:  # reported in the table, never a crash of the run
        last = traceback.extract_tb(error.__traceback__)[-1]
        result = dict(status="error", message=f"{type(error).__name__}: {error} "
                                              f"({os.path.basename(last.filename)}:{last.lineno})")
    connection.send(result)
    connection.close()
