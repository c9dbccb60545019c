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
    model = LanguageModel(layers.encoder, context, layers.decoder, 0.1, layers.loss, layers.head)
    split = parameter_split(layers, context)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert split["total"] == sum(unique.values())
    assert split["context"] == sum(p.numel() for p in context.parameters())
    c0, c1 = SIZES.adaptive_cutoffs  # band widths 16, 16/4, 16/16
    adaptive_softmax = 16 * (c0 + 2) + (16 * 4 + 4 * (c1 - c0)) + (16 * 1 + 1 * (60 - c1))  # head + 2 tails
    expected_output = {"untied": 16 * 60 + 60, "adaptive": 16 * 60 + 60, "tied": 0, "tied_al": 0,
                       "tied_unfused": 0, "adaptive_softmax": adaptive_softmax,
                       "slim": 16 * 16 // 2 + 60}.get(variant, 16 * 8)  # DeFINE: bias-free H -> n
    assert split["output"] == expected_output
    adaptive_input = c0 * 16 + (c1 - c0) * 4 + (60 - c1) * 1
    expected_embedding = {"untied": 60 * 16, "tied": 60 * 16, "tied_al": 60 * 16, "tied_unfused": 60 * 16,
                          "slim": 16 * 16 // 2, "adaptive": adaptive_input,
                          "adaptive_softmax": adaptive_input}.get(variant, 60 * 8)
    assert split["embedding"] == expected_embedding
    assert layers.head == {"tied": "fused", "tied_al": "fused", "untied": "logits", "tied_unfused": "logits",
                           "slim": "logits", "adaptive": "logits", "adaptive_softmax": "adaptive"}.get(variant, "fused")
    inputs, targets = torch.randint(0, 60, (5, 3)), torch.randint(0, 60, (5, 3))
    targets[0] = torch.tensor([0, c0, c1])  # a target in every adaptive-softmax band, so every tail gets a gradient
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


# ----------------------------------------------------------------------------- seeded suite
from bench.lm import stats, suite, summary  # noqa: E402
from bench.lm.schedule import cosine_lr  # noqa: E402


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)])
def test_t_quantile_matches_the_table(df, expected):
    assert abs(stats.t_quantile(0.975, df) - expected) < 1e-3
    assert abs(stats.t_quantile(0.025, df) + expected) < 1e-3


def test_mean_ci_on_made_up_numbers():
    interval = stats.mean_ci([1.0, 2.0, 3.0])
    assert interval.n == 3 and interval.mean == 2.0 and interval.sd == 1.0
    assert abs(interval.half_width - 4.3027 / math.sqrt(3)) < 1e-3
    one = stats.mean_ci([5.0])
    assert one.mean == 5.0 and math.isnan(one.low) and math.isnan(one.high)
    assert stats.mean_ci([]).n == 0 and stats.mean_ci([2.0, float("nan"), 4.0]).n == 2


def test_compare_held_not_held_and_not_resolved():
    held = stats.compare([100, 101, 102], [110, 111, 112])
    assert held.verdict == stats.HELD and held.seeds_needed is None
    assert stats.compare([110, 111, 112], [100, 101, 102]).verdict == stats.NOT_HELD
    close = stats.compare([100, 104, 108], [103, 107, 111])  # gap 3, sd 4 each
    assert close.verdict == stats.NOT_RESOLVED
    # smallest n with t_{n-1} * 8 / sqrt(n) < 3: n = 30 (t_29 = 2.045 -> 2.99), n = 29 gives 3.04
    assert close.seeds_needed == 30 and "(as held," in close.reason
    assert "(as not held," in stats.compare([103, 107, 111], [100, 104, 108]).reason
    assert stats.compare([100, 104, 108], [103, 107, 111], max_seeds=20).seeds_needed is None
    assert stats.compare([1.0], [2.0, 3.0]).verdict == stats.NOT_RESOLVED
    assert stats.compare([5, 6, 7], [5, 6, 7]).seeds_needed is None  # equal means never resolve
    assert stats.below([100, 101, 102], 150).verdict == stats.HELD
    assert stats.below([160, 161, 162], 150).verdict == stats.NOT_HELD
    assert stats.below([140, 150, 160], 150).verdict == stats.NOT_RESOLVED


def _row(variant, seed, test, params, dataset="wt2", spe=100.0):
    return dict(dataset=dataset, model="transformer", variant=variant, seed=str(seed), test_ppl=str(test),
                val_ppl=str(test + 5), params_total=str(params), params_embedding="0", params_transform="0",
                params_context="0", params_output="0", seconds_per_epoch=str(spe), tokens_per_s="1000",
                peak_rss_mb="100", train_seconds="60", seconds_to_target="", target_ppl="200")


def test_judge_computes_the_orderings_from_rows():
    rows = []
    for seed, jitter in ((1, -1.0), (2, 0.0), (3, 1.0)):
        rows += [_row("untied", seed, 160 + jitter, 20e6), _row("tied", seed, 140 + jitter, 12e6, spe=200),
                 _row("tied_unfused", seed, 140 + jitter, 12e6, spe=400 + jitter),
                 _row("tied_al", seed, 139 + 3 * jitter, 12e6),
                 _row("define", seed, 145 + jitter, 6e6, spe=150 + jitter), _row("linear", seed, 150 + jitter, 7e6)]
    rows.append(_row("tied", 3, 999, 12e6))  # an older row of the same (variant, seed): replaced below
    rows.append(_row("tied", 3, 141, 12e6))
    verdicts = {v["claim"]: v for v in summary.judge(rows)}
    assert verdicts["tied < untied (RE)"]["verdict"] == stats.HELD
    assert verdicts["REAL < RE (tied + augmented loss < tied)"]["verdict"] == stats.NOT_RESOLVED
    assert verdicts["DeFINE < linear transform"]["verdict"] == stats.HELD
    assert verdicts["DeFINE (fewer parameters) <= untied"]["verdict"] == stats.HELD
    assert verdicts["tied test perplexity < 150"]["verdict"] == stats.HELD
    speed = next(v for k, v in verdicts.items() if k.startswith("define s/epoch"))
    assert speed["verdict"] == stats.HELD  # 150 s vs 0.5 x 400 s at 0.5x the parameters
    assert "DeFINE < GLT" not in verdicts  # glt was not run
    # DeFINE with more parameters than untied cannot hold the "fewer parameters" claim
    bigger = [dict(r, params_total="30000000") if r["variant"] == "define" else r for r in rows]
    assert {v["claim"]: v for v in summary.judge(bigger)}["DeFINE (fewer parameters) <= untied"]["verdict"] \
        == stats.NOT_HELD
    wanted = summary.extra_seeds(summary.judge(rows), {("wt2", "tied_al"): 3, ("wt2", "tied"): 3}, max_seeds=5)
    real = verdicts["REAL < RE (tied + augmented loss < tied)"]
    if real["seeds_needed"] not in ("", None) and real["seeds_needed"] <= 5:
        assert wanted == {("wt2", "tied_al"): real["seeds_needed"], ("wt2", "tied"): real["seeds_needed"]}
    else:
        assert wanted == {}
    table = summary.summarise(rows)
    tied = next(s for s in table if s["variant"] == "tied")
    assert tied["n"] == 3 and abs(tied["test_ppl_mean"] - (139 + 140 + 141) / 3) < 1e-9


def test_cosine_schedule_warms_up_and_decays():
    assert cosine_lr(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert cosine_lr(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 1.0, warmup=10, min_ratio=0.1) == pytest.approx(0.1)
    assert cosine_lr(55, 100, 1.0, warmup=10, min_ratio=0.0) == pytest.approx(0.5)


def test_suite_plan_is_seed_major():
    runs = suite.plan({"wt2": dict(variants=("tied", "define")), "ptb": dict(variants=("define",))}, [1, 2])
    assert runs == [("wt2", "tied", 1), ("wt2", "define", 1), ("ptb", "define", 1),
                    ("wt2", "tied", 2), ("wt2", "define", 2), ("ptb", "define", 2)]


def test_transformer_fused_head_end_to_end(tmp_path, one_thread):
    """The suite's Transformer path at toy size: bf16 autocast, cosine schedule, token budget,
    the fused head for tied variants (no logits: TiedOutput.forward is never called) and the
    unfused baseline; curve CSV, memory and timing columns; summary files from the rows."""
    calls = []
    original = __import__("define_kernels").relatives.TiedOutput.forward

    def spy(self, h):
        calls.append(type(self._owner[0]).__name__)
        return original(self, h)

    args = tiny_args(tmp_path, "--preset", "transformer", "--model", "transformer", "--variants",
                     "define,tied_unfused", "--heads", "2", "--train-budget", "960", "--evals", "3",
                     "--warmup", "2", "--val-tokens", "500", "--curve-out", str(tmp_path / "curve.csv"),
                     "--target-ppl", "100000")
    at = args.index("--steps")
    del args[at:at + 2]  # the token budget sets the steps
    monkey = pytest.MonkeyPatch()
    monkey.setattr(__import__("define_kernels").relatives.TiedOutput, "forward", spy)
    try:
        rows = train.main(args)
    finally:
        monkey.undo()
    define, unfused = rows
    assert define["head"] == "fused" and unfused["head"] == "logits" and define["amp"] == "bf16"
    assert define["steps"] == 12 and define["train_tokens"] == 960  # 960 tokens / (8 x 10) per step
    assert all(math.isfinite(r["test_ppl"]) and 1 < r["test_ppl"] < 9_500 for r in rows)
    assert define["params_total"] < unfused["params_total"]
    assert define["tokens_per_s"] > 0 and define["peak_rss_mb"] >= 0 and define["seconds_to_target"] != ""
    assert len(calls) >= 12 and set(calls) == {"Embedding"}  # only tied_unfused made logits, not DeFINE's
    curve = report.read_rows(tmp_path / "curve.csv")
    assert [int(p["step"]) for p in curve if p["variant"] == "tied_unfused"] == [4, 8, 12]
    assert [int(p["step"]) for p in curve if p["variant"] == "define"] == [4, 8, 12]
    runs = tmp_path / "suite" / "runs"
    runs.mkdir(parents=True)
    (tmp_path / "lm.csv").rename(runs / "ptb_all_s1234.csv")
    result = summary.write(tmp_path / "suite")
    assert (tmp_path / "suite" / "summary.md").exists() and result["png"].stat().st_size > 1000
    assert {s["variant"] for s in result["summary"]} == {"define", "tied_unfused"}


def test_seconds_to_target_interpolates_in_log_perplexity():
    curve = [dict(val_ppl=800.0, train_seconds=10.0, tokens=1000), dict(val_ppl=200.0, train_seconds=20.0, tokens=2000)]
    assert train.seconds_to_target(curve, 1000.0) == (10.0, 1000)  # the first evaluation already there
    assert train.seconds_to_target(curve, 400.0) == (15.0, 1500.0)  # halfway in log(800) .. log(200)
    assert train.seconds_to_target(curve, 100.0) == ("", "")
    assert train.seconds_to_target(curve, None) == ("", "")


def test_suite_counts_a_run_finished_only_with_a_complete_row(tmp_path):
    path = tmp_path / "run.csv"
    assert not suite.finished(path)
    report.write_rows(path, [dict(variant="tied", test_ppl="", config="")])
    assert not suite.finished(path)  # killed while writing
    report.write_rows(path, [dict(variant="tied", test_ppl="123.4", config="layers=4")])
    assert suite.finished(path)


@pytest.mark.parametrize("variant", ["adaptive_softmax", "tied", "tied_unfused", "define_al", "untied"])
def test_transformer_heads_under_bf16_autocast(variant):
    """Every head of the suite's Transformer path trains a step under bf16 autocast; the fused
    head (tied, define_al) and the unfused one give the same cross-entropy sum in eval."""
    torch.manual_seed(0)
    layers = build_layers(variant, SIZES)
    model = LanguageModel(layers.encoder, TransformerContext(16, 1, 2, 0.0), layers.decoder, 0.0, layers.loss,
                          layers.head, torch.bfloat16)
    inputs, targets = torch.randint(0, 60, (6, 2)), torch.randint(0, 60, (6, 2))
    targets[0] = torch.tensor([0, SIZES.adaptive_cutoffs[1]])
    objective, cross_entropy, _ = model(inputs, targets)
    objective.backward()
    assert objective.dtype == torch.float32 and math.isfinite(float(objective.detach()))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    if layers.head == "fused":
        model.eval()
        fused = model(inputs, targets)[1]
        model.head = "logits"
        assert abs(float(model(inputs, targets)[1]) - float(fused)) < 0.05 * float(fused)


def test_throughput_pairs_variants_round_by_round(tmp_path, one_thread):
    """bench.lm.throughput at toy size: every variant timed in every round, the rotation of the
    order, ratios against the first variant from the same rounds, and the CSV it writes."""
    from bench import report as bench_report
    from bench.lm import throughput
    order = []
    real_trainer = throughput.trainer

    def spying_trainer(dataset, variant, train_args, seed=0):
        run = real_trainer(dataset, variant, train_args, seed)
        step = run.step

        def counted():
            order.append(variant)
            return step()

        run.step = counted
        return run

    extra = ["--", "--data-dir", str(ptb_dir()), "--preset", "transformer", "--model", "transformer", "--layers",
             "1", "--emb-dim", "16", "--hidden", "16", "--heads", "2", "--map-dim", "8", "--expand-dim", "24",
             "--depth", "2", "--max-groups", "2", "--batch-size", "4", "--bptt", "8"]
    monkey = pytest.MonkeyPatch()
    monkey.setattr(throughput, "trainer", spying_trainer)
    try:
        path = throughput.main(["--dataset", "ptb", "--variants", "tied_unfused,define", "--rounds", "3",
                                "--steps", "2", "--csv", str(tmp_path / "t.csv"), *extra])
    finally:
        monkey.undo()
    warm = 2 * throughput.WARMUP_STEPS
    timed = order[warm:]
    # round 1: tied_unfused first; round 2: define first; round 3: tied_unfused first again
    assert timed == ["tied_unfused"] * 2 + ["define"] * 4 + ["tied_unfused"] * 4 + ["define"] * 2
    rows = {(r["provider"], r["metric"]): r for r in bench_report.read_csv([path])}
    step = {v: float(rows[(v, "seconds_per_step")]["value"]) for v in ("tied_unfused", "define")}
    assert float(rows[("define", "time_ratio")]["value"]) == pytest.approx(step["define"] / step["tied_unfused"], rel=1e-3)
    paired = rows[("define", "time_ratio_same_round")]
    assert float(paired["p20"]) <= float(paired["value"]) <= float(paired["p80"])
    assert 0 < float(rows[("define", "params_ratio")]["value"]) < 1
    epoch = float(rows[("define", "seconds_per_epoch")]["value"])
    assert epoch == pytest.approx(len(data.load_corpus("ptb", str(ptb_dir())).train) / 32 * step["define"], rel=1e-3)
    assert ("tied_unfused", "time_ratio") not in rows
    with pytest.raises(SystemExit):
        throughput.parse_args(["--variants", "define"])


def test_summary_labels_of_close_points_stand_apart():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from bench.lm.summary import label_offsets
    figure, axis = plt.subplots()
    axis.set_yscale("log")
    points = [("a", 5.7, 597.0), ("b", 5.7, 599.0), ("c", 5.7, 616.0), ("far", 20.0, 598.0), ("top", 11.7, 865.0)]
    axis.plot([p[1] for p in points], [p[2] for p in points], "o")
    result = label_offsets(axis, points)
    placed = {name: axis.transData.transform((x, y))[1] / figure.dpi * 72 + lift for name, x, y, lift in result}
    lifts = {name: lift for name, _, _, lift in result}
    plt.close(figure)
    assert placed["b"] - placed["a"] >= 10 - 1e-6 and placed["c"] - placed["b"] >= 10 - 1e-6
    assert lifts["a"] == pytest.approx(3) and lifts["far"] == pytest.approx(3) and lifts["top"] == pytest.approx(3)
    assert lifts["b"] > 3
