"""`python -m bench.gpu_traffic`: L2 -> SM traffic of one forward, per design, from the shapes alone.

Item 4 of issue 12 asks whether the CUDA forward's weight re-reads (every 64-token tile streams
all weights from L2) can be avoided by a tile order, or need the split design. This counts the
bytes each option moves, for the docs/math.md §5 workloads at their token counts (wt103-*: 16,384),
16-bit operands. Arithmetic only (no GPU, no timing); bench/gpu_cuda_notes.md draws the
conclusions. Writes bench/results/gpu_traffic_<date>_<commit>.md (or --out DIR).

Per layer (a in, w out, g groups, c = w / g), T tokens, s = 2 bytes:
  fused (hgt_forward_kernel, 64 x 64 CTA tiles, K staged 32 at a time):
    weights   T/64 x a x c x s          every tile reads W_j once per group
    operand A T x a x s x ceil(c / 64)  the tile's u_j is re-staged for every 64-column block
    epilogue  5 x T x w x s             z written, read twice for the LN moments and once to
                                        normalize, h written (global-scratch mode: L2)
  fused, 128-token tiles: weights halve; A and epilogue as above; the per-CTA scratch doubles,
    so the L2 cap (bench/resource_report.forward_grid) halves the grid.
  split: layers with g > 1 fused as above; each g = 1 layer a GEMM over all tokens with
    BM x BN = 128 x 256 tiles: weights T/128 x a x w x s, operand A T x a x s x ceil(w / 256),
    its output and the next layer's operand through HBM (T x w x s written, read once; LN
    statistics as fp32 per-tile partials, 8 bytes per row and tile: negligible). Not counted:
    the last layer's LN + activation need one more pass over its output once all its column
    tiles are done (T x m x s read and written again: 34 MB at wt103-base), and the map-row
    gather (T x p x s, the same in every option).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from bench import resource_report
from define_kernels.workloads import WORKLOADS

S = 2  # bytes per 16-bit element


def fused_bytes(layer, tokens: int, bm: int = 64, bn: int = 64) -> dict:
    a, w, g = layer.in_features, layer.out_features, layer.groups
    c = w // g
    return dict(weights=tokens / bm * a * c * S, operand=tokens * a * S * math.ceil(c / bn),
                epilogue=5 * tokens * w * S, hbm=0.0)


def gemm_bytes(layer, tokens: int, bm: int = 128, bn: int = 256) -> dict:
    a, w = layer.in_features, layer.out_features
    return dict(weights=tokens / bm * a * w * S, operand=tokens * a * S * math.ceil(w / bn),
                epilogue=0.0, hbm=2 * tokens * w * S)


def options(config, tokens: int) -> dict:
    """{option: {weights, operand, epilogue, hbm}} summed over the layers, in bytes."""
    out = {}
    for name, per_layer in (
            ("fused, 64-token tiles (today)", lambda l: fused_bytes(l, tokens)),
            ("fused, 128-token tiles", lambda l: fused_bytes(l, tokens, bm=128)),
            ("split: g > 1 fused, g = 1 as 128 x 256 GEMMs",
             lambda l: fused_bytes(l, tokens) if l.groups > 1 else gemm_bytes(l, tokens))):
        total = dict(weights=0.0, operand=0.0, epilogue=0.0, hbm=0.0)
        for layer in config.layers:
            for key, value in per_layer(layer).items():
                total[key] += value
        out[name] = total
    return out


def grid_for(config, tokens: int, bm: int) -> int:
    """CUDA forward CTAs at bf16 (78 registers: 3 CTAs/SM) under the L2 cap, tiles of bm rows."""
    per_cta = resource_report._align256(bm * (config.in_dim + 2 * max(l.out_features for l in config.layers)) * S)
    return resource_report.forward_grid(tokens, bm, resource_report.SM90["sms"], 3, True, per_cta,
                                        resource_report.L2_BUDGET_BYTES)


def table(workloads) -> str:
    lines = ["| workload | T | weights MB | option | weights GB | operand A GB | epilogue GB | L2 -> SM GB "
             "| HBM MB | CUDA forward CTAs (L2 cap) |", "|" + "---|" * 10]
    for name in workloads:
        workload = WORKLOADS[name]
        config, tokens = workload.config(), workload.tokens_per_batch
        weight_mb = sum(l.in_features * l.out_features // l.groups for l in config.layers) * S / 1e6
        for option, b in options(config, tokens).items():
            l2 = b["weights"] + b["operand"] + b["epilogue"]
            ctas = {"fused, 64-token tiles (today)": grid_for(config, tokens, 64),
                    "fused, 128-token tiles": grid_for(config, tokens, 128)}.get(option, "-")
            lines.append(f"| {name} | {tokens:,} | {weight_mb:.2f} | {option} | {b['weights'] / 1e9:.2f} | "
                         f"{b['operand'] / 1e9:.2f} | {b['epilogue'] / 1e9:.2f} | {l2 / 1e9:.2f} | "
                         f"{b['hbm'] / 1e6:.0f} | {ctas} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_traffic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--out", default=os.environ.get("DEFINE_RESULTS_DIR", str(Path(__file__).parent / "results")))
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    for name in workloads:
        if name not in WORKLOADS:
            parser.error(f"--workloads: unknown workload {name!r} (one of {sorted(WORKLOADS)})")
    from bench import report
    text = ("L2 -> SM bytes of one forward (16-bit operands), by design; arithmetic from the shapes "
            "(bench/gpu_traffic.py docstring), no GPU.\n\n" + table(workloads) + "\n")
    print(text)
    path = Path(args.out) / f"gpu_traffic_{time.strftime('%Y-%m-%d')}_{report.commit_id()}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"gpu_traffic: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
