"""define_kernels/backends/cpp_ext.py: the C++ CPU extension (csrc/cpu) against the reference: values, gradients, dropout, opcheck,
argument errors, determinism. The build is shared by the whole session (cached on disk) and must
succeed: a failed build fails here, unless DEFINE_KERNELS_NO_JIT=1 asked for no build."""
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from define_kernels import backends, contract, functional, reference
from define_kernels.backends import cpp_build, cpp_ext
from define_kernels.config import HGTConfig
from conftest import usable_backend
from onednn import onednn
from tolerances import assert_close, assert_close_scaled, assert_low_precision_close



@pytest.fixture(scope="module", autouse=True)
def built(cpp_extension):
    return cpp_extension


def make_params(config, dtype=torch.float64):
    """Random parameters (not the init: non-trivial norm affines and biases)."""
    params = []
    for shape in config.param_shapes():
        scale = 0.4 if len(shape) == 3 else 0.2
        params.append(torch.randn(shape, dtype=dtype) * scale + (1.0 if len(shape) == 1 else 0.0))
    return params


CONFIGS = {
    "define": HGTConfig(16, 40, 12, 3, 4, align=4),
    "define-cycle-shuffle": HGTConfig(16, 48, 16, 3, 4, group_rule="cycle", shuffle=True),
    "define_nomix-relu": HGTConfig(16, 40, 12, 2, 4, transform="define_nomix", act="relu"),
    "hgt-silu-nonorm": HGTConfig(16, 40, 12, 3, 4, transform="hgt", act="silu", norm=None),
    "glt-shuffle-noact": HGTConfig(16, 40, 12, 2, 4, transform="glt", shuffle=True, act=None),
    "linear-nonorm-noact": HGTConfig(12, 30, 7, 2, 1, transform="linear", norm=None, act=None),
    "odd-widths-linear-reduce": HGTConfig(12, 37, 7, 3, 4, align=1, reduce_norm=False,
                                          reduce_act=False, shuffle=True),
    "dropout": HGTConfig(16, 40, 12, 3, 4, align=4, dropout=0.3),
}


def inputs(config, rows, dtype, with_ids=True, vocab=29):
    if with_ids:
        x = torch.randn(vocab, config.in_dim, dtype=dtype)
        ids = torch.randint(0, vocab, (rows,))
        if rows > 2:
            ids[0], ids[1], ids[2] = vocab - 1, 3, 3  # last id, a repeated id
        return x, ids
    return torch.randn(rows, config.in_dim, dtype=dtype), None


def check_against_reference(config, x, ids, dtype, scale=0.8, seed=None):
    params = make_params(config, dtype)
    y = cpp_ext.forward(x, ids, params, config, scale, seed)
    y_ref = reference.hgt_forward(x, ids, params, config, scale, seed)
    assert_close(y, y_ref, name="y")
    grad_y = torch.randn_like(y_ref)
    grad_rows, grad_params = cpp_ext.backward(grad_y, x, ids, params, config, scale, seed)
    grad_rows_ref, grad_params_ref = reference.hgt_backward(grad_y, x, ids, params, config, scale, seed)
    assert_close(grad_rows, grad_rows_ref, name="grad_rows")
    assert len(grad_params) == len(grad_params_ref)
    for index, (got, want) in enumerate(zip(grad_params, grad_params_ref)):
        assert_close(got, want, name=f"grad_params[{index}]")


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(name, dtype):
    config = CONFIGS[name]
    x, ids = inputs(config, 37, dtype)
    check_against_reference(config, x, ids, dtype, seed=1234 if config.dropout else None)


def _both_policies(x, ids, params, config, scale, seed, grad_y):
    """{policy: (y, grad_rows, grad_params)} from the cpu_cpp ops of both activation policies."""
    y = cpp_ext.forward(x, ids, params, config, scale, seed)
    out = {"recompute": (y, *cpp_ext.backward(grad_y, x, ids, params, config, scale, seed))}
    if x.dtype == torch.float16:  # the registry never asks cpu_cpp to save fp16 (save_dtypes)
        return out
    y_saving, saved = cpp_ext.forward_saving(x, ids, params, config, scale, seed)
    out["save"] = (y_saving, *cpp_ext.backward_saved(grad_y, x, ids, params, saved, config, scale, seed))
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_every_dtype_and_policy_matches_fp64_reference(name, dtype):
    """Forward and every gradient of both policies against the float64 reference: the table's
    tolerance for fp64/fp32, assert_low_precision_close (vs the reference run in the dtype) for
    bf16/fp16."""
    check_every_gradient(CONFIGS[name], dtype)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_without_the_fused_bias_gemm_matches_fp64_reference(name):
    """bf16's one-group layers on the path of hosts without oneDNN's fused-bias GEMM."""
    with onednn(False):
        check_every_gradient(CONFIGS[name], torch.bfloat16)


def fused_bias_gemm_expected():
    """Where csrc/cpu/hgt_layers.cpp's fused_bias_gemm runs: AVX-512 BW/VL/DQ in the build's
    flags, and a torch with oneDNN's linear op."""
    return ({"-mavx512bw", "-mavx512vl", "-mavx512dq"} <= set(cpp_build.cpu_isa_flags())
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def test_bf16_one_group_layers_use_the_fused_bias_gemm_where_available():
    config = CONFIGS["define"]  # groups 4, 2, 1 and the one-group reduce layer
    x, ids = inputs(config, 33, torch.bfloat16)
    params = make_params(config, torch.bfloat16)

    def fused_calls(dtype=torch.bfloat16):
        with torch.profiler.profile() as prof:
            cpp_ext.forward(x.to(dtype), ids, [p.to(dtype) for p in params], config, 1.0, None)
            cpp_ext.forward_saving(x.to(dtype), ids, [p.to(dtype) for p in params], config, 1.0, None)
        return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")

    one_group = sum(1 for layer in config.layers if layer.groups == 1)
    assert one_group == 2
    assert fused_calls() == (2 * one_group if fused_bias_gemm_expected() else 0)
    assert fused_calls(torch.float32) == 0  # fp32 adds the bias in the epilogue
    with onednn(False):
        assert fused_calls() == 0


def check_every_gradient(config, dtype):
    """The body of test_every_dtype_and_policy_matches_fp64_reference."""
    seed = 99 if config.dropout else None
    x64, ids = inputs(config, 41, torch.float64)
    params64 = make_params(config, torch.float64)
    grad_y64 = torch.randn(41, config.out_dim, dtype=torch.float64)
    exact_y = reference.hgt_forward(x64, ids, params64, config, 0.8, seed)
    exact = (exact_y, *reference.hgt_backward(grad_y64, x64, ids, params64, config, 0.8, seed))
    x, params, grad_y = x64.to(dtype), [p.to(dtype) for p in params64], grad_y64.to(dtype)
    if dtype in (torch.bfloat16, torch.float16):
        in_dtype = (reference.hgt_forward(x, ids, params, config, 0.8, seed),
                    *reference.hgt_backward(grad_y, x, ids, params, config, 0.8, seed))
    # ReLU's derivative jumps at 0: a rounding-level change of its input in bf16/fp16 flips a
    # gate and moves a gradient by O(1), so with relu only the forward is held to the rule.
    values_only = dtype in (torch.bfloat16, torch.float16) and config.act == "relu"
    for policy, (y, grad_rows, grad_params) in _both_policies(x, ids, params, config, 0.8, seed, grad_y).items():
        got = [y] if values_only else [y, grad_rows] + list(grad_params)
        want = [exact[0], exact[1]] + list(exact[2])
        names = ["y", "grad_rows"] + [f"grad_params[{i}]" for i in range(len(grad_params))]
        for index, (a, b, label) in enumerate(zip(got, want, names)):
            assert a.dtype == dtype, f"{policy} {label} has dtype {a.dtype}"
            if dtype in (torch.float64, torch.float32):
                assert_close(a, b.to(dtype), name=f"{policy} {label}")
            else:
                ref = ([in_dtype[0], in_dtype[1]] + list(in_dtype[2]))[index]
                assert_low_precision_close(a, b, ref, name=f"{policy} {label}")


@pytest.mark.parametrize("name", ["define", "dropout", "odd-widths-linear-reduce", "define_nomix-relu"])
def test_policies_agree_exactly(name):
    """The save policy's backward sees the very activations the recompute policy rebuilds."""
    config = CONFIGS[name]
    x, ids = inputs(config, 70, torch.float32)
    params = make_params(config, torch.float32)
    grad_y = torch.randn(70, config.out_dim)
    runs = _both_policies(x, ids, params, config, 1.1, 5 if config.dropout else None, grad_y)
    for a, b in zip([runs["save"][0], runs["save"][1], *runs["save"][2]],
                    [runs["recompute"][0], runs["recompute"][1], *runs["recompute"][2]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rows", [1, 20, 41, 100])
def test_bf16_weight_gradients_ignore_stale_scratch(rows):
    """The bf16 backward's transposed copies (u^T or gz^T) have a row stride padded to 32
    elements, and oneDNN's GEMMs read a row's tail up to that stride: the padding must be
    zeroed, or NaN left in freed memory reaches the weight gradients. Poisoned memory is freed
    before each backward so that the scratch buffers are likely to reuse it."""
    config = CONFIGS["define"]  # both kinds of copy: gz^T where a layer narrows (w < a), u^T elsewhere
    x, ids = inputs(config, rows, torch.bfloat16)
    params = make_params(config, torch.bfloat16)
    grad_y = torch.randn(rows, config.out_dim, dtype=torch.bfloat16)
    expected = cpp_ext.backward(grad_y, x, ids, params, config, 0.8, None)[1]
    for _ in range(10):
        poison = [torch.full((n, 64), float("nan"), dtype=torch.bfloat16) for n in (64, 256, 1024) for _ in range(3)]
        del poison
        got = cpp_ext.backward(grad_y, x, ids, params, config, 0.8, None)[1]
        for index, (a, b) in enumerate(zip(got, expected)):
            assert torch.equal(a, b), f"grad_params[{index}] changed with stale scratch ({rows} rows)"


def test_saved_layout_is_the_references():
    """cpu_cpp's saved tensors are reference.hgt_forward_saving's (same layout and values)."""
    config = CONFIGS["define-cycle-shuffle"]
    x, ids = inputs(config, 30, torch.float64)
    params = make_params(config)
    _, saved = cpp_ext.forward_saving(x, ids, params, config, 0.7, None)
    _, saved_ref = reference.hgt_forward_saving(x, ids, params, config, 0.7, None)
    assert [tuple(t.shape) for t in saved] == contract.plan(config).saved_shapes(30)
    for index, (a, b) in enumerate(zip(saved, saved_ref)):
        assert_close(a, b, name=f"saved[{index}]")


@pytest.mark.parametrize("rows,with_ids,id_dtype", [
    (1, True, torch.int64),      # one token
    (300, True, torch.int32),    # several tiles (128 rows each), a partial last tile, int32 ids
    (300, False, None),          # dense x
    (0, True, torch.int64),      # no tokens
])
def test_shapes(rows, with_ids, id_dtype):
    config = CONFIGS["define-cycle-shuffle"]
    x, ids = inputs(config, rows, torch.float64, with_ids)
    if ids is not None:
        ids = ids.to(id_dtype)
    check_against_reference(config, x, ids, torch.float64, scale=1.0)


def test_dropout_mask_bit_exact_through_public_op():
    """Same seed -> the reference's mask: zeros in the same places and equal values, for ids
    (row key = token id) and dense rows (row key = row index)."""
    config = HGTConfig(16, 40, 24, 2, 4, align=4, dropout=0.5, act="relu", norm=None)
    params = make_params(config, torch.float32)
    for x, ids in (inputs(config, 200, torch.float32), inputs(config, 200, torch.float32, False)):
        seed = torch.tensor(987654321)
        y = functional.hgt(x, params, config, ids=ids, seed=seed, backend="cpu_cpp")
        y_ref = functional.hgt(x, params, config, ids=ids, seed=seed, backend="torch")
        assert torch.equal(y == 0, y_ref == 0)
        assert_close(y, y_ref, name="y with dropout")
        assert (y == 0).float().mean() > 0.3  # the mask really drops (relu alone would not)


def test_gradcheck_fp64_public_op():
    config = HGTConfig(8, 16, 6, 2, 2, align=2, shuffle=True, dropout=0.25)
    params = [p.requires_grad_() for p in make_params(config)]
    x = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 10, 3, 3, 7])
    seed = torch.tensor(42)

    def run(x, *params):
        return functional.hgt(x, list(params), config, ids=ids, scale=1.3, seed=seed, backend="cpu_cpp")

    assert torch.autograd.gradcheck(run, (x, *params))


def test_fp32_gradients_public_op():
    config = CONFIGS["define"]
    params = [p.requires_grad_() for p in make_params(config, torch.float32)]
    x, ids = inputs(config, 150, torch.float32)
    x.requires_grad_()
    grads = {}
    for backend in ("cpu_cpp", "torch"):
        y = functional.hgt(x, params, config, ids=ids, backend=backend)
        grads[backend] = torch.autograd.grad((y * y).sum(), [x, *params])
    for index, (got, want) in enumerate(zip(grads["cpu_cpp"], grads["torch"])):
        assert_close(got, want, name=f"grad {index}")


def c_args(config, dtype=torch.float64, rows=9, seed=-1):
    x, ids = inputs(config, rows, dtype)
    return [x, ids, make_params(config, dtype), *cpp_ext.cpp_args(config, 0.9, None)[:-1], seed]


@pytest.mark.parametrize("name", ["define-cycle-shuffle", "dropout", "linear-nonorm-noact"])
def test_opcheck(name):
    config = CONFIGS[name]
    args = c_args(config, seed=77 if config.dropout else -1)
    torch.library.opcheck(torch.ops.define_kernels_C.hgt_forward.default, args)
    grad_y = torch.randn(args[1].shape[0], config.out_dim, dtype=torch.float64)
    torch.library.opcheck(torch.ops.define_kernels_C.hgt_backward.default, [grad_y] + args)
    dense = [torch.randn(5, config.in_dim, dtype=torch.float64), None] + args[2:]
    torch.library.opcheck(torch.ops.define_kernels_C.hgt_forward.default, dense)
    torch.library.opcheck(torch.ops.define_kernels_C.hgt_forward_saving.default, args)
    _, saved = torch.ops.define_kernels_C.hgt_forward_saving(*args)
    torch.library.opcheck(torch.ops.define_kernels_C.hgt_backward_saved.default,
                          [grad_y] + args[:3] + [list(saved)] + args[3:])


def test_deterministic():
    config = CONFIGS["define"]
    x, ids = inputs(config, 600, torch.float32)  # several tiles per thread chunk
    params = make_params(config, torch.float32)
    grad_y = torch.randn(600, config.out_dim)
    first = cpp_ext.backward(grad_y, x, ids, params, config, 1.0, None)
    second = cpp_ext.backward(grad_y, x, ids, params, config, 1.0, None)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    assert torch.equal(cpp_ext.forward(x, ids, params, config), cpp_ext.forward(x, ids, params, config))


# --------------------------------------------------------------------------- bad inputs
def _bad(config):
    """(case name, args modifier, exception, text naming the argument)."""
    def at(index, value):
        def edit(args):
            args[index] = value(args) if callable(value) else value
        return edit

    def param(index, make):
        def edit(args):
            args[2] = list(args[2])
            args[2][index] = make(args[2][index])
        return edit

    layers = cpp_ext.encode_layers(config)
    return [
        ("x 3-D", at(0, lambda a: a[0][None]), ValueError, "x"),
        ("x int", at(0, lambda a: a[0].long()), ValueError, "x"),
        ("x width", at(0, lambda a: a[0][:, :-1]), ValueError, "layers"),
        ("ids 2-D", at(1, lambda a: a[1][None]), ValueError, "ids"),
        ("ids float", at(1, lambda a: a[1].double()), ValueError, "ids"),
        ("params count", at(2, lambda a: a[2][:-1]), ValueError, "params"),
        ("param shape", param(0, lambda p: p[:, :-1]), ValueError, "params[0]"),
        ("param dtype", param(1, lambda p: p.float()), ValueError, "params[1]"),
        ("layers length", at(3, layers[:-1]), ValueError, "layers"),
        ("layers groups", at(3, [layers[0], layers[1], 5] + layers[3:]), ValueError, "layers"),
        ("layers kind", at(3, layers[:3] + [7] + layers[4:]), ValueError, "layers"),
        ("layers act", at(3, layers[:5] + [9] + layers[6:]), ValueError, "layers"),
        ("dropout", at(5, 1.0), ValueError, "dropout"),
        ("seed", at(7, 2**31), ValueError, "seed"),
    ]


BAD_CASES = [(case[0], fake) for case in _bad(CONFIGS["define"]) for fake in (False, True)]


@pytest.mark.parametrize("case,fake", BAD_CASES, ids=[f"{c}-{'fake' if f else 'cpp'}" for c, f in BAD_CASES])
def test_bad_inputs_name_the_argument(case, fake):
    """The C++ op and its Python fake raise the same error type naming the same argument."""
    config = CONFIGS["define"]
    _, edit, error, text = next(c for c in _bad(config) if c[0] == case)
    args = c_args(config)
    edit(args)
    pattern = r"\b" + re.escape(text)
    if fake:
        with FakeTensorMode(allow_non_fake_inputs=True):
            with pytest.raises(error, match=pattern):
                torch.ops.define_kernels_C.hgt_forward(*args)
    else:
        with pytest.raises(error, match=pattern):
            torch.ops.define_kernels_C.hgt_forward(*args)
        grad_y = torch.randn(9, config.out_dim, dtype=torch.float64)
        with pytest.raises(error):
            torch.ops.define_kernels_C.hgt_backward(grad_y, *args)
        with pytest.raises(error, match=pattern):
            torch.ops.define_kernels_C.hgt_forward_saving(*args)


def test_bad_saved_names_the_argument():
    config = CONFIGS["define"]
    args = c_args(config)
    _, saved = torch.ops.define_kernels_C.hgt_forward_saving(*args)
    grad_y = torch.randn(9, config.out_dim, dtype=torch.float64)
    for bad, text in ((list(saved)[:-1], "saved"), (list(saved[:-1]) + [saved[-1][:, :-1]], r"saved\[")):
        with pytest.raises(ValueError, match=text):
            torch.ops.define_kernels_C.hgt_backward_saved(grad_y, *args[:3], bad, *args[3:])


@pytest.mark.parametrize("bad_id", [-1, 29])
def test_ids_out_of_range_is_index_error(bad_id):
    args = c_args(CONFIGS["define"])
    args[1][4] = bad_id
    with pytest.raises(IndexError, match=rf"ids contains {bad_id}"):
        torch.ops.define_kernels_C.hgt_forward(*args)


def test_bad_grad_y():
    config = CONFIGS["define"]
    args = c_args(config)
    for grad_y in (torch.randn(8, config.out_dim, dtype=torch.float64),
                   torch.randn(9, config.out_dim)):
        with pytest.raises(ValueError, match="grad_y"):
            torch.ops.define_kernels_C.hgt_backward(grad_y, *args)


# ------------------------------------------------------------------------------ C++ row blocks
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 129, 300, 1100], ids=lambda r: f"rows{r}")
def test_cpp_gradients_do_not_depend_on_thread_count_or_chunking(threads, rows):
    """The CPU epilogue works on blocks of 32 rows (csrc/cpu/hgt_epilogue.h) and adds the
    per-block bias/norm partials in block order: 1 row = one partial block, 129 = 4 full blocks
    and one row, 300 and 1100 = partial last blocks split unevenly over 2 or 3 threads."""
    config = HGTConfig(16, 40, 12, 3, 4, align=4)
    inputs = backends.OpInputs(torch.zeros(1, 16), None, [], config, 1.0, None)
    usable_backend("cpu_cpp", inputs)
    generator = torch.Generator().manual_seed(rows)
    params = [torch.randn(s, generator=generator) * 0.4 for s in config.param_shapes()]
    x = torch.randn(37, 16, generator=generator)
    ids = torch.randint(0, 37, (rows,), generator=generator)
    grad_y = torch.randn(rows, 12, generator=generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grad_rows, grad_params = cpp_ext.backward(grad_y, x, ids, params, config, 0.9, None)
    finally:
        torch.set_num_threads(previous)
    grad_rows_ref, grad_params_ref = reference.hgt_backward(grad_y.double(), x.double(), ids,
                                                            [p.double() for p in params], config, 0.9)
    assert_close_scaled(grad_rows, grad_rows_ref, torch.float32, name="grad_rows")
    for index, (got, want) in enumerate(zip(grad_params, grad_params_ref)):
        assert_close_scaled(got, want, torch.float32, name=f"grad_params[{index}] ({threads} threads)")
