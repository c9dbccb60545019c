"""`python -m bench.resource_report`: compile-time resource usage of every GPU kernel, no GPU needed.

Per kernel and config (Triton: every forward autotune config and the backward kernels of every
layer; CUDA: every kernel instantiation of csrc/cuda/hgt_kernels.cu), for bf16/fp16/fp32 and the
standard workloads (define_kernels/workloads.py): registers, spilled bytes, shared memory,
blocks/SM and occupancy on H100/H200 (sm_90), the tensor-core instruction kind (wgmma /
mma.sync / none, from the PTX or SASS) and the per-call forward scratch bytes against the L2
budget. Writes bench/results/resource_<date>_<commit>.{csv,md} (or --out DIR).

Needs a CUDA build of torch with triton (compiling for a GPUTarget needs no GPU) and, for the
CUDA rows, nvcc (found as the JIT build finds it) plus the cuobjdump/nvdisasm triton ships.
The gate (python_tests/test_cuda_compile.py, `--gate` here) fails on any spill, on a bf16/fp16
Triton GEMM config that does not use wgmma on sm_90, and on forward scratch above L2_BUDGET_BYTES.
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
# Forward scratch the designs call "L2-resident" must fit here: H100/H200 have 50 MB of L2; half
# of it is left for the weights and the token-row traffic that share it.
L2_BUDGET_BYTES = 25 * 1024 * 1024
DTYPES = {"bfloat16": ("bf16", 2), "float16": ("fp16", 2), "float32": ("fp32", 4)}
FIELDS = ["backend", "kernel", "workload", "dtype", "config", "threads", "registers", "spill_bytes",
          "smem_bytes", "blocks_per_sm", "occupancy", "tensor_core", "is_gemm", "scratch_bytes",
          "compile_s"]


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
          f"{seconds:.1f} s", flush=True)  # progress: a CI log shows where the time goes
    return Row("triton", kernel_name, workload, dtype, config, 32 * num_warps, resources["registers"],
               resources["spill_bytes"], int(compiled.metadata.shared) + resources["static_smem"],
               tensor_core=tensor_core_kind(compiled.asm["ptx"]), is_gemm=is_gemm,
               scratch_bytes=scratch, compile_s=round(seconds, 2))


def triton_forward_scratch(config, dtype: str, tokens: int) -> int:
    """Bytes of z (fp32) + h (ping-pong, dtype) the fused forward allocates for `tokens` rows."""
    from define_kernels.backends import triton_hgt
    layout = triton_hgt.stack_layout(config, False)
    return tokens * (layout["z_width"] * 4 + layout["h_width"] * DTYPES[dtype][1])


def triton_rows_parallel(workloads: List[str], dtypes, all_configs_for, backward_for, jobs: int) -> List[Row]:
    """triton_rows over the workloads with distinct stacks, `jobs` processes at a time; a workload
    whose HGTConfig equals an earlier one (wt2-small = wt103-base) reuses its rows, with its own
    token count in the scratch column."""
    from concurrent.futures import ProcessPoolExecutor
    by_config: Dict[object, List[str]] = {}
    for name in workloads:
        by_config.setdefault(WORKLOADS[name].config(), []).append(name)
    firsts = [names[0] for names in by_config.values()]
    args = [([name], list(dtypes), list(all_configs_for), list(backward_for)) for name in firsts]
    if jobs > 1 and len(firsts) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            computed = list(pool.map(_triton_rows_star, args))
    else:
        computed = [_triton_rows_star(a) for a in args]
    rows = []
    for names, first_rows in zip(by_config.values(), computed):
        for name in names:
            for row in first_rows:
                scratch = row.scratch_bytes and triton_forward_scratch(
                    WORKLOADS[name].config(), row.dtype, WORKLOADS[name].tokens_per_batch)
                rows.append(dataclasses.replace(row, workload=name, scratch_bytes=scratch))
    return rows


def _triton_rows_star(args) -> List[Row]:
    return triton_rows(*args)


def triton_rows(workloads: Iterable[str], dtypes: Iterable[str], all_configs_for: Iterable[str],
                backward_for: Iterable[str] = tuple(DTYPES)) -> List[Row]:
    """Forward: every autotune config for the dtypes in all_configs_for, the pinned deterministic
    tiles for the others; backward (dtypes in backward_for): the fixed tiles of every layer
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
                         scale="fp32", threshold="i32", drop_scale="fp32")
            if dtype in all_configs_for:
                tiles = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in triton_hgt.forward_configs()]
            else:
                pinned = dict(triton_hgt.DETERMINISTIC_TILES)
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
    tiles = triton_hgt.backward_tiles(getattr(torch, dtype))
    warps = tiles["num_warps"]
    blocks = {k: tiles[k] for k in ("BLOCK_T", "BLOCK_N", "BLOCK_K")}
    label = f"T{blocks['BLOCK_T']}xN{blocks['BLOCK_N']}xK{blocks['BLOCK_K']} w{warps}"
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
                  SHUFFLE=config.shuffle, DROPOUT=True, BLOCK_T=blocks["BLOCK_T"], BLOCK_N=blocks["BLOCK_N"])),
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
            started = time.perf_counter()
            compiled = _compile_triton(kernel, types, constexprs, warps, 3)
            rows.append(_triton_row(compiled, f"{kernel_name} L{index}", name, dtype, label, warps,
                                    is_gemm, 0, time.perf_counter() - started))
    return rows


# ------------------------------------------------------------------------------- CUDA
_CUDA_TYPES = {"float": "float32", "__half": "float16", "__nv_bfloat16": "bfloat16"}


def cuda_forward_scratch(config, dtype: str, tokens: int) -> int:
    """Mirror of plan_hgt_forward (csrc/cuda/hgt_kernels.cu): a 64-token tile keeps x and two
    max-width activations; when that does not fit in shared memory every CTA (at most 2 per SM)
    gets a slice of a global scratch. Keep in step with that function."""
    size = DTYPES[dtype][1]
    widest = max(layer.out_features for layer in config.layers)
    acts = 64 * (config.in_dim + 2 * widest) * size
    gemm_smem = (64 * 40 + 32 * 72) * size + 64 * 68 * 4
    if gemm_smem + acts <= SM90["smem_per_block_max"]:
        return 0
    grid = min(-(-tokens // 64), SM90["sms"] * 2)
    return (-(-acts // 256) * 256) * grid


def cuda_rows(workloads: Iterable[str], dtypes: Iterable[str]) -> List[Row]:
    """nvcc -cubin for sm_90 of hgt_kernels.cu; per instantiated kernel: cuobjdump resources,
    tensor-core kind from its SASS. The kernels are generic over the layer table, so the
    workload only changes the scratch column."""
    from define_kernels.backends import cpp_ext, cuda_toolkit
    toolkit = cuda_toolkit.find_toolkit()
    if not toolkit.root:
        raise RuntimeError(f"no CUDA toolkit: {toolkit.reason}")
    source = cpp_ext.csrc_dir() / "cuda" / "hgt_kernels.cu"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "hgt_kernels.cubin"
        started = time.perf_counter()
        subprocess.run([toolkit.nvcc, "-cubin", "-arch=sm_90", "-O3", "-std=c++17",
                        f"-I{source.parent}", f"-I{cpp_ext.csrc_dir() / 'include'}", str(source),
                        "-o", str(cubin)], check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - started
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
            config = WORKLOADS[name].config()
            scratch = cuda_forward_scratch(config, dtype, WORKLOADS[name].tokens_per_batch) \
                if kernel == "hgt_forward_kernel" and dtype != "any" else 0
            smem = res["static_smem"]
            if kernel == "hgt_forward_kernel" and dtype != "any":  # dynamic: the GEMM staging tiles
                size = DTYPES[dtype][1]
                smem += (64 * 40 + 32 * 72) * size + 64 * 68 * 4
            rows.append(Row("cuda", kernel, name, dtype, "256 threads", 256,
                            res["registers"], res["spill_bytes"], smem,
                            tensor_core=tensor_core_kind(per_function.get(mangled, "")),
                            is_gemm=kernel in ("hgt_forward_kernel", "hgt_wgrad_kernel", "hgt_dgrad_kernel"),
                            scratch_bytes=scratch, compile_s=round(seconds, 2)))
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
        if row.scratch_bytes > L2_BUDGET_BYTES:
            failures.append(f"{where}: forward scratch {row.scratch_bytes / 2**20:.1f} MiB > L2 budget "
                            f"{L2_BUDGET_BYTES / 2**20:.0f} MiB")
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
             f"per SM); scratch = forward per-call scratch, L2 budget {L2_BUDGET_BYTES / 2**20:.0f} MiB.", "",
             "| backend | kernel | workload | dtype | config | regs | spill B | smem KB | CTAs/SM | occupancy "
             "| tensor cores | scratch MiB |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r.backend} | {r.kernel} | {r.workload} | {r.dtype} | {r.config} | {r.registers} | "
                     f"{r.spill_bytes} | {r.smem_bytes / 1024:.1f} | {r.blocks_per_sm} | {r.occupancy:.0%} | "
                     f"{r.tensor_core} | {r.scratch_bytes / 2**20:.1f} |")
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
             "| fwd scratch MiB |", "|" + "---|" * 10]
    for (backend, kernel, config), r in picked.items():
        lines.append(f"| {backend} | {kernel}{' (worst layer)' if ' L' in r['kernel'] else ''} | {config} | "
                     f"{r['registers']} | {r['spill_bytes']} | {int(r['smem_bytes']) / 1024:.1f} | "
                     f"{r['blocks_per_sm']} | {float(r['occupancy']):.0%} | {r['tensor_core']} | "
                     f"{int(r['scratch_bytes']) / 2**20:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resource_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated workload names")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--all-configs-for", default="bfloat16,float16,float32",
                        help="dtypes whose forward is compiled for every autotune config (the others: "
                             "the pinned deterministic tiles)")
    parser.add_argument("--backends", default="triton,cuda")
    parser.add_argument("--backward-for", default="bfloat16,float16,float32",
                        help="dtypes whose Triton backward kernels are compiled ('' for none)")
    parser.add_argument("--out", default=os.environ.get("DEFINE_RESULTS_DIR", str(Path(__file__).parent / "results")))
    parser.add_argument("--stem", default=None, help="file name stem (default resource_<date>_<commit>)")
    parser.add_argument("--gate", action="store_true", help="exit 1 when the gate fails")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes compiling Triton kernels (one workload each)")
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
            rows += triton_rows_parallel(workloads, dtypes, args.all_configs_for.split(","),
                                         args.backward_for.split(","), args.jobs)
        elif backend == "cuda":
            rows += cuda_rows(workloads, dtypes)
        else:
            parser.error(f"--backends: unknown backend {backend!r} (triton, cuda)")
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
