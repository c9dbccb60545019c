"""The one place where the fuzz suites draw configurations, inputs and budgets.

A new HGTConfig option (the authors' output layer, an activation policy, ...) is one line in
CONFIG_OPTIONS; a new DeFINE option is one line in MODULE_OPTIONS; a new dtype for a backend
needs nothing here (the backend's declared dtypes decide what runs, see `runnable_backends`).

Budgets: the "ci" profile (default) is derandomized (seeded per test) and small; `make fuzz`
sets DEFINE_KERNELS_FUZZ_PROFILE=long (more examples, random seeds printed by hypothesis).
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

from define_kernels import backends
from define_kernels.config import ACTS, GROUP_RULES, NORMS, TRANSFORMS, HGTConfig

PROFILE = os.environ.get("DEFINE_KERNELS_FUZZ_PROFILE", "ci")
_SCALE = {"ci": 1, "long": 20}[PROFILE]


def budget(examples: int):
    """hypothesis settings for a test run `examples` times under the ci profile."""
    return settings(max_examples=examples * _SCALE, deadline=None, derandomize=PROFILE == "ci",
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# ------------------------------------------------------------------------------ configurations
# Every HGTConfig option and what is drawn for it (one line per option).
CONFIG_OPTIONS = {
    "transform": st.sampled_from(TRANSFORMS),
    "group_rule": st.sampled_from(GROUP_RULES),
    "shuffle": st.booleans(),
    "norm": st.sampled_from(NORMS),
    "act": st.sampled_from(ACTS),
    "dropout": st.sampled_from([0.0, 0.0, 0.2, 0.5]),
    "align": st.sampled_from([1, 2, 3, 8]),
    "reduce_norm": st.booleans(),
    "reduce_act": st.booleans(),
    "output_layer": st.booleans(),
    "width_rounding": st.sampled_from(["exact", "truncate"]),
}

# DeFINE options beyond the HGTConfig ones (one line per option; padding_idx is drawn per V).
MODULE_OPTIONS = {
    "in_proj_dim": st.sampled_from([None, None, 4, 8]),
    "scale_map": st.booleans(),
    "map_dropout": st.sampled_from([0.0, 0.0, 0.3]),
    "sparse": st.booleans(),
    "cache_chunk_size": st.sampled_from([1, 3, 7, 4096]),
    "in_proj_dropout": st.sampled_from([0.0, 0.0, 0.3]),
    "zero_padding_output": st.booleans(),
    "init": st.sampled_from(["spec", "xavier_3d"]),
    "activations": st.sampled_from(["recompute", "save", "auto"]),
}

# Dtypes drawn for inputs; each backend runs the ones it declares (bf16 on cpu_cpp, once it
# declares it, is fuzzed without a change here).
FUZZ_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@st.composite
def hgt_configs(draw, max_width: int = 24, max_depth: int = 3, in_proj: bool = False) -> HGTConfig:
    """An HGTConfig over every option, with odd widths (align 1 or 3, odd out_dim); with
    in_proj, also an in-proj layer 0 (op input width 1..9, its own dropout) half the time."""
    options = {name: draw(strategy) for name, strategy in CONFIG_OPTIONS.items()}
    if in_proj and draw(st.booleans()):
        options["in_proj_from"] = draw(st.integers(1, 9))
        options["in_proj_dropout"] = draw(st.sampled_from([0.0, 0.3]))
    max_groups = draw(st.sampled_from([1, 2, 4]))
    in_dim = max_groups * draw(st.integers(1, max(1, max_width // (2 * max_groups))))
    expand_dim = draw(st.integers(in_dim, in_dim + max_width))
    out_dim = draw(st.integers(1, 13))
    depth = draw(st.integers(1, max_depth))
    config = HGTConfig(in_dim, expand_dim, out_dim, depth, max_groups, **options)
    # LayerNorm over a one-feature group is constant (= its bias); its gradient is 0 analytically
    # but rsqrt(eps) ~ 316 amplifies fp32 rounding to ~3e-5 there: ill-conditioned, not compared.
    assume(all(config.layer_has_norm(i) is False or layer.out_features // layer.groups >= 2
               for i, layer in enumerate(config.layers)))
    return config


def id_tensor(draw, num_embeddings: int, shape, id_dtype, must_include=()) -> torch.Tensor:
    """ids of `shape` with repeats, containing V-1 and `must_include` where there is room."""
    count = 1
    for size in shape:
        count *= size
    values = draw(st.lists(st.integers(0, num_embeddings - 1), min_size=count, max_size=count))
    specials = [num_embeddings - 1, *must_include]
    for position, value in enumerate(specials[:count]):
        values[(position * 7) % count] = value
    return torch.tensor(values, dtype=torch.int64).reshape(shape).to(id_dtype)


def id_shapes(max_tokens: int = 12):
    """Empty, single-token, 1-D, 2-D and 3-D shapes."""
    return st.one_of(
        st.just((0,)), st.just((1,)), st.just((2, 0)),
        st.tuples(st.integers(1, max_tokens)),
        st.tuples(st.integers(1, 4), st.integers(1, 4)),
        st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(1, 3)),
    )


def non_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The same values in a strided view (every other column of a wider buffer)."""
    if tensor.dim() == 0 or tensor.numel() == 0:
        return tensor
    wide = torch.zeros(*tensor.shape[:-1], 2 * tensor.shape[-1], dtype=tensor.dtype)
    wide[..., ::2] = tensor
    view = wide[..., ::2]
    assert not view.is_contiguous() or tensor.shape[-1] == 1
    return view


def random_params(config: HGTConfig, generator: torch.Generator) -> List[torch.Tensor]:
    """fp64 parameters away from the init: non-trivial biases and norm affines."""
    params = []
    for shape in config.param_shapes():
        if len(shape) == 1:  # norm affine
            params.append(1.0 + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64))
        else:
            params.append(0.5 * torch.randn(shape, generator=generator, dtype=torch.float64))
    return params


def runnable_backends(x: torch.Tensor, ids: Optional[torch.Tensor], config: HGTConfig,
                      names=None) -> List[str]:
    """Backends that can run these inputs here (their own declared devices/dtypes/reasons)."""
    names = names or [b.name for b in backends.backends_by_priority()]
    inputs = backends.OpInputs(x, ids, [], config, 1.0, None)
    return [name for name in names if not backends._REGISTRY[name].not_supported_reasons(inputs)]
