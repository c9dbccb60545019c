"""Hugging Face integration: GPT-2 and Llama from tiny configs (no download) turned into DeFINE
models; parameter counts and the size warning, tied logits by hand, training, generate,
save/reload, tie_weights and the tying metadata, resize_token_embeddings, new-token map rows.
Loading (from_pretrained's transformers parity): test_hf_loading.py."""
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

from define_kernels import DeFINE  # noqa: E402
from define_kernels.integrations import transformers as hf  # noqa: E402
from define_kernels.relatives import TiedOutput  # noqa: E402
from hf_models import DEFINE, FAMILIES, HIDDEN, VOCAB, batch, converted, gpt2, llama, logits  # noqa: E402
from tolerances import assert_close  # noqa: E402


def has_full_table(model, vocab):
    return any(p.dim() == 2 and p.shape[0] == vocab and p.shape[1] == HIDDEN for p in model.parameters())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_conversion_swaps_embeddings_and_head_and_drops_parameters(family):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    before = hf.count_parameters(model)
    padding = model.get_input_embeddings().padding_idx
    report = hf.use_define(model, **DEFINE)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, DeFINE) and embedding.num_embeddings == VOCAB
    assert embedding.embedding_dim == HIDDEN and embedding.padding_idx == padding
    assert isinstance(head, TiedOutput) and head.table is embedding.map_weight
    assert report.parameters_before == before
    assert report.parameters_after == hf.count_parameters(model) < before
    assert not has_full_table(model, VOCAB)  # neither the old wte/embed_tokens nor lm_head is left
    assert "->" in str(report)
    saved = model.config.define_kernels
    assert saved["tie"] == "map" and saved["define"]["map_dim"] == DEFINE["map_dim"]
    assert saved["define"]["padding_idx"] == padding


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tied_logits_are_projected_hidden_times_map_table(family):
    model, _ = converted(family)
    ids = batch()
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        head = model.get_output_embeddings()
        expected = F.linear(hidden.double() @ head.proj.weight.double().t(),
                            model.get_input_embeddings().map_weight.double())
    assert_close(out.logits, expected.float(), torch.float32, name="logits")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tie", ["map", "none"])
def test_training_lowers_the_loss_and_reaches_define_parameters(family, tie):
    model, _ = converted(family, tie=tie, dropout=0.1)
    model.train()
    ids = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        embedding = model.get_input_embeddings()
        assert embedding.map_weight.grad is not None and embedding.map_weight.grad.abs().sum() > 0
        assert all(p.grad is not None for p in embedding.hgt.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    padding = model.get_input_embeddings().padding_idx
    if padding is not None:  # Llama: the tied head must not train the padding row either
        assert torch.count_nonzero(model.get_input_embeddings().map_weight[padding]) == 0


def test_tied_head_reads_the_padding_row_as_zero():
    model, _ = converted("llama")
    with torch.no_grad():  # even a non-zero padding row (e.g. set by hand) gives the pad logit 0
        model.get_input_embeddings().map_weight[0].fill_(1.0)
    assert torch.count_nonzero(logits(model, batch())[..., 0]) == 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_is_greedy_over_the_define_logits(family):
    model, _ = converted(family)
    model.eval()
    prompt = batch()[:, :5]
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], prompt)
    for step in range(4):  # each new token is the argmax of the logits of the sequence so far
        assert torch.equal(out[:, 5 + step], logits(model, out[:, :5 + step])[:, -1].argmax(-1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tie", ["map", "none"])
def test_save_and_from_pretrained_give_identical_logits(family, tie, tmp_path):
    model, _ = converted(family, tie=tie, shuffle=True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # move away from the init
    loss = model(input_ids=batch(), labels=batch()).loss
    loss.backward()
    optimizer.step()
    model.eval()
    ids = batch(seed=2)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert isinstance(loaded.get_input_embeddings(), DeFINE)
    assert loaded.get_input_embeddings().config == model.get_input_embeddings().config
    assert torch.equal(logits(loaded, ids), expected)
    concrete = hf.from_pretrained(tmp_path, type(model))  # a concrete class works as well
    assert torch.equal(logits(concrete, ids), expected)
    model.save_pretrained(tmp_path / "shards", max_shard_size="100KB")  # several files + index
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) > 1
    assert torch.equal(logits(hf.from_pretrained(tmp_path / "shards"), ids), expected)


def test_from_pretrained_refuses_a_plain_checkpoint(tmp_path):
    gpt2().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="define_kernels"):
        hf.from_pretrained(tmp_path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tie_weights_keeps_the_head_on_the_map_table(family):
    model, _ = converted(family)
    ids = batch()
    expected = logits(model, ids)
    model.tie_weights()
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, TiedOutput) and head.table is embedding.map_weight
    assert torch.equal(logits(model, ids), expected)
    # Tied for real: a change of the map table moves the logits.
    with torch.no_grad():
        embedding.map_weight[5].add_(1.0)
    assert not torch.equal(logits(model, ids), expected)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tie", ["map", "none"])
def test_resize_token_embeddings_grows_and_shrinks_the_map_table(family, tie, tmp_path):
    model, _ = converted(family, tie=tie)
    embedding = model.get_input_embeddings()
    old_table = embedding.map_weight.detach().clone()
    ids = batch(vocab=900)
    expected = logits(model, ids)[..., :900]

    grown = model.resize_token_embeddings(1010, pad_to_multiple_of=8)
    assert grown is embedding and embedding.num_embeddings == 1016 == model.config.vocab_size
    assert embedding.map_weight.shape == (1016, DEFINE["map_dim"])
    assert torch.equal(embedding.map_weight[:VOCAB], old_table)
    rows = torch.ones(VOCAB, dtype=torch.bool)
    if embedding.padding_idx is not None:
        rows[embedding.padding_idx] = False
    assert_close(embedding.map_weight[VOCAB:], old_table[rows].mean(0).expand(16, -1), torch.float32,
                 name="mean-resized rows")
    out = logits(model, ids)
    assert out.shape[-1] == 1016
    assert_close(out[..., :900], expected, torch.float32, name="kept logits")
    if tie == "map":
        assert model.get_output_embeddings().table is embedding.map_weight

    model.resize_token_embeddings(900, mean_resizing=False)
    assert embedding.map_weight.shape[0] == 900 == model.config.vocab_size
    assert torch.equal(embedding.map_weight, old_table[:900])
    assert logits(model, ids).shape[-1] == 900
    if embedding.padding_idx is not None:
        assert embedding.map_weight[embedding.padding_idx].abs().sum() == 0

    model.train()
    loss = model(input_ids=ids, labels=ids).loss  # trains after a resize
    loss.backward()
    assert embedding.map_weight.grad.shape == (900, DEFINE["map_dim"])
    model.eval()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(hf.from_pretrained(tmp_path), ids), expected)


def test_resize_keeps_the_padding_row():
    model, _ = converted("llama")  # pad_token_id=0 -> DeFINE padding_idx 0
    embedding = model.get_input_embeddings()
    assert embedding.padding_idx == 0
    model.resize_token_embeddings(1100)
    assert embedding.map_weight[0].abs().sum() == 0
    model, _ = converted("gpt2", padding_idx=950)
    with pytest.raises(ValueError, match="padding"):
        model.resize_token_embeddings(900)
    with pytest.raises(ValueError, match="new_num_tokens"):
        model.resize_token_embeddings(0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="tie"):
        hf.use_define(gpt2(), tie="lm_head")
    with pytest.raises(ValueError, match="PreTrainedModel"):
        hf.use_define(torch.nn.Linear(2, 2))
    model, _ = converted("gpt2")
    with pytest.raises(ValueError, match="already"):
        hf.use_define(model)
    with pytest.raises(ValueError, match="JSON"):
        hf.use_define(gpt2(), backend=object())


def shared_storage_pairs(model):
    """{(name, name)} of distinct parameter names that share storage (what the model really ties)."""
    seen, pairs = {}, set()
    for name, param in model.named_parameters(remove_duplicate=False):
        key = param.untyped_storage().data_ptr()
        if key in seen:
            pairs.add((name, seen[key]))
        else:
            seen[key] = name
    return pairs


def declared_ties(model):
    """Every tie the model declares, by parameter name (transformers' bookkeeping)."""
    declared = set(model.get_expanded_tied_weights_keys(all_submodels=True).items())
    for prefix, module in model.named_modules():
        if isinstance(module, transformers.PreTrainedModel) and module._tied_weights_keys:
            keys = module._tied_weights_keys
            declared |= {(f"{prefix}.{t}".lstrip("."), f"{prefix}.{s}".lstrip(".")) for t, s in
                         (keys.items() if isinstance(keys, dict) else ((k, "") for k in keys))}
    return declared


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tie", ["map", "none"])
def test_tying_metadata_matches_what_the_model_shares(family, tie):
    model = FAMILIES[family]()
    assert "lm_head.weight" in type(model)._tied_weights_keys  # the class declares the HF tie
    model, _ = converted(family, tie=tie)
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    assert "lm_head.weight" not in declared_ties(model) and "lm_head.weight" not in str(declared_ties(model))
    for target, source in declared_ties(model):  # nothing declared may name a parameter that is gone
        assert target in names and (not source or source in names), (target, source)
    assert model.all_tied_weights_keys == {} and set(model.all_tied_weights_keys.items()) == shared_storage_pairs(model)
    assert model.config.tie_word_embeddings is False and model.config.get_text_config().tie_word_embeddings is False
    ids = batch()
    expected = logits(model, ids)
    model.tie_weights()  # recomputes the mapping from the config: still nothing to tie by name
    assert torch.equal(logits(model, ids), expected) and model.all_tied_weights_keys == {}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_conversion_of_models_without_an_lm_head(family):
    """Base models and classifiers convert with the defaults: no head to tie, tie kept for later."""
    config = {"gpt2": gpt2, "llama": llama}[family]().config
    for model_class in (transformers.AutoModel, transformers.AutoModelForSequenceClassification):
        model = model_class.from_config(config)
        report = hf.use_define(model, **DEFINE)
        assert report.head == "none" and "no LM head" in str(report)
        assert model.get_output_embeddings() is None and isinstance(model.get_input_embeddings(), DeFINE)
        assert model.config.define_kernels["tie"] == "map"
        assert not any(isinstance(m, TiedOutput) for m in model.modules())


@pytest.mark.parametrize("tie", ["map", "none"])
def test_small_model_warns_with_options_that_do_shrink_it(tie):
    """A GPT-2 with V=5,000 and width 128 grows under the defaults; the warning's options shrink it."""
    config = transformers.GPT2Config(vocab_size=5000, n_embd=128, n_layer=1, n_head=2, n_positions=32,
                                     bos_token_id=1, eos_token_id=2)
    before = hf.count_parameters(transformers.GPT2LMHeadModel(config))
    with pytest.warns(hf.DeFINESizeWarning, match="larger") as record:
        report = hf.use_define(transformers.GPT2LMHeadModel(config), tie=tie)
    assert report.parameters_after > report.parameters_before == before
    text = str(record[0].message)
    assert f"{report.parameters_before:,}" in text and f"{report.parameters_after:,}" in text
    options = eval(f"dict({re.search(r'use_define[(]model, (.*?)[)] gives', text).group(1)})")  # noqa: S307
    promised = int(re.search(r"gives ([0-9,]+) parameters", text).group(1).replace(",", ""))
    assert ("tie" in options) == (tie == "none")  # an untied head is the first thing to tie
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf.DeFINESizeWarning)
        smaller = hf.use_define(transformers.GPT2LMHeadModel(config), **{"tie": tie, **options})
    assert smaller.parameters_after == promised < before


def test_no_size_warning_where_define_shrinks_the_model():
    config = transformers.GPT2Config(vocab_size=20000, n_embd=256, n_layer=1, n_head=2, n_positions=32,
                                     bos_token_id=1, eos_token_id=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf.DeFINESizeWarning)
        report = hf.use_define(transformers.GPT2LMHeadModel(config))  # the defaults
    assert report.parameters_after < report.parameters_before


def test_size_warning_says_when_nothing_shrinks_the_model():
    config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                     bos_token_id=1, eos_token_id=2)
    with pytest.warns(hf.DeFINESizeWarning, match="keep nn.Embedding"):
        hf.use_define(transformers.GPT2LMHeadModel(config), map_dim=16, expand_dim=64, depth=2, max_groups=2)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_init_map_rows_sets_new_tokens_from_the_mean(family):
    """The DeFINE form of `embeddings.weight[new_ids] = embeddings.weight[:old].mean(0)`."""
    model, _ = converted(family)
    model.resize_token_embeddings(VOCAB + 4, mean_resizing=False)
    embedding = model.get_input_embeddings()
    new_ids = list(range(VOCAB, VOCAB + 4))
    ids = torch.tensor([[5, VOCAB + 1]])
    before = model(input_ids=ids).logits.detach()
    mean = hf.init_map_rows(model, new_ids)
    table = embedding.map_weight.detach()
    rows = torch.ones(VOCAB + 4, dtype=torch.bool)
    rows[new_ids] = False
    if embedding.padding_idx is not None:
        rows[embedding.padding_idx] = False
    assert_close(mean, table[rows].mean(0), torch.float32, name="mean row")
    assert all(torch.equal(table[i], mean) for i in new_ids)
    assert not torch.equal(model(input_ids=ids).logits.detach(), before)  # no stale inference table
    hf.init_map_rows(embedding, [VOCAB], from_ids=[7, 9])  # a few related tokens
    assert_close(table[VOCAB], table[[7, 9]].mean(0), torch.float32, name="mean of two rows")
    with pytest.raises(ValueError, match="new_ids"):
        hf.init_map_rows(model, [VOCAB + 4])
    with pytest.raises(ValueError, match="from_ids"):
        hf.init_map_rows(model, [VOCAB], from_ids=[0.5])
    if embedding.padding_idx is not None:
        with pytest.raises(ValueError, match="padding"):
            hf.init_map_rows(model, [embedding.padding_idx])
