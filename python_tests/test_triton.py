"""The `triton` backend against the reference: forward and every gradient, through the public op.

On GPU-less machines conftest.py sets TRITON_INTERPRET=1, so the kernels run in Triton's
interpreter on CPU tensors (fp32 and fp16; the interpreter has no bf16). Shapes are tiny (the
interpreter executes every program in Python) but odd: per-group widths such as 6, 9, 11 or 44
are not powers of two, so every tile is masked.
"""
import os
import subprocess
import sys

import pytest
import torch

from define_kernels import DeFINE, backends, functional, reference
from define_kernels.backends import triton_hgt, triton_launch, triton_layout
from define_kernels.config import HGTConfig

from conftest import usable_backend
from tolerances import assert_close, assert_low_precision_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(in_dim=12, expand_dim=40, out_dim=20, depth=3, max_groups=4, align=1)

# (name, HGTConfig options): every transform, both group rules, shuffle, norm/act on and off.
CONFIGS = [
    ("define", dict(SMALL)),
    ("define_shuffle_cycle", dict(SMALL, shuffle=True, group_rule="cycle")),
    ("define_nomix", dict(SMALL, transform="define_nomix", align=4)),
    ("hgt_relu_plain_reduce", dict(SMALL, transform="hgt", act="relu", reduce_norm=False,
                                   reduce_act=False)),
    ("glt_shuffle_silu", dict(SMALL, transform="glt", shuffle=True, act="silu")),
    ("linear_no_norm_no_act", dict(SMALL, transform="linear", norm=None, act=None)),
    ("define_wide_groups", dict(in_dim=16, expand_dim=64, out_dim=44, depth=2, max_groups=2,
                                align=4)),
]


def _ids(num_embeddings, count, dtype):
    """Random ids plus a repeated id and the last row V-1."""
    ids = torch.randint(0, num_embeddings, (count,))
    ids[0] = num_embeddings - 1
    if count > 2:
        ids[-1] = ids[1]
    return ids.to(dtype)


def _inputs(config, rows, dtype, gather, id_dtype=torch.int64, num_embeddings=23):
    """(x, ids, params) in fp64: x is a table gathered by ids, or dense rows (ids None)."""
    params = [torch.randn(shape, dtype=torch.float64) * 0.6 for shape in config.param_shapes()]
    if gather:
        return torch.randn(num_embeddings, config.in_dim, dtype=torch.float64), \
            _ids(num_embeddings, rows, id_dtype), params
    return torch.randn(rows, config.in_dim, dtype=torch.float64), None, params


def _run(backend, config, x, ids, params, dtype, scale, seed=None, grad_y=None):
    """y and the gradients of (x, params) through the public op, in `dtype` on DEVICE."""
    x = x.to(DEVICE, dtype).requires_grad_(True)
    params = [p.to(DEVICE, dtype).requires_grad_(True) for p in params]
    ids = None if ids is None else ids.to(DEVICE)
    seed_tensor = None if seed is None else torch.tensor(seed, dtype=torch.int64)
    y = functional.hgt(x, params, config, ids=ids, scale=scale, seed=seed_tensor, backend=backend)
    if grad_y is None:
        return y.detach(), None
    grads = torch.autograd.grad(y, [x] + params, grad_y.to(DEVICE, dtype))
    return y.detach(), grads


def _check_backend(config, x, ids, dtype=torch.float32):
    inputs = backends.OpInputs(x.to(DEVICE, dtype), None if ids is None else ids.to(DEVICE),
                               [], config, 1.0, None)
    usable_backend("triton", inputs)


def _compare_fp32(config, x, ids, params, scale, seed=None):
    _check_backend(config, x, ids)
    rows = x.shape[0] if ids is None else ids.shape[0]
    grad_y = torch.randn(rows, config.out_dim, dtype=torch.float64)
    y, grads = _run("triton", config, x, ids, params, torch.float32, scale, seed, grad_y)
    y_ref, grads_ref = _run("torch", config, x, ids, params, torch.float64, scale, seed, grad_y)
    assert_close(y.cpu(), y_ref, torch.float32, name="y")
    names = ["grad_x"] + [f"grad_params[{i}]" for i in range(len(params))]
    for name, grad, grad_ref in zip(names, grads, grads_ref):
        # gradients sum over tokens: compare relative to their scale
        assert_close(grad.cpu() / grad_ref.abs().max().clamp_min(1.0), grad_ref / grad_ref.abs().max().clamp_min(1.0),
                     torch.float32, name=name)


@pytest.mark.parametrize("name,options", CONFIGS, ids=[name for name, _ in CONFIGS])
def test_fp32_gather_matches_reference(name, options):
    config = HGTConfig(**options)
    id_dtype = torch.int32 if len(name) % 2 else torch.int64  # both id dtypes across the table
    x, ids, params = _inputs(config, 11, torch.float32, gather=True, id_dtype=id_dtype)
    _compare_fp32(config, x, ids, params, scale=1.7)


@pytest.mark.parametrize("name,options", CONFIGS[:3], ids=[name for name, _ in CONFIGS[:3]])
def test_fp32_dense_x_matches_reference(name, options):
    config = HGTConfig(**options)
    x, ids, params = _inputs(config, 7, torch.float32, gather=False)
    _compare_fp32(config, x, ids, params, scale=1.0)


def test_one_token_and_tile_edge():
    config = HGTConfig(**SMALL)
    for rows in (1, 17):  # one token; one past the interpreter's 16-row tile
        x, ids, params = _inputs(config, rows, torch.float32, gather=True)
        _compare_fp32(config, x, ids, params, scale=0.5)
    x, _, params = _inputs(config, 1, torch.float32, gather=True)
    empty = torch.zeros(0, dtype=torch.int64)
    y, grads = _run("triton", config, x, empty, params, torch.float32, 1.0, None,
                    torch.zeros(0, config.out_dim))
    assert y.shape == (0, config.out_dim) and grads[0].abs().sum() == 0


@pytest.mark.parametrize("gather", [True, False], ids=["ids", "dense"])
def test_dropout_mask_is_bit_identical_and_backward_consistent(gather):
    config = HGTConfig(**dict(SMALL, dropout=0.4, shuffle=True))
    x, ids, params = _inputs(config, 13, torch.float32, gather=gather)
    _check_backend(config, x, ids)
    seed = 987654321
    y, _ = _run("triton", config, x, ids, params, torch.float32, 1.3, seed)
    y_ref, _ = _run("torch", config, x, ids, params, torch.float32, 1.3, seed)
    dropped = y == 0
    assert dropped.any() and not dropped.all(), "the test needs some dropped outputs"
    assert torch.equal(dropped.cpu(), y_ref == 0), "dropout mask differs from the reference"
    # every layer's mask feeds the gradients: forward and backward must regenerate the same one
    _compare_fp32(config, x, ids, params, scale=1.3, seed=seed)
    y_other, _ = _run("triton", config, x, ids, params, torch.float32, 1.3, seed + 1)
    assert not torch.equal(y_other == 0, dropped), "a different seed must change the mask"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name,options", [CONFIGS[0], CONFIGS[1], CONFIGS[3]],
                         ids=[CONFIGS[i][0] for i in (0, 1, 3)])
def test_low_precision_matches_reference(name, options, dtype):
    """Against the float64 reference, within the reference's own error in the dtype. bf16 runs
    wherever it can (a GPU); the interpreter has no bf16 and the skip says so (the kernels are
    still compiled for sm_90 bf16 by test_kernels_compile_for_sm90_bf16)."""
    config = HGTConfig(**options)
    x, ids, params = _inputs(config, 9, dtype, gather=True)
    _check_backend(config, x, ids, dtype)
    grad_y = torch.randn(9, config.out_dim, dtype=torch.float64)
    y, grads = _run("triton", config, x, ids, params, dtype, 1.5, None, grad_y)
    y_exact, grads_exact = _run("torch", config, x, ids, params, torch.float64, 1.5, None, grad_y)
    y_low, grads_low = _run("torch", config, x, ids, params, dtype, 1.5, None, grad_y)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_low_precision_close(y.cpu(), y_exact, y_low.cpu(), name="y")
    names = ["grad_x"] + [f"grad_params[{i}]" for i in range(len(params))]
    for name, grad, exact, low in zip(names, grads, grads_exact, grads_low):
        norm = exact.abs().max().clamp_min(1.0)
        assert_low_precision_close(grad.cpu() / norm, exact / norm, low.cpu() / norm, name=name)


def test_define_module_end_to_end():
    def build(backend):
        torch.manual_seed(3)
        return DeFINE(31, 20, map_dim=16, expand_dim=48, depth=2, max_groups=4, align=4,
                      padding_idx=0, dropout=0.2, backend=backend, dedup=True).to(DEVICE)

    _check_backend(build("torch").config, torch.zeros(1, 16), torch.zeros(1, dtype=torch.int64))
    tri, ref = build("triton"), build("torch")
    ids = torch.tensor([[30, 4, 0, 4], [7, 30, 12, 1]], device=DEVICE)
    torch.manual_seed(11)
    y = tri(ids)
    torch.manual_seed(11)
    y_ref = ref(ids)
    assert_close(y, y_ref, torch.float32, name="DeFINE output (train, dropout)")
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, param), param_ref in zip(tri.named_parameters(), ref.parameters()):
        assert_close(param.grad, param_ref.grad, torch.float32, name=f"grad of {name}")
    assert tri.map_weight.grad[0].abs().max() == 0  # padding row gets no gradient
    tri.eval(), ref.eval()
    with torch.no_grad():  # the cache serves only where no gradient can be needed
        assert_close(tri(ids), ref(ids), torch.float32, name="DeFINE output (eval, cache)")


def test_backward_is_deterministic():
    config = HGTConfig(**dict(SMALL, dropout=0.1))
    x, ids, params = _inputs(config, 9, torch.float32, gather=True)
    _check_backend(config, x, ids)
    grad_y = torch.randn(9, config.out_dim, dtype=torch.float64)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_run("triton", config, x, ids, params, torch.float32, 1.0, 5, grad_y)[1] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_parameter_change_invalidates_packed_weights():
    config = HGTConfig(**SMALL)
    x, ids, params = _inputs(config, 5, torch.float32, gather=True)
    _check_backend(config, x, ids)
    x, ids = x.float().to(DEVICE), ids.to(DEVICE)
    params = [p.float().to(DEVICE) for p in params]
    before = triton_hgt.triton_forward(x, ids, params, config)
    params[-2].add_(0.5)  # in place: same tensor, new version
    after = triton_hgt.triton_forward(x, ids, params, config)
    assert not torch.equal(before, after)
    assert_close(after.cpu(), reference.hgt_forward(x, ids, params, config).cpu(), torch.float32,
                 name="y after an in-place update")


def test_registry_entry_and_reasons(monkeypatch):
    backend = backends._REGISTRY["triton"]
    assert "cuda" in backend.devices
    if os.environ.get("TRITON_INTERPRET") == "1":  # explicit requests only: auto skips the interpreter
        assert backend.priority > backends._REGISTRY["torch"].priority and "cpu" in backend.devices
    else:
        assert backend.priority == 10 and backends.backends_by_priority()[0].name == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert triton_hgt.unavailable_reason() == "no CUDA device and TRITON_INTERPRET unset"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the bf16 refusal is interpreter-only")
def test_interpreter_refuses_bf16_with_reason():
    config = HGTConfig(**SMALL)
    x = torch.randn(4, config.in_dim, dtype=torch.bfloat16)
    params = [torch.randn(s, dtype=torch.bfloat16) for s in config.param_shapes()]
    with pytest.raises(backends.BackendUnavailableError, match="no bfloat16"):
        functional.hgt(x, params, config, backend="triton")
    assert functional.hgt(x, params, config).dtype == torch.bfloat16  # auto runs the reference


def _compile_sm90(kernel, pointers, scalars, constexprs, mma="mma", **options):
    """Compile `kernel` for sm_90a without a GPU (Triton's bundled ptxas); `mma`: the
    instruction its PTX must contain (None: no check)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = dict(pointers, **scalars, **{name: "constexpr" for name in constexprs})
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    assert mma is None or mma in compiled.asm["ptx"], f"{kernel.__name__} {options}: no {mma}"


def compile_kernels_for_sm90():
    """bf16 forward and GEMM backward kernels through the real compiler (run outside the
    interpreter, see the test below)."""
    from define_kernels.backends.triton_kernels import backward, forward
    tuner = triton_launch._forward_kernel()  # the GPU path wraps the kernel in an autotuner
    assert len(tuner.configs) == len(triton_launch.forward_configs()) > 1
    config = HGTConfig(**dict(SMALL, transform="define_nomix", shuffle=True, dropout=0.1))
    in_proj = HGTConfig(**dict(SMALL, in_proj_from=20, in_proj_dropout=0.2, dropout=0.1))
    for index, candidate in enumerate(triton_launch.forward_configs()):  # every candidate: wgmma on sm_90
        stack = in_proj if index == 0 else config  # the in-proj layout once (its x' reads)
        tables = {k: v for k, v in triton_layout.stack_layout(stack, save=index == 0).items()
                  if k not in ("z_width", "h_width", "num_params")}
        _compile_sm90(forward.hgt_forward_kernel,
                      dict(x_ptr="*bf16", ids_ptr="*i32", params_ptr="*bf16", z_ptr="*fp32",
                           h_ptr="*bf16", y_ptr="*bf16", bases_ptr="*i64"),
                      dict(T="i32", stride_x="i32", stride_z="i32", stride_h="i32", scale="fp32",
                           threshold="i32", drop_scale="fp32", proj_threshold="i32",
                           proj_drop_scale="fp32"),
                      dict(tables, HAS_IDS=True, DROPOUT=True, DOT_PRECISION="tf32", **candidate.kwargs),
                      mma="wgmma", num_warps=candidate.num_warps, num_stages=candidate.num_stages)
    layout = triton_layout.stack_layout(config, save=True)
    tiles = dict(BLOCK_T=64, BLOCK_N=64, BLOCK_K=32)
    epilogue = triton_launch.backward_tiles(torch.bfloat16)
    _compile_sm90(backward.epilogue_backward_kernel,
                  dict(dh_ptr="*fp32", z_ptr="*fp32", params_ptr="*bf16", dz_ptr="*fp32",
                       dgamma_ptr="*fp32", dbeta_ptr="*fp32", ids_ptr="*i64", bases_ptr="*i64"),
                  dict(T="i32", stride_dh="i32", stride_z="i32", stride_dz="i32", threshold="i32",
                       drop_scale="fp32"),
                  dict(LAYER=0, G=config.layers[0].groups, C=config.layers[0].out_features // config.layers[0].groups,
                       HAS_NORM=True, ACT=1, NW_OFF=layout["NW_OFF"][0], NB_OFF=layout["NB_OFF"][0],
                       HAS_IDS=True, SHUFFLE=True, DROPOUT=True, BLOCK_T=epilogue["BLOCK_T"],
                       BLOCK_N=epilogue["epilogue_block_n"]),
                  mma=None, num_warps=epilogue["epilogue_warps"])
    index = 1  # a concat layer whose second group straddles x and h
    layer = config.layers[index]
    shape = dict(P=config.in_dim, A=layer.in_features, W=layer.out_features, G=layer.groups,
                 KIND=layout["KINDS"][index], WP=layout["PREV_W"][index], DOT_PRECISION="tf32",
                 **tiles)
    _compile_sm90(backward.weight_grad_kernel,
                  dict(x_ptr="*bf16", ids_ptr="*i64", hin_ptr="*bf16", dz_ptr="*fp32", dw_ptr="*fp32"),
                  dict(T="i32", tokens_per_split="i32", stride_x="i32", stride_h="i32",
                       stride_dz="i32", scale="fp32"), dict(shape, HAS_IDS=True))
    _compile_sm90(backward.input_grad_kernel,
                  dict(dz_ptr="*fp32", params_ptr="*bf16", dx_ptr="*fp32", dhin_ptr="*fp32"),
                  dict(T="i32", stride_dz="i32", stride_dx="i32", stride_dh="i32"),
                  dict(shape, W_OFF=layout["W_OFF"][index]), num_warps=epilogue["input_grad_warps"])


def test_kernels_compile_for_sm90_bf16():
    """The compiled-mode rules (constexpr use, bf16 tensor-core dots) the interpreter never
    checks: compile for sm_90 in a subprocess with the interpreter off (no GPU needed)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", "import test_triton; test_triton.compile_kernels_for_sm90()"],
                            cwd=os.path.dirname(__file__), env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_offsets_past_2_31_elements():
    """Map rows gathered past element 2^31 of the table (int32 ids, int64 offsets in the
    kernels). The table is 8.6 GB of virtual memory, but only the gathered rows are ever
    written or read, so the pages committed stay a few KB. Backend functions directly: the
    public op's autograd would scatter into a table-sized gradient."""
    config = HGTConfig(in_dim=16, expand_dim=32, out_dim=16, depth=2, max_groups=2, align=1)
    rows = 2**31 // config.in_dim + 64
    _check_backend(config, torch.zeros(1, config.in_dim), None)
    table = torch.empty(rows, config.in_dim, dtype=torch.float32)
    ids = torch.tensor([rows - 1, 2**27, 2**27 + 5, 3, rows - 1, 2**27 + 63], dtype=torch.int32)
    assert int(ids.max()) * config.in_dim > 2**31
    table[ids.long()] = torch.randn(len(ids), config.in_dim)
    params = [torch.randn(shape) * 0.6 for shape in config.param_shapes()]
    y = triton_hgt.triton_forward(table, ids, params, config, 1.1)
    y_ref = reference.hgt_forward(table, ids.long(), params, config, 1.1)
    assert_close(y, y_ref, torch.float32, name="y")
    grad_y = torch.randn_like(y)
    grad_rows, grad_params = triton_hgt.triton_backward(grad_y, table, ids, params, config, 1.1)
    grad_rows_ref, grad_params_ref = reference.hgt_backward(grad_y, table, ids.long(), params, config, 1.1)
    assert_close(grad_rows, grad_rows_ref, torch.float32, name="grad_rows")
    for index, (grad, grad_ref) in enumerate(zip(grad_params, grad_params_ref)):
        assert_close(grad, grad_ref, torch.float32, name=f"grad_params[{index}]")
