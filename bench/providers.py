"""Providers: each builds one embedding once for a workload (one setup function each) and hands
out a step callable per mode.

    embedding            nn.Embedding, dense gradient, AdamW
    embedding-sparse     nn.Embedding(sparse=True), SparseAdam
    define-<backend>     DeFINE on a registered backend (dedup on), AdamW; every backend in
                         backends_by_priority() is found generically, `torch` is the eager reference
    define-<b>-nodedup   the same without dedup
    define-<b>-sparse    DeFINE(sparse=True): SparseAdam on map_weight, AdamW on the rest
    define-<b>-recompute the "recompute" activation policy (the default on CPU is "save")
    define-<b>-autocast  fp32 parameters run under torch.autocast(bfloat16) (fp32 specs only)
    plain-eager          bench/plain_stack.py: the stack written plainly in eager PyTorch, as
                         the authors' code runs it (forward and forward+backward only: only the
                         gathered rows get a gradient, so there is no train step)
    define-cache         DeFINE in eval from the inference cache (inference mode only)
    define-compile       the reference stack under torch.compile (dedup outside the graph)
    relative-<name>      define_kernels.relatives modules, when that package exists

The eager reference (`define-torch`) and `embedding` are what ratios are taken against.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import time
from typing import Callable, List, NamedTuple, Optional

import torch
from torch import nn

from define_kernels import DeFINE, HGTConfig, reference
from define_kernels import backends as registry
from define_kernels.inference_cache import InferenceCache
from define_kernels.workloads import Workload

from .metrics import MODES, StepCost

EMBEDDING, EAGER = "embedding", "define-torch"
COMPILE_MODES = {"cuda": ("max-autotune-no-cudagraphs", "default"), "cpu": ("default",)}


class ProviderUnavailable(RuntimeError):
    """This provider cannot run here; the message says why."""


class Spec(NamedTuple):
    workload: Workload
    device: torch.device
    dtype: torch.dtype
    compile_backend: str = "inductor"
    compile_modes: Optional[tuple] = None   # None: COMPILE_MODES for the device, best first
    slow_backends: bool = False             # also run the Triton interpreter on CPU


@dataclasses.dataclass
class Prepared:
    """A built provider: `call(ids) -> [T, m]` over `module`, plus its optimizers."""
    module: nn.Module
    call: Callable[[torch.Tensor], torch.Tensor]
    optimizers: list
    modes: tuple = MODES
    note: str = ""
    stack_config: object = None   # HGTConfig when an HGT stack runs, else None
    table_dim: int = 0
    dedup: bool = True
    sparse: bool = False
    cached: bool = False

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def cost(self, spec: Spec, tokens: int, unique: int) -> StepCost:
        runs_stack = self.stack_config is not None
        return StepCost(tokens=tokens, unique=unique,
                        stack_rows=(unique if self.dedup else tokens) if runs_stack else 0,
                        vocab_size=spec.workload.vocab_size, table_dim=self.table_dim,
                        out_dim=spec.workload.embedding_dim,
                        elem_bytes=torch.empty((), dtype=spec.dtype).element_size(),
                        config=self.stack_config, sparse=self.sparse, cached=self.cached)

    def reset(self) -> None:
        """Drop gradients and optimizer state so each mode starts from the parameters alone."""
        for param in self.module.parameters():
            param.grad = None
        for optimizer in self.optimizers:
            optimizer.state.clear()

    def live_tensors(self, mode: str) -> List[torch.Tensor]:
        """What the step keeps resident: parameters, buffers, caches; grads and optimizer state
        in the modes that make them."""
        tensors = list(self.module.parameters()) + list(self.module.buffers())
        tensors += [m.cache.table for m in self.module.modules()
                    if isinstance(getattr(m, "cache", None), InferenceCache) and m.cache.table is not None]
        if mode in ("forward_backward", "train"):
            tensors += [p.grad for p in self.module.parameters() if p.grad is not None]
        if mode == "train":
            tensors += [value for optimizer in self.optimizers for state in optimizer.state.values()
                        for value in state.values() if isinstance(value, torch.Tensor)]
        return tensors

    def step(self, mode: str, ids: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], object]:
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} not offered (modes: {self.modes})")
        module, call, optimizers = self.module, self.call, self.optimizers
        params = [p for p in module.parameters() if p.requires_grad]

        def forward():
            module.train()
            return call(ids)

        def forward_backward():
            module.train()
            for param in params:
                param.grad = None
            call(ids).backward(grad_out)

        def train():
            module.train()
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            call(ids).backward(grad_out)
            for optimizer in optimizers:
                optimizer.step()

        def inference():
            module.eval()
            with torch.no_grad():
                return call(ids)

        return {"forward": forward, "forward_backward": forward_backward, "train": train,
                "inference": inference}[mode]


class Provider(NamedTuple):
    name: str
    setup: Callable[[Spec], Prepared]
    description: str
    unavailable: Callable[[Spec], Optional[str]] = lambda spec: None


# ------------------------------------------------------------------------------ optimizers
def adamw(params: list) -> tuple:
    """AdamW, fused where torch offers it for these parameters, else foreach, else plain."""
    for options in ({"fused": True}, {"foreach": True}, {}):
        try:
            optimizer = torch.optim.AdamW(params, lr=1e-3, **options)
        except (RuntimeError, ValueError, TypeError):
            continue
        return optimizer, "AdamW(" + ",".join(options) + ")" if options else "AdamW"
    raise ProviderUnavailable("no AdamW variant accepts these parameters")


# ------------------------------------------------------------------------------ setups
def setup_embedding(spec: Spec, sparse: bool = False) -> Prepared:
    w = spec.workload
    module = nn.Embedding(w.vocab_size, w.embedding_dim, sparse=sparse).to(spec.device, spec.dtype)
    if sparse:
        optimizer, note = torch.optim.SparseAdam(list(module.parameters()), lr=1e-3), "SparseAdam"
    else:
        optimizer, note = adamw(list(module.parameters()))
    return Prepared(module, module, [optimizer], note=note, table_dim=w.embedding_dim, sparse=sparse)


def build_define(spec: Spec, backend: str, **options) -> DeFINE:
    return DeFINE(**spec.workload.define_kwargs(), backend=backend, **options).to(spec.device, spec.dtype)


def define_optimizers(module: DeFINE, sparse: bool) -> tuple:
    if not sparse:
        optimizer, note = adamw(list(module.parameters()))
        return [optimizer], note
    rest = [p for name, p in module.named_parameters() if name != "map_weight"]
    optimizer, note = adamw(rest)
    return [torch.optim.SparseAdam([module.map_weight], lr=1e-3), optimizer], "SparseAdam(map)+" + note


def setup_define(spec: Spec, backend: str = "torch", dedup: bool = True, sparse: bool = False,
                 activations: str = "auto") -> Prepared:
    module = build_define(spec, backend, dedup=dedup, sparse=sparse, cache=False, activations=activations)
    optimizers, note = define_optimizers(module, sparse)
    return Prepared(module, module, optimizers, note=note, stack_config=module.config,
                    table_dim=module.map_dim, dedup=dedup, sparse=sparse)


def setup_define_autocast(spec: Spec, backend: str) -> Prepared:
    if spec.dtype != torch.float32:
        raise ProviderUnavailable(f"autocast runs fp32 parameters; this run's dtype is {spec.dtype}")
    prepared = setup_define(spec, backend)
    module, device_type = prepared.module, spec.device.type if isinstance(spec.device, torch.device) \
        else torch.device(spec.device).type

    def call(ids):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return module(ids)

    return dataclasses.replace(prepared, call=call, note="torch.autocast(bfloat16); " + prepared.note)


def setup_plain_eager(spec: Spec) -> Prepared:
    from .plain_stack import PlainStack  # lazy: plain_stack imports define_kernels only
    module = build_define(spec, "torch", cache=False)
    return Prepared(module, PlainStack(module), [], modes=("forward", "forward_backward"),
                    note="eager bmm/LayerNorm/GELU/cat, activations kept by autograd; gathered rows' gradient only",
                    stack_config=module.config, table_dim=module.map_dim)


def setup_define_cache(spec: Spec) -> Prepared:
    module = build_define(spec, "auto", cache=True)
    return Prepared(module, module, [], modes=("inference",), note="eval, inference cache",
                    stack_config=module.config, table_dim=module.map_dim, cached=True)


def setup_define_compile(spec: Spec) -> Prepared:
    """The reference forward (gather, scale, stack) compiled with torch.compile, trying the
    best mode first; dedup runs outside the graph (data-dependent shape)."""
    module = build_define(spec, "torch", cache=False)
    config, scale = module.config, module.scale

    def stack(table, ids, *params):
        return reference.hgt_forward(table, ids, params, config, scale)

    probe_ids = torch.arange(min(8, spec.workload.vocab_size), device=spec.device)
    errors = []
    for mode in spec.compile_modes or COMPILE_MODES.get(spec.device.type, ("default",)):
        torch._dynamo.reset()
        compiled = torch.compile(stack, backend=spec.compile_backend,
                                 mode=None if spec.compile_backend != "inductor" else mode)

        def call(ids, compiled=compiled):
            unique, inverse = torch.unique(ids, return_inverse=True)
            return compiled(module.map_weight, unique, *module.hgt.op_params())[inverse]

        try:
            started = time.perf_counter()
            call(probe_ids).sum().backward()
            module.zero_grad(set_to_none=True)
        except Exception as error:  # any compiler failure: try the next mode
            errors.append(f"{mode}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            continue
        optimizers, note = define_optimizers(module, sparse=False)
        note = f"torch.compile({spec.compile_backend}, mode={mode!r}, first build {time.perf_counter() - started:.0f}s); {note}"
        return Prepared(module, call, optimizers, note=note, stack_config=config,
                        table_dim=module.map_dim)
    raise ProviderUnavailable("torch.compile failed in every mode: " + " | ".join(errors))


# ------------------------------------------------------------------------------ discovery
def backend_reason(name: str, spec: Spec) -> Optional[str]:
    """Why registry backend `name` cannot run this workload on spec's device/dtype, or None."""
    backend = registry._REGISTRY[name]
    if name == "triton" and spec.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" \
            and not spec.slow_backends:
        # Triton's interpreter on CPU is a debugging aid: minutes per call, no benchmark.
        return "runs in the Triton interpreter on CPU (TRITON_INTERPRET=1): not benchmarked; --slow-backends runs it"
    config = spec.workload.config()
    try:
        x = torch.zeros(2, config.in_dim, device=spec.device, dtype=spec.dtype)
        ids = torch.zeros(2, dtype=torch.int64, device=spec.device)
        params = [torch.zeros(shape, device=spec.device, dtype=spec.dtype) for shape in config.param_shapes()]
    except (RuntimeError, TypeError) as error:
        return f"cannot place inputs on {spec.device}/{spec.dtype}: {error}"
    reasons = backend.not_supported_reasons(registry.OpInputs(x, ids, params, config, 1.0, None))
    return "; ".join(reasons) or None


def _backend_providers() -> List[Provider]:
    providers = []
    for backend in registry.backends_by_priority():
        name = backend.name

        def unavailable(spec, name=name):
            return backend_reason(name, spec)

        providers += [
            Provider(f"define-{name}", lambda s, n=name: setup_define(s, n),
                     f"DeFINE, backend {name}, dedup, AdamW", unavailable),
            Provider(f"define-{name}-nodedup", lambda s, n=name: setup_define(s, n, dedup=False),
                     f"DeFINE, backend {name}, no dedup, AdamW", unavailable),
            Provider(f"define-{name}-sparse", lambda s, n=name: setup_define(s, n, sparse=True),
                     f"DeFINE(sparse=True), backend {name}: SparseAdam on the map, AdamW on the rest",
                     unavailable),
            Provider(f"define-{name}-recompute",
                     lambda s, n=name: setup_define(s, n, activations=registry.RECOMPUTE),
                     f"DeFINE, backend {name}, activation policy 'recompute' (backward reruns the forward)",
                     unavailable),
            Provider(f"define-{name}-autocast", lambda s, n=name: setup_define_autocast(s, n),
                     f"DeFINE fp32 parameters, backend {name}, under torch.autocast(bfloat16)",
                     lambda spec, name=name: backend_reason(name, spec._replace(dtype=torch.bfloat16))),
        ]
    return providers


def _relative_providers() -> List[Provider]:
    """Input layers of define_kernels.relatives (forward takes `ids`), built generically as
    cls(num_embeddings, embedding_dim, **the workload fields the constructor names)."""
    try:
        relatives = importlib.import_module("define_kernels.relatives")
    except ImportError:
        return []
    providers = []
    for name in getattr(relatives, "__all__", []):
        cls = getattr(relatives, name)
        if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
            continue
        forward_args = list(inspect.signature(cls.forward).parameters)[1:2]
        if forward_args != ["ids"]:
            continue  # an output layer or a loss, not an embedding
        providers.append(Provider(f"relative-{name.lower()}", lambda s, c=cls: setup_relative(s, c),
                                  f"define_kernels.relatives.{name} (constructor defaults), AdamW"))
    return providers


def setup_relative(spec: Spec, cls) -> Prepared:
    w = spec.workload
    accepted = inspect.signature(cls.__init__).parameters
    options = {key: getattr(w, key) for key in ("map_dim", "expand_dim", "depth", "max_groups")
               if key in accepted}
    if "cutoffs" in accepted and w.vocab_size >= 40:
        options["cutoffs"] = (w.vocab_size // 20, w.vocab_size // 5)  # fairseq-like frequency bands
    try:
        module = cls(w.vocab_size, w.embedding_dim, **options).to(spec.device, spec.dtype)
    except (TypeError, ValueError) as error:
        raise ProviderUnavailable(f"{cls.__name__}(num_embeddings, embedding_dim, **{options}): {error}")
    optimizer, note = adamw(list(module.parameters()))
    config = getattr(module, "config", None)
    return Prepared(module, module, [optimizer], note=f"{options}; {note}",
                    stack_config=config if isinstance(config, HGTConfig) else None,
                    table_dim=options.get("map_dim", w.embedding_dim), dedup=False)


def all_providers() -> List[Provider]:
    """Every provider, baselines first; backends by registry priority."""
    providers = [
        Provider(EMBEDDING, setup_embedding, "nn.Embedding, dense gradient, AdamW"),
        Provider("embedding-sparse", lambda s: setup_embedding(s, sparse=True),
                 "nn.Embedding(sparse=True), SparseAdam"),
    ]
    providers += _backend_providers()
    providers += [
        Provider("define-cache", setup_define_cache, "DeFINE eval, inference cache (auto backend)"),
        Provider("define-compile", setup_define_compile, "reference stack under torch.compile, dedup"),
        Provider("plain-eager", setup_plain_eager, "the stack written plainly in eager PyTorch (bench/plain_stack.py)"),
    ]
    return providers + _relative_providers()


def select_providers(names: Optional[List[str]]) -> List[Provider]:
    """The providers named (all when None); unknown names raise ValueError listing the known ones."""
    providers = all_providers()
    if not names:
        return providers
    by_name = {provider.name: provider for provider in providers}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"providers: unknown {unknown}; known: {sorted(by_name)}")
    return [by_name[name] for name in names]
