"""LM quality benchmark (bench/lm): data, variants, parameter split, and the trainer end to end
on a slice of PTB (tiny model, few steps), including resuming from a checkpoint."""
import csv
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root holds bench/

from bench.lm import data, report, train  # noqa: E402
from tolerances import assert_close  # noqa: E402
from bench.lm.model import LanguageModel, LSTMContext, TransformerContext  # noqa: E402
from bench.lm.variants import VARIANTS, LayerSizes, build_layers, parameter_split  # noqa: E402

TEXT = {"train": "a b a c\nb a d\n\na e a\n", "valid": "a b\nc\n", "test": "e d a\n"}


@pytest.fixture
def tiny_corpus_dir(tmp_path):
    for split, text in TEXT.items():
        (tmp_path / f"{split}.txt").write_text(text)
    return tmp_path


def ptb_dir() -> Path:
    try:
        root = data.data_root()
    except FileNotFoundError as error:
        pytest.skip(f"corpora not available: {error}")
    return root


def test_vocabulary_orders_by_frequency_and_counts_eos(tiny_corpus_dir):
    corpus = data.load_corpus(str(tiny_corpus_dir))
    assert corpus.vocab.words[:3] == ["a", data.EOS, "b"]  # 5 a, 4 <eos> (blank line too), 2 b
    assert len(corpus.vocab) == 6
    assert corpus.train.numel() == 10 + 4  # words + one <eos> per line
    assert corpus.valid.tolist() == [0, 2, 1, 3, 1]
    (tiny_corpus_dir / "test.txt").write_text("zzz\n")
    with pytest.raises(ValueError, match="test holds 'zzz'"):
        data.load_corpus(str(tiny_corpus_dir))
    with pytest.raises(ValueError, match="dataset"):
        data.load_corpus("no-such-dataset", str(tiny_corpus_dir))


def test_batchify_and_bptt_chunks_cover_the_stream():
    stream = torch.arange(23)
    batches = data.batchify(stream, 4)
    assert batches.shape == (5, 4) and batches[:, 1].tolist() == [5, 6, 7, 8, 9]
    chunks = list(data.bptt_chunks(batches, 3))
    assert [c[0] for c in chunks] == [0, 3]
    assert torch.equal(torch.cat([c[2] for c in chunks]), batches[1:])
    with pytest.raises(ValueError, match="batch_size"):
        data.batchify(torch.arange(5), 4)


@pytest.mark.parametrize("name,vocab,counts", [("ptb", 10_000, (929_589, 73_760, 82_430)),
                                               ("wt2", 33_278, (2_088_628, 217_646, 245_569))])
def test_corpora_have_the_standard_counts(name, vocab, counts):
    """The vocabulary sizes and token counts of ../shared/data/README.md (one <eos> per line)."""
    corpus = data.load_corpus(name, str(ptb_dir()))
    assert len(corpus.vocab) == vocab
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == counts


SIZES = LayerSizes(vocab=60, emb_dim=16, hidden_dim=16, map_dim=8, expand_dim=24, depth=2, max_groups=2,
                   slim_subvectors=2, slim_pool=16)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_a_step_and_splits_its_parameters(variant):
    layers = build_layers(variant, SIZES)
    context = LSTMContext(16, 16, 1, 0.0)
    model = LanguageModel(layers.encoder, context, layers.decoder, 0.1, layers.loss)
    split = parameter_split(layers, context)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert split["total"] == sum(unique.values())
    assert split["context"] == sum(p.numel() for p in context.parameters())
    expected_output = {"untied": 16 * 60 + 60, "adaptive": 16 * 60 + 60, "tied": 0, "tied_al": 0,
                       "slim": 16 * 16 // 2 + 60}.get(variant, 16 * 8)  # DeFINE: bias-free H -> n
    assert split["output"] == expected_output
    c0, c1 = SIZES.adaptive_cutoffs  # band widths 16, 16/4, 16/16
    expected_embedding = {"untied": 60 * 16, "tied": 60 * 16, "tied_al": 60 * 16, "slim": 16 * 16 // 2,
                          "adaptive": c0 * 16 + (c1 - c0) * 4 + (60 - c1) * 1}.get(variant, 60 * 8)
    assert split["embedding"] == expected_embedding
    inputs, targets = torch.randint(0, 60, (5, 3)), torch.randint(0, 60, (5, 3))
    objective, cross_entropy, _ = model(inputs, targets)
    objective.backward()
    assert math.isfinite(float(objective.detach())) and float(cross_entropy) > 0
    assert all(p.grad is not None for p in model.parameters())


def test_transformer_context_is_causal():
    torch.manual_seed(0)
    context = TransformerContext(16, 2, 4, 0.0).eval()
    x = torch.randn(6, 2, 16)
    y, _ = context(x, None)
    x2 = x.clone()
    x2[4:] += torch.randn(2, 2, 16)
    y2, _ = context(x2, None)
    assert_close(y[:4], y2[:4], name="outputs before the change")
    assert not torch.allclose(y[4:], y2[4:]), "later positions must see the change"


def tiny_args(tmp_path, *extra):
    return ["--dataset", "ptb", "--data-dir", str(ptb_dir()), "--train-tokens", "6000",
            "--eval-tokens", "1500", "--layers", "1", "--emb-dim", "16", "--hidden", "16", "--map-dim", "8",
            "--expand-dim", "24", "--depth", "2", "--max-groups", "2", "--batch-size", "8", "--bptt", "10",
            "--steps", "8", "--eval-interval", "4", "--lr", "2e-2", "--no-progress", "--no-plot",
            "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "lm.csv"), "--device", "cpu",
            *extra]


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core box one thread is much faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trainer_quick_path_end_to_end_and_resume(tmp_path, one_thread):
    rows = train.main(tiny_args(tmp_path, "--variants", "define"))
    assert len(rows) == 1
    row = rows[0]
    assert row["variant"] == "define" and row["steps"] == 8 and row["dataset"] == "ptb"
    assert 1 < row["val_ppl"] < 9_500 and 1 < row["test_ppl"] < 9_500  # uniform over V would be 10,000
    assert row["params_total"] == sum(row[f"params_{g}"] for g in ("embedding", "transform", "context", "output"))
    written = report.read_rows(tmp_path / "lm.csv")
    assert len(written) == 1 and written[0]["variant"] == "define" and float(written[0]["test_ppl"]) == row["test_ppl"]

    # A finished variant is skipped on --resume; a checkpoint without a result resumes from its step.
    checkpoint = next((tmp_path / "ckpt").glob("*/define.pt"))
    again = train.main(tiny_args(tmp_path, "--variants", "define", "--resume"))
    assert again[0]["test_ppl"] == row["test_ppl"]
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["progress"]["step"] == 8
    saved["row"] = None
    torch.save(saved, checkpoint)
    resumed = train.main(tiny_args(tmp_path, "--variants", "define", "--resume"))
    assert resumed[0]["steps"] == 8 and resumed[0]["val_ppl"] == row["val_ppl"]
    with open(tmp_path / "lm.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 3  # runs append


def test_trainer_transformer_and_plot(tmp_path, one_thread):
    rows = train.main(tiny_args(tmp_path, "--variants", "tied_al,slim", "--model", "transformer", "--heads", "2",
                                "--steps", "3"))
    assert [r["variant"] for r in rows] == ["tied_al", "slim"]
    assert all(math.isfinite(r["test_ppl"]) for r in rows)
    png = report.plot(tmp_path / "lm.csv")
    assert png.exists() and png.stat().st_size > 1000


def test_results_path_names_date_device_commit():
    path = report.results_path(torch.device("cpu"))
    assert path.name.startswith("lm_") and path.name.endswith(".csv") and "_cpu_" in path.name


def test_bad_arguments():
    with pytest.raises(SystemExit):
        train.parse_args(["--variants", "untied,bogus"])
    args = train.parse_args(["--quick"])
    assert args.steps == train.QUICK["steps"] and args.variants == list(VARIANTS)
