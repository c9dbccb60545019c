"""The CUDA kernels' pure index arithmetic (csrc/include/define_kernels/hgt_index_math.h) on the CPU.

The header's `__host__ __device__` functions are what the kernels call for layer-input
addressing (mix / concat / straddling groups), which operand chunks may be loaded as 16-byte
vectors (contiguous spans, alignment), the feature shuffle, int64 offsets and the forward grid; here they are compiled with the host compiler into a tiny extension and checked
against the reference's own layer_input / feature_shuffle on every layer of every transform.
"""
import functools
from pathlib import Path

import pytest
import torch

from define_kernels import reference
from define_kernels.codes import InputKind
from define_kernels.config import HGTConfig

INCLUDE = Path(__file__).resolve().parent.parent / "csrc" / "include"
KIND_CODES = {kind.label: int(kind) for kind in InputKind}

SOURCE = r"""
#include <define_kernels/hgt_index_math.h>
#include <torch/extension.h>
namespace dk = define_kernels;

// [g * group_in] (is_x, col) pairs of a layer's input columns, as the kernels address them.
std::vector<std::pair<bool, int>> input_columns(int kind, int p, int w_prev, int groups, int group_in) {
  std::vector<std::pair<bool, int>> out;
  for (int j = 0; j < groups; ++j)
    for (int k = 0; k < group_in; ++k) {
      int col = -1;
      const bool from_x = dk::hgt_input_column(kind, p, w_prev, groups, group_in, j, k, &col);
      out.emplace_back(from_x, col);
    }
  return out;
}

// (span, col) of every len-wide chunk start k of every group: what the vector loads use.
std::vector<std::pair<int, int>> input_spans(int kind, int p, int w_prev, int groups, int group_in, int len) {
  std::vector<std::pair<int, int>> out;
  for (int j = 0; j < groups; ++j)
    for (int k = 0; k + len <= group_in; ++k) {
      int col = -1;
      const int span = dk::hgt_input_span(kind, p, w_prev, groups, group_in, j, k, len, &col);
      out.emplace_back(span, col);
    }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("input_columns", &input_columns);
  m.def("input_spans", &input_spans);
  m.def("is_aligned", &dk::hgt_is_aligned);
  m.attr("span_x") = dk::kHgtSpanX;
  m.attr("span_h") = dk::kHgtSpanH;
  m.attr("span_split") = dk::kHgtSpanSplit;
  m.def("output_position", &dk::hgt_output_position);
  m.def("unshuffled_index", &dk::hgt_unshuffled_index);
  m.def("element_offset", &dk::hgt_element_offset);
  m.def("forward_grid", &dk::hgt_forward_grid);
}
"""

CONFIGS = [
    HGTConfig(128, 1024, 512, depth=4, max_groups=8),                      # wt103-base
    HGTConfig(12, 40, 20, depth=3, max_groups=4, align=1, shuffle=True, group_rule="cycle"),
    HGTConfig(12, 40, 20, depth=3, max_groups=4, align=4, transform="define_nomix"),
    HGTConfig(12, 40, 20, depth=3, max_groups=4, align=1, transform="hgt"),
    HGTConfig(12, 40, 20, depth=3, max_groups=4, align=1, transform="glt", shuffle=True),
    HGTConfig(16, 64, 44, depth=2, max_groups=2, align=4),
]


@functools.lru_cache(maxsize=1)
def _math():
    from torch.utils.cpp_extension import load_inline
    try:
        return load_inline("dk_index_math_test", cpp_sources=SOURCE, extra_include_paths=[str(INCLUDE)],
                           extra_cflags=["-O1", "-std=c++17"], verbose=False)
    except Exception as error:  # no host compiler: say so, never pass silently
        pytest.skip(f"cannot build the index-math test extension: {type(error).__name__}: {error}")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.transform}-{c.in_dim}-{c.out_dim}-{c.shuffle}")
def test_input_columns_match_reference_layer_input(config):
    math = _math()
    p = config.in_dim
    x = torch.arange(p, dtype=torch.float64)[None]           # x column c holds c
    width_prev = 0
    for index, layer in enumerate(config.layers):
        h = None if index == 0 else 10_000 + torch.arange(width_prev, dtype=torch.float64)[None]
        u = reference.layer_input(layer.input_kind, x, h, layer.groups)[0]
        assert u.numel() == layer.in_features
        columns = math.input_columns(KIND_CODES[layer.input_kind], p, width_prev, layer.groups,
                                     layer.in_features // layer.groups)
        got = torch.tensor([col if from_x else 10_000 + col for from_x, col in columns], dtype=torch.float64)
        assert torch.equal(got, u), f"layer {index} ({layer.input_kind}): {got.tolist()} != {u.tolist()}"
        width_prev = layer.out_features


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.transform}-{c.in_dim}-{c.out_dim}-{c.shuffle}")
def test_input_spans_are_exactly_the_contiguous_chunks(config):
    """hgt_input_span (the 16-byte operand loads) against the element addressing: a chunk is one
    span iff its len features are consecutive columns of one source, starting at that column."""
    math = _math()
    width_prev = 0
    for index, layer in enumerate(config.layers):
        kind, group_in = KIND_CODES[layer.input_kind], layer.in_features // layer.groups
        columns = math.input_columns(kind, config.in_dim, width_prev, layer.groups, group_in)
        for length in (4, 8):  # fp32 and 16-bit chunks of 16 bytes
            spans = iter(math.input_spans(kind, config.in_dim, width_prev, layer.groups, group_in, length))
            for j in range(layer.groups):
                for k in range(group_in - length + 1):
                    span, col = next(spans)
                    chunk = columns[j * group_in + k: j * group_in + k + length]
                    contiguous = all(c == (chunk[0][0], chunk[0][1] + i) for i, c in enumerate(chunk))
                    if contiguous:
                        assert (span, col) == (math.span_x if chunk[0][0] else math.span_h, chunk[0][1]), \
                            (index, j, k, length)
                    else:
                        assert span == math.span_split, (index, j, k, length, chunk)
        width_prev = layer.out_features


def test_mix_chunk_straddling_x_and_h_is_split():
    """A mix group whose x part (p / g) is not a multiple of the chunk: the chunk holding the x -> h
    boundary must not be vector-loaded (hand-checked case, p = 12, g = 4: x part 3 features)."""
    math = _math()
    spans = math.input_spans(KIND_CODES["mix"], 12, 40, 4, 13, 4)  # group_in = 3 + 10
    assert spans[0] == (math.span_split, 0)          # k 0-3: x 0-2, then h
    assert spans[3] == (math.span_h, 0)              # k 3-6: h 0-3 of group 0
    assert spans[10] == (math.span_split, 3)         # group 1, k 0-3: x 3-5, then h
    assert spans[13] == (math.span_h, 10)            # group 1's h part starts at w_prev / g = 10


def test_alignment_rule():
    math = _math()
    assert math.is_aligned(0, 16) and math.is_aligned(2**40 + 48, 16)
    assert not math.is_aligned(8, 16) and not math.is_aligned(2**33 + 2, 16)
    assert math.is_aligned(2**33 + 4, 4) and not math.is_aligned(6, 4)


@pytest.mark.parametrize("groups,per_group", [(1, 7), (2, 6), (4, 11), (8, 44)])
def test_shuffle_positions_match_reference(groups, per_group):
    math = _math()
    z = torch.arange(groups * per_group).reshape(1, groups, per_group)  # value = un-shuffled index
    shuffled = reference.feature_shuffle(z).reshape(-1)
    for j in range(groups):
        for i in range(per_group):
            q = math.output_position(j, i, groups, per_group, 1)
            assert shuffled[q] == j * per_group + i
            assert math.output_position(j, i, groups, per_group, 0) == j * per_group + i
    for q in range(groups * per_group):
        assert math.unshuffled_index(q, groups, per_group, 1) == shuffled[q]
        assert math.unshuffled_index(q, groups, per_group, 0) == q


def test_element_offsets_past_2_31():
    math = _math()
    for row, stride, col, col_stride in [(2**27 + 5, 16, 3, 1), (2**31 - 1, 1024, 1023, 1),
                                         (3, 2**33, 7, 2**31)]:
        assert math.element_offset(row, stride, col, col_stride) == row * stride + col * col_stride


@pytest.mark.parametrize("rows", [1, 64, 65, 16_384, 2**31 - 1])
@pytest.mark.parametrize("scratch_per_cta", [0, 64 * 2176 * 2, 64 * 2176 * 4, 60 * 2**20])
def test_forward_grid_fits_l2_budget(rows, scratch_per_cta):
    math = _math()
    sms, per_sm, budget = 132, 2, int(50 * 2**20 * 0.75)
    tiles = -(-rows // 64)
    for in_global in (0, 1):
        grid = math.forward_grid(rows, 64, sms, per_sm, in_global, scratch_per_cta, budget)
        assert 1 <= grid <= min(tiles, sms * per_sm)
        if in_global and scratch_per_cta:
            fit = budget // scratch_per_cta
            assert grid * scratch_per_cta <= budget or fit == 0
            assert grid == max(1, min(tiles, sms * per_sm, fit)), "as many CTAs as the budget allows"
        else:
            assert grid == min(tiles, sms * per_sm)
