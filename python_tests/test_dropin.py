"""nn.Embedding parity (issue #10 item 3) and self-describing checkpoints (item 4)."""
import pytest
import torch
from torch import nn

from define_kernels import HGT, DeFINE, HGTConfig
from tolerances import assert_close

SMALL = dict(map_dim=8, expand_dim=32, depth=3, max_groups=4)


def small_define(**options):
    return DeFINE(50, 12, **{**SMALL, **options})


# ------------------------------------------------------------------------------ factory kwargs
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_device_and_dtype_factory_kwargs(dtype):
    model = small_define(in_proj_dim=16, device="cpu", dtype=dtype)
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in model.parameters())
    assert model(torch.tensor([1, 2])).dtype == dtype
    stack = HGT(HGTConfig(8, 16, 4, 2, 2), dtype=dtype)
    assert all(p.dtype == dtype for p in stack.parameters())


def test_meta_construction_then_to_empty_reset_parameters_and_training():
    with torch.device("meta"):
        model = small_define(padding_idx=0, in_proj_dim=16)
    assert model.map_weight.is_meta
    ids = torch.tensor([[0, 4, 4], [7, 49, 1]])
    y = model(ids.to("meta"))  # shape inference on meta: no dedup (aten::_unique2 has no meta kernel)
    assert y.shape == (2, 3, 12) and y.is_meta
    y.sum().backward()
    model.to_empty(device="cpu")
    model.reset_parameters()
    assert torch.equal(model.map_weight[0], torch.zeros(8))
    assert model.in_proj.weight.abs().sum() > 0 and torch.equal(model.in_proj_norm.weight, torch.ones(16))
    fresh = small_define(padding_idx=0, in_proj_dim=16)
    fresh.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(ids).pow(2).mean().backward()
        optimizer.step()
    assert not torch.equal(model.map_weight, fresh.map_weight)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unknown_keyword_names_define_and_the_keyword():
    with pytest.raises(TypeError, match=r"DeFINE.__init__\(\) got an unexpected keyword argument 'mx_groups'"):
        small_define(mx_groups=4)
    with pytest.raises(TypeError, match="'in_dim'"):
        small_define(in_dim=8)  # set by DeFINE itself, not an HGT option


def test_weight_attribute_explains_itself():
    model = small_define()
    assert not hasattr(model, "weight")
    with pytest.raises(AttributeError, match="map_weight.*TiedOutput.*materialize_cache"):
        model.weight
    with pytest.raises(AttributeError, match="has no attribute 'wieght'"):
        model.wieght  # other names keep nn.Module's message


def test_from_embedding_keeps_vocab_padding_and_the_tables_principal_geometry():
    torch.manual_seed(4)
    basis = torch.randn(3, 20)
    weight = torch.randn(50, 3) @ basis + 0.5  # rank 3 around an offset
    embedding = nn.Embedding(50, 20, padding_idx=2)
    with torch.no_grad():
        embedding.weight.copy_(weight)
    model = DeFINE.from_embedding(embedding, map_dim=4, expand_dim=32, depth=2, max_groups=2)
    assert (model.num_embeddings, model.embedding_dim, model.padding_idx) == (50, 20, 2)
    assert torch.equal(model.map_weight[2], torch.zeros(4))
    rows = model.map_weight.detach().double()
    centred = weight.double() - weight.double().mean(0)
    # Pairwise distances are preserved up to the common rescale (rank 3 fits in 4 dims).
    distances, expected = torch.cdist(rows, rows), torch.cdist(centred, centred)
    keep = torch.ones(50, dtype=torch.bool)
    keep[2] = False
    ratio = distances[keep][:, keep] / expected[keep][:, keep].clamp_min(1e-12)
    off_diagonal = ~torch.eye(49, dtype=torch.bool)
    assert ratio[off_diagonal].std() < 1e-6 * ratio[off_diagonal].mean()
    assert abs(rows.pow(2).mean().item() ** 0.5 - 4 ** -0.5) < 0.05
    with pytest.raises(ValueError, match="map_dim"):
        DeFINE.from_embedding(embedding, map_dim=32, expand_dim=64)


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("option, value", [("act", "relu"), ("shuffle", True), ("transform", "hgt"),
                                           ("padding_idx", 0), ("scale_map", False), ("norm", None)])
def test_checkpoint_with_other_options_raises_naming_the_option(option, value):
    source = small_define(**{option: value})
    with pytest.raises(ValueError, match=f"{option}=.*in the checkpoint"):
        small_define().load_state_dict(source.state_dict())


def test_checkpoint_runtime_options_may_differ():
    source = small_define(dropout=0.2, dedup=False, cache=False)
    target = small_define(dropout=0.0, sparse=True)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.map_weight, source.map_weight)


def test_loading_an_unpadded_table_into_a_padding_model_zeroes_the_padding_row():
    source = small_define()
    state = {k: v for k, v in source.state_dict().items() if k != "_extra_state"}
    assert source.map_weight[5].abs().sum() > 0
    target = small_define(padding_idx=5)
    target.load_state_dict(state)
    assert torch.equal(target.map_weight[5], torch.zeros(8))
    assert torch.equal(target.map_weight[4], source.map_weight[4])


def test_old_checkpoints_without_extra_state_still_load_strictly():
    source = small_define(act="relu")
    state = {k: v for k, v in source.state_dict().items() if k != "_extra_state"}
    target = small_define()  # other act: not detectable without the description, as before
    result = target.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_extra_state_is_a_tensor_and_round_trips_through_torch_save(tmp_path):
    source = small_define(padding_idx=1, shuffle=True)
    state = source.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # safetensors-friendly
    torch.save(state, tmp_path / "ckpt.pt")
    target = small_define(padding_idx=1, shuffle=True)
    target.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    ids = torch.tensor([1, 3, 9])
    assert torch.equal(target(ids), source(ids))
    nested = nn.Sequential(small_define(padding_idx=1, shuffle=True))
    nested.load_state_dict({"0." + k: v for k, v in state.items()})
    with pytest.raises(ValueError, match="shuffle=True in the checkpoint but False here"):
        nn.Sequential(small_define(padding_idx=1)).load_state_dict({"0." + k: v for k, v in state.items()})
