"""define_kernels' from_pretrained against transformers' own, on GPT-2 and Llama tiny configs:
dtype objects and strings, output_loading_info, device_map, config=, state_dict=, unknown
arguments, ignore_mismatched_sizes, class changes (causal LM <-> base model <-> sequence / token
classification / QA), partial checkpoints reported rather than raised, tying metadata after a
load, the supported version range."""
import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

from define_kernels.integrations import transformers as hf  # noqa: E402
from define_kernels.relatives import TiedOutput  # noqa: E402
from hf_models import CONFIGS, DEFINE, FAMILIES, LM_CLASSES, batch, converted, define_state, logits  # noqa: E402
from tolerances import assert_close  # noqa: E402

HEADS = ("AutoModelForSequenceClassification", "AutoModelForTokenClassification", "AutoModelForQuestionAnswering")


def plain_and_define_checkpoints(tmp_path, family, model_class=None, tie="map", **config):
    """A plain transformers checkpoint and a DeFINE one of the same family and class."""
    model_class = model_class or LM_CLASSES[family]
    torch.manual_seed(0)
    plain = model_class(CONFIGS[family](**config))
    plain.save_pretrained(tmp_path / "plain")
    torch.manual_seed(0)
    model = model_class(CONFIGS[family](**config))
    hf.use_define(model, tie=tie, **DEFINE)
    model.eval().save_pretrained(tmp_path / "define")
    return tmp_path / "plain", tmp_path / "define", model


def outcome(load):
    """("ok", model) or (exception type, message) of a load, to compare ours with transformers'."""
    try:
        return "ok", load()
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return type(error), str(error)


def floating_dtypes(model):
    return {p.dtype for p in model.parameters() if p.is_floating_point()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dtype_objects_and_strings(family, tmp_path):
    plain, path, model = plain_and_define_checkpoints(tmp_path, family)
    ids = batch()
    model_define, reference = define_state(model), logits(model, ids)
    for dtype in (torch.bfloat16, "bfloat16", "float16", "auto", torch.float32):
        theirs = LM_CLASSES[family].from_pretrained(plain, dtype=dtype)
        loaded = hf.from_pretrained(path, dtype=dtype)
        expected = floating_dtypes(theirs)
        assert floating_dtypes(loaded) == expected, dtype
        want = torch.float32 if dtype == "auto" else getattr(torch, dtype) if isinstance(dtype, str) else dtype
        assert expected == {want}
        assert all(torch.equal(v, model_define[k].to(want)) for k, v in define_state(loaded).items()), dtype
        # buffers (e.g. Llama's inv_freq) stay fp32 in a load, unlike model.to(): close, not equal
        assert_close(logits(loaded, ids).float(), reference, want, name=f"logits {dtype}")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # "auto" reads the saved dtype
    assert floating_dtypes(hf.from_pretrained(tmp_path / "bf16", dtype="auto")) == {torch.bfloat16}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_output_loading_info_device_map_and_config(family, tmp_path):
    plain, path, model = plain_and_define_checkpoints(tmp_path, family)
    loaded, info = hf.from_pretrained(path, output_loading_info=True)
    _, their_info = LM_CLASSES[family].from_pretrained(plain, output_loading_info=True)
    assert set(info) == set(their_info) and not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and type(loaded) is LM_CLASSES[family] and not loaded.training
    for device_map in ("cpu", {"": "cpu"}):  # transformers needs accelerate for any device_map
        ours = outcome(lambda: hf.from_pretrained(path, device_map=device_map))
        theirs = outcome(lambda: LM_CLASSES[family].from_pretrained(plain, device_map=device_map))
        assert ours[0] == theirs[0], (ours, theirs)
        if ours[0] == "ok":
            assert {p.device.type for p in ours[1].parameters()} == {"cpu"}
            assert getattr(ours[1], "hf_device_map", None) == getattr(theirs[1], "hf_device_map", None)
        else:
            assert ours[1] == theirs[1]
    config = transformers.AutoConfig.from_pretrained(path)
    config.num_hidden_layers = config.n_layer = 1  # config= wins over the saved one
    one_layer, info = hf.from_pretrained(path, config=config, output_loading_info=True)
    assert one_layer.config.num_hidden_layers == 1 and info["unexpected_keys"]  # layer 1's weights
    assert torch.equal(define_state(one_layer)["map_weight"], define_state(model)["map_weight"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unknown_arguments_raise_naming_them(family, tmp_path):
    plain, path, _ = plain_and_define_checkpoints(tmp_path, family)
    config = transformers.AutoConfig.from_pretrained(path)
    for kwargs in (dict(typo_argument=1), dict(config=config, typo_argument=1), dict(device="cpu")):
        name = next(k for k in kwargs if k != "config")
        with pytest.raises(TypeError, match=name):
            hf.from_pretrained(path, **kwargs)
        with pytest.raises(TypeError, match=name):  # transformers says the same
            LM_CLASSES[family].from_pretrained(plain, **kwargs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ignore_mismatched_sizes_for_another_label_count(family, tmp_path):
    classifier = transformers.AutoModelForSequenceClassification
    plain, path, model = plain_and_define_checkpoints(tmp_path, family, classifier._model_mapping[
        type(CONFIGS[family]())], num_labels=2)
    ours = outcome(lambda: hf.from_pretrained(path, classifier, num_labels=5))
    theirs = outcome(lambda: classifier.from_pretrained(plain, num_labels=5))
    assert ours[0] == theirs[0] and ours[0] is not None and ours[0] != "ok"
    loaded, info = hf.from_pretrained(path, classifier, num_labels=5, ignore_mismatched_sizes=True,
                                      output_loading_info=True)
    assert [key for key, *_ in info["mismatched_keys"]] == ["score.weight"]
    assert loaded.score.weight.shape == (5, loaded.config.hidden_size if family == "llama" else loaded.config.n_embd)
    assert all(torch.equal(v, define_state(model)[k]) for k, v in define_state(loaded).items())
    assert logits(loaded, batch()).shape == (2, 5)


def check_class_change(loaded, info, theirs_info, source, ids):
    """What a class change must give: the DeFINE weights of `source`, the body's hidden states,
    new heads missing as transformers reports them for its own model (transformers alone also
    misses the whole body where the classes name it differently, Llama's QA: not counted)."""
    assert all(torch.equal(v, define_state(source)[k]) for k, v in define_state(loaded).items())
    body = loaded.base_model_prefix + "."
    assert info["missing_keys"] == {k for k in theirs_info["missing_keys"] if not k.startswith(body)}
    assert not info["mismatched_keys"]
    with torch.no_grad():
        expected = source(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        got = loaded(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tie", ["map", "none"])
def test_causal_lm_checkpoint_loads_into_base_model_and_task_heads(family, tie, tmp_path):
    plain, path, model = plain_and_define_checkpoints(tmp_path, family, tie=tie)
    ids = batch()
    head_keys = {"map": {"lm_head.proj.weight"}, "none": {"lm_head.weight"}}[tie]
    for name in ("AutoModel",) + HEADS:
        auto = getattr(transformers, name)
        loaded, info = hf.from_pretrained(path, auto, output_loading_info=True)
        _, theirs_info = auto.from_pretrained(plain, output_loading_info=True)
        assert loaded.get_output_embeddings() is None and not any(isinstance(m, TiedOutput) for m in loaded.modules())
        assert info["unexpected_keys"] == head_keys, name  # the LM head is all the checkpoint has more
        assert bool(info["missing_keys"]) == (name != "AutoModel"), name
        check_class_change(loaded, info, theirs_info, model, ids)
    classifier = hf.from_pretrained(path, transformers.AutoModelForSequenceClassification, num_labels=3)
    classifier.train()  # fine-tunes: the loss reaches the DeFINE weights
    loss = classifier(input_ids=ids, labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert torch.isfinite(loss) and hf.define_embedding(classifier).map_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_base_model_and_classifier_checkpoints_load_as_causal_lm(family, tmp_path):
    ids = batch()
    for source_class in (transformers.AutoModel, transformers.AutoModelForSequenceClassification):
        concrete = source_class._model_mapping[type(CONFIGS[family]())]
        plain, path, source = plain_and_define_checkpoints(tmp_path / concrete.__name__, family, concrete)
        loaded, info = hf.from_pretrained(path, output_loading_info=True)
        _, theirs_info = LM_CLASSES[family].from_pretrained(plain, output_loading_info=True)
        assert type(loaded) is LM_CLASSES[family]
        head = loaded.get_output_embeddings()
        assert isinstance(head, TiedOutput) and head.table is hf.define_embedding(loaded).map_weight
        # transformers reports its own tied lm_head.weight as present; ours is the projection
        assert info["missing_keys"] - {"lm_head.proj.weight"} == theirs_info["missing_keys"] - {"lm_head.weight"}
        assert "lm_head.proj.weight" in info["missing_keys"]
        assert info["unexpected_keys"] == theirs_info["unexpected_keys"]
        check_class_change(loaded, dict(info, missing_keys=info["missing_keys"] - {"lm_head.proj.weight"}),
                           dict(theirs_info, missing_keys=theirs_info["missing_keys"] - {"lm_head.weight"}), source, ids)
        assert torch.isfinite(logits(loaded, ids)).all() and head.proj.weight.abs().sum() > 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_state_dict_argument_and_partial_checkpoints_are_reported(family):
    model, _ = converted(family)
    ids = batch()
    expected = logits(model, ids)
    loaded = hf.from_pretrained(None, config=model.config, state_dict=model.state_dict())
    assert torch.equal(logits(loaded, ids), expected)
    state = dict(model.state_dict())
    prefix = next(name for name, m in model.named_modules() if m is hf.define_embedding(model))
    dropped = f"{prefix}.hgt.layers.0.weight"
    saved_layer = state.pop(dropped)
    state.pop("lm_head.proj.weight")
    state["bogus.weight"] = torch.zeros(3)
    loaded, info = hf.from_pretrained(None, config=model.config, state_dict=state, output_loading_info=True)
    assert info["missing_keys"] == {dropped, "lm_head.proj.weight"} and info["unexpected_keys"] == {"bogus.weight"}
    layer = hf.define_embedding(loaded).hgt.layers[0].weight.detach()
    fresh = hf.define_embedding(converted(family)[0]).hgt.layers[0].weight.detach()
    assert torch.isfinite(layer).all() and not torch.equal(layer, saved_layer)  # DeFINE's own init
    assert 0.7 < (layer.std() / fresh.std()).item() < 1.4
    kept = {k: v for k, v in define_state(model).items() if k != "hgt.layers.0.weight"}
    assert all(torch.equal(define_state(loaded)[k], v) for k, v in kept.items())


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tie", ["map", "none"])
def test_loaded_models_tying_metadata_and_second_round_trip(family, tie, tmp_path):
    _, path, _ = plain_and_define_checkpoints(tmp_path, family, tie=tie)
    loaded = hf.from_pretrained(path)
    assert loaded.all_tied_weights_keys == {} and loaded.config.tie_word_embeddings is False
    assert "lm_head.weight" not in str(loaded._tied_weights_keys)
    loaded.save_pretrained(tmp_path / "again")
    again, info = hf.from_pretrained(tmp_path / "again", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(logits(again, batch()), logits(loaded, batch()))


def test_bad_arguments_are_named(tmp_path):
    _, path, _ = plain_and_define_checkpoints(tmp_path, "gpt2")
    with pytest.raises(TypeError, match="model_class"):
        hf.from_pretrained(path, int)
    with pytest.raises(TypeError, match="pretrained_model_name_or_path"):
        hf.from_pretrained(123)
    with pytest.raises(TypeError, match="config"):
        hf.from_pretrained(path, config=123)
    with pytest.raises(ValueError, match="config="):
        hf.from_pretrained(None)


def test_supported_range_is_what_setup_py_asks_for(monkeypatch, tmp_path):
    root = os.path.join(os.path.dirname(__file__), "..")
    setup = open(os.path.join(root, "setup.py"), encoding="utf-8").read()
    low, high = re.search(r'"transformers>=([0-9.]+),<([0-9]+)"', setup).groups()
    assert tuple(int(x) for x in low.split(".")) == hf.MIN_TRANSFORMERS
    ci = open(os.path.join(root, ".ci", "run"), encoding="utf-8").read()
    assert re.search(r"^HF_LOWEST=([0-9.]+)$", ci, re.M).group(1) in (low, low + ".0")  # CI tests the floor
    installed = tuple(int(x) for x in re.findall(r"[0-9]+", transformers.__version__)[:2])
    assert hf.MIN_TRANSFORMERS <= installed < (int(high), 0)
    monkeypatch.setattr(transformers, "__version__", "5.3.0")  # below the range: a clear error
    with pytest.raises(ImportError, match=r"transformers>=5\.4.*5\.3\.0"):
        hf.from_pretrained(tmp_path)
