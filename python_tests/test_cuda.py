"""The `cuda` backend (csrc/cuda) against the reference: forward, every gradient, dropout masks bit
for bit, determinism, and indexing past 2^31 elements. Needs a CUDA device (marked `gpu`); on a
machine without one every test is skipped with that reason.

fp32 is compared with the reference run in fp64 on the same inputs (the tolerance table's fp32
row); fp16/bf16 follow the flash-attention rule of tolerances.py: at most twice the error of the
reference run in that dtype, plus a floor.
"""
import pytest
import torch

from bench.gpu_correctness import make_params  # the GPU check's parameters (one builder)
from define_kernels import backends, reference
from define_kernels.config import HGTConfig
import expectations
from conftest import usable_backend
from tolerances import assert_close, assert_low_precision_close

pytestmark = [
    pytest.mark.gpu,
    # an expected cuda backend (DEFINE_KERNELS_EXPECT) without a device fails instead
    pytest.mark.skipif(not torch.cuda.is_available() and not expectations.is_expected("cuda"),
                       reason="no CUDA device"),
]

LOW = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Every transform, both group rules, shuffle, each activation, norm on/off, odd widths (align 1).
CONFIGS = {
    "define-halve": HGTConfig(in_dim=16, expand_dim=40, out_dim=24, depth=2, max_groups=4),
    "define-cycle-shuffle-relu": HGTConfig(in_dim=24, expand_dim=72, out_dim=20, depth=3, max_groups=4,
                                           group_rule="cycle", shuffle=True, act="relu"),
    "nomix-silu-nonorm": HGTConfig(in_dim=12, expand_dim=36, out_dim=10, depth=2, max_groups=2,
                                   transform="define_nomix", norm=None, act="silu"),
    "hgt-odd-widths": HGTConfig(in_dim=6, expand_dim=29, out_dim=7, depth=2, max_groups=2,
                                transform="hgt", align=1),
    "glt-shuffle-linear-reduce": HGTConfig(in_dim=16, expand_dim=48, out_dim=9, depth=2, max_groups=4,
                                           transform="glt", shuffle=True, act=None,
                                           reduce_norm=False, reduce_act=False),
    "linear": HGTConfig(in_dim=20, expand_dim=50, out_dim=33, depth=1, max_groups=1,
                        transform="linear"),
    # Activations too wide for shared memory: the forward uses its global-scratch path.
    "wide-global-scratch": HGTConfig(in_dim=128, expand_dim=1024, out_dim=96, depth=2, max_groups=8,
                                     shuffle=True),
}


def make_inputs(config, dtype, rows, gather, device="cuda", table_rows=50, strided=False):
    p = config.in_dim
    if gather:
        x = (torch.randn(p, table_rows).t() if strided else torch.randn(table_rows, p)).to(device, dtype)
        ids = torch.randint(0, table_rows, (rows,), device=device)
        ids[0] = table_rows - 1                  # the last table row
        if rows > 3:
            ids[1] = ids[2] = ids[3]             # repeated ids
        return x, ids
    return torch.randn(rows, p, dtype=dtype).to(device), None


def cuda_backend(x, ids, params, config, scale, seed):
    """The registered cuda backend, or a skip carrying the registry's reason."""
    usable_backend("cuda", backends.OpInputs(x, ids, params, config, scale, seed))  # fails if expected
    return backends._REGISTRY["cuda"]


def expect_close(actual, exact, in_dtype, name):
    if actual.dtype in LOW:
        assert_low_precision_close(actual, exact, in_dtype, name=name)
    else:
        assert_close(actual, exact.to(actual.dtype), dtype=actual.dtype, name=name)


def references(x, ids, params, config, scale, seed, grad_y=None):
    """(exact fp64 result, reference in the inputs' dtype) for forward or, with grad_y, backward."""
    double = [p.double() for p in params]
    if grad_y is None:
        exact = reference.hgt_forward(x.double(), ids, double, config, scale, seed)
        in_dtype = reference.hgt_forward(x, ids, params, config, scale, seed)
        return exact, in_dtype
    exact = reference.hgt_backward(grad_y.double(), x.double(), ids, double, config, scale, seed)
    in_dtype = reference.hgt_backward(grad_y, x, ids, params, config, scale, seed)
    return exact, in_dtype


def check_backward(backend, grad_y, x, ids, params, config, scale, seed):
    grad_rows, grad_params = backend.backward(grad_y, x, ids, params, config, scale, seed)
    (exact_rows, exact_params), (ref_rows, ref_params) = references(x, ids, params, config, scale,
                                                                    seed, grad_y)
    expect_close(grad_rows, exact_rows, ref_rows, "grad_rows")
    assert len(grad_params) == len(params)
    for index, (got, exact, ref) in enumerate(zip(grad_params, exact_params, ref_params)):
        assert got.shape == params[index].shape and got.dtype == params[index].dtype
        expect_close(got, exact, ref, f"grad_params[{index}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("gather", [True, False], ids=["ids", "dense"])
def test_forward_and_backward_match_reference(name, dtype, gather):
    config = CONFIGS[name]
    params = make_params(config, dtype, "cuda")
    x, ids = make_inputs(config, dtype, rows=77, gather=gather)  # 2 tiles, the second partial
    scale = 1.7 if gather else 1.0
    backend = cuda_backend(x, ids, params, config, scale, None)
    y = backend.forward(x, ids, params, config, scale, None)
    exact, in_dtype = references(x, ids, params, config, scale, None)
    assert y.dtype == dtype and y.shape == (77, config.out_dim)
    expect_close(y, exact, in_dtype, "y")
    check_backward(backend, torch.randn_like(y), x, ids, params, config, scale, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 64, 129])
def test_tile_edges_and_int32_ids(dtype, rows):
    config = CONFIGS["define-cycle-shuffle-relu"]
    params = make_params(config, dtype, "cuda")
    x, ids = make_inputs(config, dtype, rows=rows, gather=True, strided=True)
    ids = ids.to(torch.int32)
    backend = cuda_backend(x, ids, params, config, 2.0, None)
    y = backend.forward(x, ids, params, config, 2.0, None)
    expect_close(y, *references(x, ids, params, config, 2.0, None), "y")
    check_backward(backend, torch.randn_like(y), x, ids, params, config, 2.0, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gather", [True, False], ids=["ids", "dense"])
def test_dropout_mask_is_bit_exact(dtype, gather):
    config = HGTConfig(in_dim=16, expand_dim=48, out_dim=40, depth=3, max_groups=4, shuffle=True,
                       dropout=0.3)
    params = make_params(config, dtype, "cuda")
    x, ids = make_inputs(config, dtype, rows=150, gather=gather)
    seed = 987654321
    backend = cuda_backend(x, ids, params, config, 1.0, seed)
    y = backend.forward(x, ids, params, config, 1.0, seed)
    exact, in_dtype = references(x, ids, params, config, 1.0, seed)
    row_keys = ids if ids is not None else torch.arange(x.shape[0], device="cuda")
    keep = reference.dropout_keep_mask(seed, config.depth, row_keys, config.out_dim, config.dropout)
    assert torch.equal(y != 0, keep), "last-layer dropout mask differs from dropout_keep_mask"
    # Earlier layers' masks: a single wrong bit there moves these values far beyond tolerance.
    expect_close(y, exact, in_dtype, "y")
    check_backward(backend, torch.randn_like(y), x, ids, params, config, 1.0, seed)


def test_backward_is_deterministic():
    config = CONFIGS["define-halve"]
    params = make_params(config, torch.float32, "cuda")
    x, ids = make_inputs(config, torch.float32, rows=5000, gather=True, table_rows=300)
    backend = cuda_backend(x, ids, params, config, 1.0, 7)
    grad_y = torch.randn(5000, config.out_dim, device="cuda")
    first_rows, first_params = backend.backward(grad_y, x, ids, params, config, 1.0, 7)
    second_rows, second_params = backend.backward(grad_y, x, ids, params, config, 1.0, 7)
    assert torch.equal(first_rows, second_rows)
    for a, b in zip(first_params, second_params):
        assert torch.equal(a, b)


def test_public_op_autograd_scatters_into_the_table():
    from define_kernels import hgt
    config = CONFIGS["define-halve"]
    params = [p.requires_grad_() for p in make_params(config, torch.float32, "cuda")]
    x, ids = make_inputs(config, torch.float32, rows=40, gather=True)
    x.requires_grad_()
    cuda_backend(x, ids, params, config, 1.0, None)
    hgt(x, params, config, ids=ids, backend="cuda").square().sum().backward()
    x_ref, params_ref = x.detach().double().requires_grad_(), [p.detach().double().requires_grad_() for p in params]
    reference.hgt_forward(x_ref, ids, params_ref, config).square().sum().backward()
    assert_close(x.grad, x_ref.grad.float(), name="x.grad")
    for index, (p, q) in enumerate(zip(params, params_ref)):
        assert_close(p.grad, q.grad.float(), name=f"params[{index}].grad")


def test_too_many_layers_is_a_value_error_naming_layers():
    config = HGTConfig(in_dim=8, expand_dim=16, out_dim=8, depth=16, max_groups=1)  # 17 layers
    params = make_params(config, torch.float32, "cuda")
    x, ids = make_inputs(config, torch.float32, rows=4, gather=False)
    from define_kernels.backends import cpp_ext
    cuda_backend(x, ids, params, config, 1.0, None)  # skips (with the reason) without the extension
    with pytest.raises(ValueError, match="layers"):
        torch.ops.define_kernels_C.hgt_forward(x, ids, params, *cpp_ext.cpp_args(config, 1.0, None))


def _needs_gpu_memory(gib):
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if total < gib:
        pytest.skip(f"needs {gib} GiB of GPU memory, the device has {total:.0f}")


def test_forward_indexing_beyond_2_pow_31():
    """y has T x 1024 > 2^31 elements; rows at both ends must match the reference (~5 GB)."""
    _needs_gpu_memory(24)
    config = HGTConfig(in_dim=8, expand_dim=1024, out_dim=1024, depth=1, max_groups=1)
    rows = 2**21 + 77
    assert rows * config.out_dim > 2**31
    params = make_params(config, torch.bfloat16, "cuda")
    x = torch.randn(rows, config.in_dim, device="cuda", dtype=torch.bfloat16)
    backend = cuda_backend(x, None, params, config, 1.0, None)
    y = backend.forward(x, None, params, config, 1.0, None)
    for part in (slice(0, 64), slice(rows - 141, rows)):  # dense rows are independent (no dropout)
        exact, in_dtype = references(x[part], None, params, config, 1.0, None)
        expect_close(y[part], exact, in_dtype, f"y[{part.start}:{part.stop}]")


def test_backward_indexing_beyond_2_pow_31():
    """Saved activations, dh and dz hold T x 1024 > 2^31 elements (~22 GB). grad_y is zero except
    on rows at both ends, so the reference on those rows gives every gradient exactly."""
    _needs_gpu_memory(40)
    config = HGTConfig(in_dim=8, expand_dim=1024, out_dim=64, depth=1, max_groups=1)
    rows = 2**21 + 77
    params = make_params(config, torch.bfloat16, "cuda")
    x = torch.randn(rows, config.in_dim, device="cuda", dtype=torch.bfloat16)
    backend = cuda_backend(x, None, params, config, 1.0, None)
    picked = torch.cat([torch.arange(0, 40), torch.arange(rows - 90, rows)]).cuda()
    grad_y = torch.zeros(rows, config.out_dim, device="cuda", dtype=torch.bfloat16)
    grad_y[picked] = torch.randn(len(picked), config.out_dim, device="cuda", dtype=torch.bfloat16)
    grad_rows, grad_params = backend.backward(grad_y, x, None, params, config, 1.0, None)
    (exact_rows, exact_params), (ref_rows, ref_params) = references(
        x[picked], None, params, config, 1.0, None, grad_y[picked])
    expect_close(grad_rows[picked], exact_rows, ref_rows, "grad_rows (picked rows)")
    assert not grad_rows[40:rows - 90].any(), "rows with zero grad_y got a gradient"
    for index, (got, exact, ref) in enumerate(zip(grad_params, exact_params, ref_params)):
        expect_close(got, exact, ref, f"grad_params[{index}]")
