"""Converted transformers causal LMs computing their training loss through the fused LM head
(integrations/transformers/fused_loss.py): the same loss and gradients as the model's own
logits + cross-entropy, logits unchanged where they are used (eval, generate)."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

from define_kernels.integrations.transformers import use_define  # noqa: E402
from define_kernels.integrations.transformers.fused_loss import enable_fused_loss  # noqa: E402
from test_hf import DEFINE, VOCAB, gpt2, llama  # noqa: E402
from tolerances import assert_close  # noqa: E402


def converted(make, tie="map"):
    torch.manual_seed(0)
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        use_define(model, tie=tie, **DEFINE)
    model.config.use_cache = False
    return model.train()


def batch():
    ids = torch.randint(0, VOCAB, (2, 12))
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def loss_and_grads(model, **kwargs):
    torch.manual_seed(1)  # the same dropout masks in both runs
    out = model(**kwargs)
    return out, torch.autograd.grad(out.loss, list(model.parameters()))


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("tie", ["map", "none"])
def test_fused_training_loss_equals_the_models_own(make, tie):
    model = converted(make, tie)
    ids, labels = batch()
    expected, expected_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    enable_fused_loss(model)
    fused, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert fused.logits is None
    assert_close(fused.loss, expected.loss, name="loss")
    for grad, want in zip(grads, expected_grads):
        assert_close(grad, want, name="gradient")
    # gradient accumulation's sum / num_items_in_batch, and the tuple form
    items = torch.tensor(17)
    torch.manual_seed(1)
    fused_sum = model(input_ids=ids, labels=labels, num_items_in_batch=items).loss
    enable_fused_loss(model, enabled=False)
    torch.manual_seed(1)
    own_sum = model(input_ids=ids, labels=labels, num_items_in_batch=items).loss
    assert_close(fused_sum, own_sum, name="loss with num_items_in_batch")
    enable_fused_loss(model)
    torch.manual_seed(1)
    as_tuple = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert_close(as_tuple[0], fused.loss, name="tuple loss")


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_eval_and_generate_keep_logits(make):
    model = converted(make)
    ids, labels = batch()
    enable_fused_loss(model, label_smoothing=0.1)
    model.eval()
    out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 12, VOCAB)
    model.train()
    with torch.no_grad():
        assert model(input_ids=ids, labels=labels).logits is not None
    model.eval()
    generated = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 7)


def test_fused_loss_options_and_errors():
    model = converted(llama)
    ids, labels = batch()
    enable_fused_loss(model, label_smoothing=0.1, z_loss=1e-3)
    torch.manual_seed(1)
    fused = model(input_ids=ids, labels=labels).loss
    model.eval()
    logits = model(input_ids=ids).logits
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    flat = logits.reshape(-1, VOCAB)
    keep = shifted != -100
    want = torch.nn.functional.cross_entropy(flat, shifted, label_smoothing=0.1) \
        + 1e-3 * (torch.logsumexp(flat[keep], 1) ** 2).mean()
    assert_close(fused, want, name="smoothed loss with z-loss")
    with pytest.raises(TypeError, match="smoothing"):
        enable_fused_loss(model, smoothing=0.1)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        enable_fused_loss(bert)
