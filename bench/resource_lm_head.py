"""The LM-head `triton` backend's kernels in the sm_90a resource report (bench.resource_report).

Both kernels (define_kernels/lm_head/triton_kernels.py) are compiled at the launch tiles of
triton_backend.GPU_TILES for every dtype, in two specializations: plain cross-entropy without a
bias (the common path) and the augmented loss with a bias (the most live values). The shape
enters only through the scratch column: one vocabulary chunk of logits (and of similarity logits
for the augmented loss) at n = 128, V = 267,735 (wt103-base) and T = 8,192 tokens. Neither kernel
has a tl.dot (the GEMMs are torch.mm), so none is a GEMM row for the wgmma rule.
"""
from __future__ import annotations

import time
from typing import Iterable, List

WORKLOAD = "lm-head wt103-base n=128"
VOCAB, TOKENS = 267_735, 8_192
_TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
VARIANTS = {"ce": dict(HAS_BIAS=False, AUGMENTED=False), "augmented+bias": dict(HAS_BIAS=True, AUGMENTED=True)}


def _signatures(t: str) -> dict:
    scalars = dict(N="i32", VC="i32", first_col="i32", stride_z="i32", stride_s="i32")
    return {
        "lm_head_stats": dict(z_ptr=f"*{t}", s_ptr=f"*{t}", s_rows_ptr="*i64", bias_ptr="*fp32", targets_ptr="*i64",
                              state_ptr="*fp32", stride_state="i32", inv_tau="fp32", **scalars),
        "lm_head_grad": dict(z_ptr=f"*{t}", s_ptr=f"*{t}", s_rows_ptr="*i64", bias_ptr="*fp32", targets_ptr="*i64",
                             stats_ptr="*fp32", grad_ptr="*fp32", partial_ptr="*fp32", stride_stats="i32",
                             stride_partial="i32", vocab="fp32", smoothing="fp32", z_loss="fp32",
                             kl_coef_over_tau="fp32", inv_tau="fp32", **scalars),
    }


def lm_head_rows(dtypes: Iterable[str]) -> List:
    import torch
    from bench.resource_report import _compile_triton, _triton_row
    from define_kernels.lm_head import LMHeadSpec, triton_kernels, triton_backend
    kernels = {"lm_head_stats": (triton_kernels.lm_head_stats_kernel, triton_backend.GPU_TILES["stats"]),
               "lm_head_grad": (triton_kernels.lm_head_grad_kernel, triton_backend.GPU_TILES["grad"])}
    rows = []
    for dtype in dtypes:
        signatures = _signatures(_TRITON_TYPES[dtype])
        for name, (kernel, tiles) in kernels.items():
            launch = {k: v for k, v in tiles.items() if k not in ("num_warps", "num_stages")}
            for variant, flags in VARIANTS.items():
                started = time.perf_counter()
                compiled = _compile_triton(kernel, signatures[name], dict(launch, **flags),
                                           tiles["num_warps"], tiles["num_stages"])
                label = f"{variant} {tiles['BLOCK_N']}x{tiles['BLOCK_V']} w{tiles['num_warps']}"
                scratch = triton_backend.workspace_bytes(TOKENS, VOCAB, LMHeadSpec(alpha=float(flags["AUGMENTED"])),
                                                         getattr(torch, dtype))
                rows.append(_triton_row(compiled, name, WORKLOAD, dtype, label, tiles["num_warps"], False,
                                        scratch, time.perf_counter() - started))
    return rows
