"""`python -m bench.resource_report`: compile-time resource usage of every GPU kernel, no GPU needed.

Per kernel and config (Triton: every forward autotune config and the backward kernels of every
layer, and the LM-head loss's two kernels (bench/resource_lm_head.py); CUDA: every kernel instantiation of every csrc/cuda/*.cu, for sm_90 -- what the build's
TORCH_CUDA_ARCH_LIST 9.0 ships for H100/H200 -- and sm_90a), for bf16/fp16/fp32 and the
standard workloads (define_kernels/workloads.py): registers, spilled bytes, shared memory,
blocks/SM and occupancy on H100/H200 (sm_90), the tensor-core instruction kind (wgmma /
mma.sync / none, from the PTX or SASS) and the per-call forward scratch bytes. Writes
bench/results/resource_<date>_<commit>.{csv,md} (or --out DIR).

Needs a CUDA build of torch with triton (compiling for a GPUTarget needs no GPU) and, for the
CUDA rows, nvcc (found as the JIT build finds it) plus the cuobjdump/nvdisasm triton ships.
The gate (python_tests/test_cuda_compile.py, `--gate` here) fails on any spill, on a bf16/fp16
Triton GEMM config that does not use wgmma on sm_90, on a bf16/fp16 CUDA GEMM kernel without
cp.async operand staging (no LDGSTS in its SASS), and on scratch above L2_BUDGET_BYTES in the
kernels that claim it stays L2-resident (column l2_resident: the CUDA forward's global-scratch
mode, whose grid is capped to the budget and walks the tiles in waves). The Triton forward's
scratch (z and h for all T rows) makes no such claim: it is reported, not gated.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

from define_kernels.workloads import WORKLOADS

# sm_90 (H100 / H200) per-SM limits.
SM90 = dict(regs=65536, smem=228 * 1024, smem_per_block_max=227 * 1024, threads=2048, blocks=32,
            smem_reserved_per_block=1024, sms=132)
CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
# sm_90 is the code the build ships for H100/H200 (TORCH_CUDA_ARCH_LIST 9.0); sm_90a for comparison.
CUDA_ARCHS = ("sm_90", "sm_90a")
# The L2 budget, stated once: H100/H200 report 50 MiB of L2 (cudaDevAttrL2CacheSize) and the CUDA
# forward lets its global scratch take kL2BudgetFraction of it (csrc/cuda/hgt_device.cuh, read from
# there so the two never drift apart); the rest holds weights, map rows and y on their way out.
L2_BYTES = 50 * 2**20


def _l2_budget_fraction() -> float:
    text = (CUDA_DIR / "hgt_device.cuh").read_text()
    match = re.search(r"constexpr double kL2BudgetFraction = ([0-9.]+);", text)
    if not match:
        raise RuntimeError("kL2BudgetFraction not found in csrc/cuda/hgt_device.cuh")
    return float(match.group(1))


L2_BUDGET_FRACTION = _l2_budget_fraction()
L2_BUDGET_BYTES = int(L2_BYTES * L2_BUDGET_FRACTION)
DTYPES = {"bfloat16": ("bf16", 2), "float16": ("fp16", 2), "float32": ("fp32", 4)}
FIELDS = ["backend", "kernel", "workload", "dtype", "config", "threads", "registers", "spill_bytes",
          "smem_bytes", "blocks_per_sm", "occupancy", "tensor_core", "is_gemm", "scratch_bytes",
          "l2_resident", "async_copy", "compile_s"]


@dataclasses.dataclass
class Row:
    backend: str
    kernel: str
    workload: str
    dtype: str
    config: str
    threads: int
    registers: int
    spill_bytes: int
    smem_bytes: int
    blocks_per_sm: int = 0
    occupancy: float = 0.0
    tensor_core: str = "none"
    is_gemm: bool = False
    scratch_bytes: int = 0
    l2_resident: bool = False  # the kernel claims its scratch stays in L2: gated on L2_BUDGET_BYTES
    async_copy: bool = False   # global -> shared copies without registers (SASS LDGSTS / PTX cp.async)
    compile_s: float = 0.0

    def __post_init__(self):
        self.blocks_per_sm = blocks_per_sm(self.registers, self.threads, self.smem_bytes)
        self.occupancy = round(self.blocks_per_sm * self.threads / SM90["threads"], 3)


def blocks_per_sm(registers: int, threads: int, smem_bytes: int) -> int:
    """Resident CTAs per sm_90 SM: registers (allocated per warp in units of 256), shared memory
    (plus 1 KB the runtime reserves per CTA), threads and the 32-CTA cap."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = SM90["regs"] // (regs_per_warp * warps)
    by_smem = SM90["smem"] // (smem_bytes + SM90["smem_reserved_per_block"])
    return max(0, min(by_regs, by_smem, SM90["threads"] // threads, SM90["blocks"]))


def tensor_core_kind(text: str) -> str:
    """From PTX (wgmma.mma_async / mma.sync) or SASS (HGMMA / HMMA)."""
    if "wgmma.mma_async" in text or "HGMMA" in text:
        return "wgmma"
    if re.search(r"\bmma\.sync|\bwmma\.mma|HMMA", text):
        return "mma.sync"
    return "none"


def _triton_tools() -> Path:
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def cubin_resources(cubin: bytes) -> Dict[str, dict]:
    """{function: {registers, spill_bytes (LOCAL + STACK), static_smem}} via cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([str(_triton_tools() / "cuobjdump"), "-res-usage", handle.name],
                              capture_output=True, text=True, check=True).stdout
    return parse_res_usage(text)


def parse_res_usage(text: str) -> Dict[str, dict]:
    result, name = {}, None
    for line in text.splitlines():
        match = re.match(r"\s*Function (\S+):", line)
        if match:
            name = match.group(1)
            continue
        match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if match and name:
            reg, stack, shared, local = map(int, match.groups())
            result[name] = dict(registers=reg, spill_bytes=stack + local, static_smem=shared)
    return result


# ------------------------------------------------------------------------------- Triton
def _compile_triton(kernel, types: dict, constexprs: dict, num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    source = ASTSource(kernel, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _triton_row(compiled, kernel_name, workload, dtype, config, num_warps, is_gemm, scratch, seconds):
    resources = next(iter(cubin_resources(compiled.asm["cubin"]).values()))
    print(f"  triton {kernel_name} {workload} {dtype} {config}: {resources['registers']} regs, "
          f"{resources['spill_bytes']} B spilled, {seconds:.1f} s", flush=True)  # progress: a CI log shows where the time goes
    return Row("triton", kernel_name, workload, dtype, config, 32 * num_warps, resources["registers"],
               resources["spill_bytes"], int(compiled.metadata.shared) + resources["static_smem"],
               tensor_core=tensor_core_kind(compiled.asm["ptx"]), is_gemm=is_gemm,
               scratch_bytes=scratch, async_copy="cp.async" in compiled.asm["ptx"],
               compile_s=round(seconds, 2))


def triton_forward_scratch(config, dtype: str, tokens: int) -> int:
    """Bytes of z (fp32) + h (ping-pong, dtype) the fused forward allocates for `tokens` rows."""
    from define_kernels.backends import triton_hgt
    layout = triton_hgt.stack_layout(config, False)
    return tokens * (layout["z_width"] * 4 + layout["h_width"] * DTYPES[dtype][1])


def triton_rows_parallel(workloads: List[str], dtypes, all_configs_for, backward_for, jobs: int,
                         all_configs_workloads: Optional[List[str]] = None,
                         backward_everywhere_for: Optional[Iterable[str]] = None) -> List[Row]:
    """triton_rows over the workloads with distinct stacks, one (workload, dtype) per task, `jobs`
    processes at a time; a workload whose HGTConfig equals an earlier one (wt2-small =
    wt103-base) reuses its rows, with its own token count in the scratch column.
    all_configs_workloads (None: all) are the workloads that get the full treatment: every forward
    autotune config of the dtypes in all_configs_for and the backward of every dtype in
    backward_for. The others compile the pinned forward tile and the backward only of the dtypes
    also in backward_everywhere_for (None: all of backward_for) -- CI: every dtype's kernels at
    wt103-base, the other workloads' layer shapes in bf16 (the 16-bit backward kernels of fp16 and
    bf16 are the same tiles), within its time budget."""
    from concurrent.futures import ProcessPoolExecutor
    by_config: Dict[object, List[str]] = {}
    for name in workloads:
        by_config.setdefault(WORKLOADS[name].config(), []).append(name)
    everywhere = set(backward_for if backward_everywhere_for is None else backward_everywhere_for)
    args, owners = [], []
    for names in by_config.values():
        full = all_configs_workloads is None or any(n in all_configs_workloads for n in names)
        for dtype in dtypes:
            backward = dtype in backward_for and (full or dtype in everywhere)
            args.append(([names[0]], [dtype], [dtype] if full and dtype in all_configs_for else [],
                         [dtype] if backward else []))
            owners.append(names)
    if jobs > 1 and len(args) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            computed = list(pool.map(_triton_rows_star, args))
    else:
        computed = [_triton_rows_star(a) for a in args]
    rows = []
    for names in by_config.values():  # workload-major order, as before the per-dtype split
        for name in names:
            for owner, first_rows in zip(owners, computed):
                if owner is not names:
                    continue
                for row in first_rows:
                    scratch = row.scratch_bytes and triton_forward_scratch(
                        WORKLOADS[name].config(), row.dtype, WORKLOADS[name].tokens_per_batch)
                    rows.append(dataclasses.replace(row, workload=name, scratch_bytes=scratch))
    return rows


def _triton_rows_star(args) -> List[Row]:
    return triton_rows(*args)


def triton_rows(workloads: Iterable[str], dtypes: Iterable[str], all_configs_for: Iterable[str],
                backward_for: Iterable[str] = tuple(DTYPES)) -> List[Row]:
    """Forward: every autotune config (of that dtype) for the dtypes in all_configs_for, the pinned
    deterministic tile for the others; backward (dtypes in backward_for): the fixed tiles of every layer
    (identical shapes compiled once)."""
    from define_kernels.backends import triton_hgt
    from define_kernels.backends.triton_kernels.backward import (epilogue_backward_kernel,
                                                                 input_grad_kernel, weight_grad_kernel)
    from define_kernels.backends.triton_kernels.forward import hgt_forward_kernel
    rows, seen = [], set()
    for name in workloads:
        workload = WORKLOADS[name]
        config = workload.config()
        layout = triton_hgt.stack_layout(config, False)
        tables = {k: v for k, v in layout.items() if k not in ("z_width", "h_width", "num_params")}
        for dtype in dtypes:
            t, tp = DTYPES[dtype][0], f"*{DTYPES[dtype][0]}"
            precision = "ieee" if dtype == "float32" else "tf32"
            types = dict(x_ptr=tp, ids_ptr="*i64", params_ptr=tp, z_ptr="*fp32", h_ptr=tp, y_ptr=tp,
                         bases_ptr="*i64", T="i32", stride_x="i32", stride_z="i32", stride_h="i32",
                         scale="fp32", threshold="i32", drop_scale="fp32", proj_threshold="i32",
                         proj_drop_scale="fp32")
            if dtype in all_configs_for:
                tiles = [(dict(c.kwargs), c.num_warps, c.num_stages)
                         for c in triton_hgt.forward_configs(getattr(torch, dtype))]
            else:
                pinned = triton_hgt.deterministic_tiles(getattr(torch, dtype))
                tiles = [(pinned, pinned.pop("num_warps"), pinned.pop("num_stages"))]
            scratch = triton_forward_scratch(config, dtype, workload.tokens_per_batch)
            for tile, warps, stages in tiles:
                constexprs = dict(tables, HAS_IDS=True, DROPOUT=True, DOT_PRECISION=precision, **tile)
                started = time.perf_counter()
                compiled = _compile_triton(hgt_forward_kernel, types, constexprs, warps, stages)
                label = f"T{tile['BLOCK_T']}xN{tile['BLOCK_N']}xK{tile['BLOCK_K']} w{warps} s{stages}"
                rows.append(_triton_row(compiled, "hgt_forward", name, dtype, label, warps, True,
                                        scratch, time.perf_counter() - started))
            if dtype in backward_for:
                rows += _triton_backward_rows(config, name, dtype, t, precision, seen,
                                              (epilogue_backward_kernel, weight_grad_kernel, input_grad_kernel))
    return rows


def _triton_backward_rows(config, name, dtype, t, precision, seen, kernels) -> List[Row]:
    from define_kernels.backends import triton_hgt
    epilogue, weight_grad, input_grad = kernels
    layout = triton_hgt.stack_layout(config, True)
    tiles = triton_hgt.backward_tiles(getattr(torch, dtype))  # as triton_hgt's backward launches them
    blocks = {k: tiles[k] for k in ("BLOCK_T", "BLOCK_N", "BLOCK_K")}
    gemm_label = f"T{blocks['BLOCK_T']}xN{blocks['BLOCK_N']}xK{blocks['BLOCK_K']}"
    launch = {"epilogue_backward": (tiles["epilogue_warps"],
                                    f"T{blocks['BLOCK_T']}xN{tiles['epilogue_block_n']}"),
              "weight_grad": (tiles["num_warps"], gemm_label),
              "input_grad": (tiles["input_grad_warps"], gemm_label)}
    rows = []
    for index, layer in enumerate(config.layers):
        last = index == len(config.layers) - 1
        shape = dict(P=config.in_dim, A=layer.in_features, W=layer.out_features, G=layer.groups,
                     KIND=layout["KINDS"][index], WP=layout["PREV_W"][index], DOT_PRECISION=precision)
        specs = [
            ("epilogue_backward", epilogue, False,
             dict(dh_ptr=f"*{t}" if last else "*fp32", z_ptr="*fp32", params_ptr=f"*{t}", dz_ptr="*fp32",
                  dgamma_ptr="*fp32", dbeta_ptr="*fp32", ids_ptr="*i64", bases_ptr="*i64", T="i32",
                  stride_dh="i32", stride_z="i32", stride_dz="i32", threshold="i32", drop_scale="fp32"),
             dict(LAYER=index, G=layer.groups, C=layer.out_features // layer.groups,
                  HAS_NORM=bool(config.layer_has_norm(index)), ACT=layout["ACTS"][index],
                  NW_OFF=layout["NW_OFF"][index], NB_OFF=layout["NB_OFF"][index], HAS_IDS=True,
                  SHUFFLE=config.shuffle, DROPOUT=True, BLOCK_T=blocks["BLOCK_T"],
                  BLOCK_N=tiles["epilogue_block_n"])),
            ("weight_grad", weight_grad, True,
             dict(x_ptr=f"*{t}", ids_ptr="*i64", hin_ptr=f"*{t}", dz_ptr="*fp32", dw_ptr="*fp32", T="i32",
                  tokens_per_split="i32", stride_x="i32", stride_h="i32", stride_dz="i32", scale="fp32"),
             dict(shape, HAS_IDS=True, **blocks)),
            ("input_grad", input_grad, True,
             dict(dz_ptr="*fp32", params_ptr=f"*{t}", dx_ptr="*fp32", dhin_ptr="*fp32", T="i32",
                  stride_dz="i32", stride_dx="i32", stride_dh="i32"),
             dict(shape, W_OFF=layout["W_OFF"][index], **blocks)),
        ]
        for kernel_name, kernel, is_gemm, types, constexprs in specs:
            # W_OFF / NW_OFF only move a base pointer: key on the shapes, compile each once
            key = (kernel_name, dtype, tuple(sorted((k, v) for k, v in constexprs.items()
                                                    if k not in ("W_OFF", "NW_OFF", "NB_OFF", "LAYER"))))
            if key in seen:
                continue
            seen.add(key)
            warps, label = launch[kernel_name]
            started = time.perf_counter()
            compiled = _compile_triton(kernel, types, constexprs, warps, 3)
            rows.append(_triton_row(compiled, f"{kernel_name} L{index}", name, dtype, f"{label} w{warps}",
                                    warps, is_gemm, 0, time.perf_counter() - started))
    return rows


# ------------------------------------------------------------------------------- CUDA
_CUDA_TYPES = {"float": "float32", "__half": "float16", "__nv_bfloat16": "bfloat16"}
_CUDA_GEMMS = ("hgt_forward_kernel", "hgt_wgrad_kernel", "hgt_dgrad_kernel")
TILE_ROWS = 64  # kBM of csrc/cuda/hgt_device.cuh: the forward's token tile


def _align256(n: int) -> int:
    return -(-n // 256) * 256


def forward_grid(rows: int, tile: int, sms: int, blocks_per_sm: int, scratch_in_global: bool,
                 scratch_per_cta_bytes: int, l2_budget_bytes: int) -> int:
    """Mirror of define_kernels::hgt_forward_grid (csrc/include/define_kernels/hgt_index_math.h,
    tested on the CPU in python_tests/test_index_math.py): the persistent grid, capped in
    global-scratch mode so all CTAs' slices fit the L2 budget; tiles then run in waves."""
    grid = sms * (blocks_per_sm if blocks_per_sm > 0 else 1)
    if scratch_in_global and scratch_per_cta_bytes > 0:
        grid = min(grid, l2_budget_bytes // scratch_per_cta_bytes)
    grid = min(grid, -(-rows // tile))
    return max(grid, 1)


def cuda_forward_smem(config, dtype: str) -> tuple:
    """(dynamic shared memory per CTA, activation bytes per 64-token tile, acts in smem?) as
    plan_hgt_forward (csrc/cuda/hgt_forward.cu) sets them: the GemmSmem staging tiles
    (a[64][40], b[32][72] of T, c[64][68] fp32), plus x and two max-width activations when those
    fit under the 227 KB opt-in limit. Keep in step with GemmSmem and plan_hgt_forward."""
    size = DTYPES[dtype][1]
    gemm_smem = (64 * 40 + 32 * 72) * size + 64 * 68 * 4
    widest = max(layer.out_features for layer in config.layers)
    acts = TILE_ROWS * (config.in_dim + 2 * widest) * size
    in_smem = gemm_smem + acts <= SM90["smem_per_block_max"]
    return gemm_smem + (acts if in_smem else 0), acts, in_smem


def cuda_forward_plan(config, dtype: str, tokens: int, registers: int) -> dict:
    """plan_hgt_forward for an H100/H200 (132 SMs, 50 MiB L2): CTAs/SM from the registers and
    shared memory (cudaOccupancyMaxActiveBlocksPerMultiprocessor), the grid from forward_grid,
    and the global scratch = one 256-byte-aligned activation slice per CTA (0 in smem mode)."""
    smem, acts, in_smem = cuda_forward_smem(config, dtype)
    per_sm = blocks_per_sm(registers, 256, smem)
    grid = forward_grid(tokens, TILE_ROWS, SM90["sms"], per_sm, not in_smem, _align256(acts), L2_BUDGET_BYTES)
    tiles = -(-tokens // TILE_ROWS)
    return dict(smem=smem, grid=grid, waves=-(-tiles // grid), scratch=0 if in_smem else _align256(acts) * grid)


def _nvcc_cubin(nvcc: str, source: Path, arch: str, out_dir: Path) -> tuple:
    cubin = out_dir / f"{source.stem}_{arch}.cubin"
    started = time.perf_counter()
    result = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-O3", "-std=c++17", f"-I{source.parent}",
                             f"-I{source.parents[1] / 'include'}", str(source), "-o", str(cubin)],
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"nvcc failed on {source.name} for {arch}:\n{result.stderr[-4000:]}")
    return source, arch, cubin, time.perf_counter() - started


def cuda_rows(workloads: Iterable[str], dtypes: Iterable[str], jobs: int = 1,
              archs: Iterable[str] = CUDA_ARCHS) -> List[Row]:
    """nvcc -cubin of every csrc/cuda/*.cu for each arch (`jobs` at a time); per instantiated
    kernel: cuobjdump resources, tensor-core kind from its SASS. The kernels are generic over the
    layer table, so the workload only changes the forward's plan (smem, grid, waves, scratch)."""
    from concurrent.futures import ThreadPoolExecutor
    from define_kernels.backends import cuda_toolkit
    toolkit = cuda_toolkit.find_toolkit()
    if not toolkit.root:
        raise RuntimeError(f"no CUDA toolkit: {toolkit.reason}")
    sources = sorted(CUDA_DIR.glob("*.cu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs = [(source, arch) for source in sources for arch in archs]
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            built = list(pool.map(lambda pair: _nvcc_cubin(toolkit.nvcc, *pair, Path(tmp)), pairs))
        for source, arch, cubin, seconds in built:
            print(f"  cuda {source.name} {arch}: {seconds:.1f} s", flush=True)
            rows += _cuda_cubin_rows(cubin, source.name, arch, workloads, dtypes, seconds)
    return rows


def _cuda_cubin_rows(cubin: Path, source: str, arch: str, workloads, dtypes, seconds) -> List[Row]:
    resources = cubin_resources(cubin.read_bytes())
    sass = subprocess.run([str(_triton_tools() / "cuobjdump"), "-sass", str(cubin)],
                          capture_output=True, text=True, check=True).stdout
    per_function = dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S))
    names = dict(zip(resources, subprocess.run(["c++filt"], input="\n".join(resources), capture_output=True,
                                               text=True).stdout.split("\n")))
    rows = []
    for mangled, res in resources.items():
        pretty = names.get(mangled, mangled)
        match = re.search(r"(\w+)(?:<[^()]*>)?\(", pretty)  # the name before the template args
        kernel = match.group(1) if match else pretty
        types = [v for k, v in _CUDA_TYPES.items() if re.search(rf"\b{re.escape(k)}\b", pretty)]
        dtype = types[0] if types else "any"
        if dtype not in dtypes and dtype != "any":
            continue
        for name in workloads:
            config, tokens = WORKLOADS[name].config(), WORKLOADS[name].tokens_per_batch
            label, smem, scratch = f"{arch} 256 thr", res["static_smem"], 0
            if kernel == "hgt_forward_kernel" and dtype != "any":
                plan = cuda_forward_plan(config, dtype, tokens, res["registers"])
                smem += plan["smem"]  # dynamic: GemmSmem (+ the activation tiles in smem mode)
                scratch = plan["scratch"]
                label += f", grid {plan['grid']} x {plan['waves']} waves"
            rows.append(Row("cuda", kernel, name, dtype, label, 256, res["registers"], res["spill_bytes"],
                            smem, tensor_core=tensor_core_kind(per_function.get(mangled, "")),
                            is_gemm=kernel in _CUDA_GEMMS, scratch_bytes=scratch, l2_resident=scratch > 0,
                            async_copy="LDGSTS" in per_function.get(mangled, ""),
                            compile_s=round(seconds, 2)))
    return rows


# ------------------------------------------------------------------------------- gate + output
def gate_failures(rows: List[Row]) -> List[str]:
    """Why the report fails the gate (empty list: passes)."""
    failures = []
    for row in rows:
        where = f"{row.backend} {row.kernel} {row.workload} {row.dtype} {row.config}"
        if row.spill_bytes:
            failures.append(f"{where}: spills {row.spill_bytes} bytes")
        if row.backend == "triton" and row.is_gemm and row.dtype != "float32" and row.tensor_core != "wgmma":
            failures.append(f"{where}: GEMM uses {row.tensor_core}, not wgmma, on sm_90")
        if (row.backend == "cuda" and row.is_gemm and row.dtype in ("bfloat16", "float16")
                and not row.async_copy):
            failures.append(f"{where}: GEMM operands not staged with cp.async (no LDGSTS)")
        if row.l2_resident and row.scratch_bytes > L2_BUDGET_BYTES:
            failures.append(f"{where}: L2-resident scratch {row.scratch_bytes / 2**20:.1f} MiB > L2 budget "
                            f"{L2_BUDGET_BYTES / 2**20:.1f} MiB")
    return failures


def write(rows: List[Row], out_dir: Path, stem: str) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(dataclasses.asdict(row))
    lines = [f"Static resources on sm_90 (H100/H200: 64K registers, 228 KB shared memory, 2048 threads "
             f"per SM); scratch = forward per-call scratch; gated against the L2 budget "
             f"({L2_BUDGET_FRACTION} x {L2_BYTES / 2**20:.0f} MiB = {L2_BUDGET_BYTES / 2**20:.1f} MiB) only where "
             f"the kernel claims L2 residency (L2 = yes).", "",
             "| backend | kernel | workload | dtype | config | regs | spill B | smem KB | CTAs/SM | occupancy "
             "| tensor cores | cp.async | scratch MiB | L2 |", "|" + "---|" * 14]
    for r in rows:
        lines.append(f"| {r.backend} | {r.kernel} | {r.workload} | {r.dtype} | {r.config} | {r.registers} | "
                     f"{r.spill_bytes} | {r.smem_bytes / 1024:.1f} | {r.blocks_per_sm} | {r.occupancy:.0%} | "
                     f"{r.tensor_core} | {'yes' if r.async_copy else '-'} | {r.scratch_bytes / 2**20:.1f} | "
                     f"{'yes' if r.l2_resident else '-'} |")
    failures = gate_failures(rows)
    lines += ["", f"Gate: {'PASS' if not failures else f'{len(failures)} failure(s)'}"]
    lines += [f"- {failure}" for failure in failures]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def summary_table(rows: List[dict], workload: str = "wt103-base", dtype: str = "bfloat16") -> str:
    """The README's table: one workload and dtype, backward layers folded into their worst row
    (most spilled bytes, then most registers). `rows` as read back from the CSV."""
    picked: Dict[tuple, dict] = {}
    for row in rows:
        if row["workload"] != workload or row["dtype"] not in (dtype, "any"):
            continue
        key = (row["backend"], row["kernel"].split(" L")[0], row["config"])
        rank = (int(row["spill_bytes"]), int(row["registers"]))
        if key not in picked or rank > (int(picked[key]["spill_bytes"]), int(picked[key]["registers"])):
            picked[key] = row
    lines = ["| backend | kernel | config | regs | spill B | smem KB | CTAs/SM | occupancy | tensor cores "
             "| cp.async | fwd scratch MiB | L2-resident (gated) |", "|" + "---|" * 12]
    for (backend, kernel, config), r in picked.items():
        lines.append(f"| {backend} | {kernel}{' (worst layer)' if ' L' in r['kernel'] else ''} | {config} | "
                     f"{r['registers']} | {r['spill_bytes']} | {int(r['smem_bytes']) / 1024:.1f} | "
                     f"{r['blocks_per_sm']} | {float(r['occupancy']):.0%} | {r['tensor_core']} | "
                     f"{'yes' if r.get('async_copy') == 'True' else '-'} | {int(r['scratch_bytes']) / 2**20:.1f} | {'yes' if r.get('l2_resident') == 'True' else '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resource_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated workload names")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--all-configs-for", default="bfloat16,float16,float32",
                        help="dtypes whose forward is compiled for every autotune config (the others: "
                             "the pinned deterministic tiles)")
    parser.add_argument("--all-configs-workloads", default="",
                        help="comma-separated workloads whose forward gets every autotune config "
                             "(default: all; the others the pinned tiles)")
    parser.add_argument("--backends", default="triton,cuda,lm_head",
                        help="triton (HGT), cuda (HGT), lm_head (the LM-head loss's Triton kernels)")
    parser.add_argument("--backward-for", default="bfloat16,float16,float32",
                        help="dtypes whose Triton backward kernels are compiled ('' for none)")
    parser.add_argument("--backward-everywhere-for", default=None,
                        help="of --backward-for, the dtypes whose backward is also compiled at the "
                             "workloads outside --all-configs-workloads (default: all of them)")
    parser.add_argument("--out", default=os.environ.get("DEFINE_RESULTS_DIR", str(Path(__file__).parent / "results")))
    parser.add_argument("--stem", default=None, help="file name stem (default resource_<date>_<commit>)")
    parser.add_argument("--gate", action="store_true", help="exit 1 when the gate fails")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel compiles (Triton: one workload per process; CUDA: nvcc runs)")
    parser.add_argument("--cuda-archs", default=",".join(CUDA_ARCHS), help="nvcc -arch values for the CUDA rows")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    for name in workloads:
        if name not in WORKLOADS:
            parser.error(f"--workloads: unknown workload {name!r} (one of {sorted(WORKLOADS)})")
    dtypes = [d for d in args.dtypes.split(",") if d]
    for dtype in dtypes:
        if dtype not in DTYPES:
            parser.error(f"--dtypes: unknown dtype {dtype!r} (one of {sorted(DTYPES)})")
    rows: List[Row] = []
    for backend in args.backends.split(","):
        started = time.perf_counter()
        if backend == "triton":
            every = [w for w in args.all_configs_workloads.split(",") if w] or None
            everywhere = None if args.backward_everywhere_for is None else [
                d for d in args.backward_everywhere_for.split(",") if d]
            rows += triton_rows_parallel(workloads, dtypes, args.all_configs_for.split(","),
                                         args.backward_for.split(","), args.jobs, every, everywhere)
        elif backend == "cuda":
            rows += cuda_rows(workloads, dtypes, args.jobs, [a for a in args.cuda_archs.split(",") if a])
        elif backend == "lm_head":
            from bench.resource_lm_head import lm_head_rows
            rows += lm_head_rows(dtypes)
        else:
            parser.error(f"--backends: unknown backend {backend!r} (triton, cuda, lm_head)")
        print(f"resource_report: {backend} compiled in {time.perf_counter() - started:.1f} s", flush=True)
    from bench import report
    stem = args.stem or f"resource_{time.strftime('%Y-%m-%d')}_{report.commit_id()}"
    for path in write(rows, Path(args.out), stem):
        print(f"resource_report: wrote {path}")
    failures = gate_failures(rows)
    print(f"resource_report: gate {'PASS' if not failures else 'FAIL'} ({len(failures)} failure(s))")
    for failure in failures:
        print(f"  {failure}")
    return 1 if failures and args.gate else 0


if __name__ == "__main__":
    sys.exit(main())
