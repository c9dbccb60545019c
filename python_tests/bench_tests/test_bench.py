"""The benchmark harness (bench/): end to end at tiny sizes on CPU, CSV format, plots, and the
FLOP / byte counts against values computed by hand. No timing is asserted."""
import csv

import pytest
import torch

from bench import metrics, plot, providers, report, run, workloads
from define_kernels.workloads import WORKLOADS

TINY = "custom:V=97,n=16,k=64,m=24,N=2,g=4"


def tiny_config():
    return workloads.parse_workload(TINY).config()


# ------------------------------------------------------------------------------ counts
def test_tiny_config_is_the_hand_computed_one():
    # expand groups (4, 2); widths: 16 + 48/2 = 40 (multiple of 8), 64; reduce 16 + 64 -> 24
    assert [tuple(layer[:3]) for layer in tiny_config().layers] == [(16, 40, 4), (56, 64, 2), (80, 24, 1)]
    # MACs 16*40/4 + 56*64/2 + 80*24; params (160+40+20) + (1792+64+64) + (1920+24+48)
    assert tiny_config().macs_per_token == 160 + 1792 + 1920 == 3872
    assert tiny_config().num_parameters == 220 + 1920 + 1992 == 4132


def define_cost(**changes):
    cost = metrics.StepCost(tokens=50, unique=24, stack_rows=24, vocab_size=97, table_dim=16,
                            out_dim=24, elem_bytes=4, config=tiny_config())
    return cost._replace(**changes)


def test_flop_count_matches_hand_computed_values():
    assert metrics.flop_count(define_cost(), "forward") == 2 * 3872 * 24 == 185_856
    assert metrics.flop_count(define_cost(), "inference") == 185_856
    assert metrics.flop_count(define_cost(), "forward_backward") == 3 * 185_856
    assert metrics.flop_count(define_cost(), "train") == 557_568
    assert metrics.flop_count(define_cost(stack_rows=50), "forward") == 2 * 3872 * 50  # no dedup
    assert metrics.flop_count(define_cost(cached=True), "inference") == 0
    embedding = define_cost(config=None, table_dim=24, stack_rows=0)
    assert metrics.flop_count(embedding, "train") == 0


def test_byte_count_matches_hand_computed_values():
    # forward: ids 8*50 + map rows 24*16*4 + params 4132*4 + output 50*24*4
    assert metrics.byte_count(define_cost(), "forward") == 400 + 1536 + 16_528 + 4800 == 23_264
    # backward adds grad_y 4800, params + their grads 2*16528, map rows again 1536,
    # dense table grad 97*16*4 = 6208
    assert metrics.byte_count(define_cost(), "forward_backward") == 23_264 + 4800 + 33_056 + 1536 + 6208
    # AdamW: 7 touches x 4 bytes over the transform params and the whole map table
    assert metrics.byte_count(define_cost(), "train") == 68_864 + 28 * (4132 + 97 * 16) == 228_016
    # sparse: the table gradient and SparseAdam touch the 24 distinct rows only
    assert metrics.byte_count(define_cost(sparse=True), "train") == \
        23_264 + 4800 + 33_056 + 1536 + 1536 + 28 * (4132 + 24 * 16) == 190_640
    # cached inference: ids, 24 distinct rows of the [V, m] table, output
    assert metrics.byte_count(define_cost(cached=True), "inference") == 400 + 24 * 24 * 4 + 4800
    embedding = define_cost(config=None, table_dim=24, stack_rows=0)
    assert metrics.byte_count(embedding, "forward") == 400 + 2304 + 4800
    assert metrics.byte_count(embedding, "train") == 7504 + 4800 + 97 * 24 * 4 + 28 * 97 * 24 == 86_800


def test_counts_reject_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        metrics.flop_count(define_cost(), "backward")


# ------------------------------------------------------------------------------ workloads
def test_parse_workload_names_and_custom():
    assert workloads.parse_workload("wt103-base") is WORKLOADS["wt103-base"]
    custom = workloads.parse_workload(TINY + ",T=33")
    assert (custom.vocab_size, custom.map_dim, custom.tokens_per_batch) == (97, 16, 33)
    for bad in ("nope", "custom:V=97", "custom:V=97,x=1"):
        with pytest.raises(ValueError, match="workload"):
            workloads.parse_workload(bad)
    assert run.workload_list(f"ptb-lstm,{TINY},wt2-small") == ["ptb-lstm", TINY, "wt2-small"]


def test_zipf_ids_are_seeded_skewed_and_in_range():
    ids = workloads.zipf_ids(1000, 20_000, seed=3)
    assert torch.equal(ids, workloads.zipf_ids(1000, 20_000, seed=3))
    assert 0 <= int(ids.min()) and int(ids.max()) < 1000
    counts = torch.bincount(ids, minlength=1000).double()
    # Zipf(1.1) over 1000 ids gives id 0 about 15% of the mass; uniform would give 0.1%
    assert 0.10 < counts[0] / ids.numel() < 0.20
    assert counts[0] > 50 * counts[500:].mean()


def test_corpus_ids_map_words_by_frequency_rank(tmp_path):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "train.txt").write_text("b a a\nc a b\n" * 40)
    workloads.corpus_stream.cache_clear()
    stream = workloads.corpus_stream("ptb", str(tmp_path))
    # counts: a 3, b 2, <eos> 2 (b first seen earlier), c 1 per pair of lines
    assert stream[:8].tolist() == [1, 0, 0, 2, 3, 0, 1, 2]
    ids = workloads.batch_ids(WORKLOADS["ptb-lstm"]._replace(vocab_size=3), 70, "ptb", str(tmp_path))
    assert ids.numel() == 70 and int(ids.max()) == 2  # rank 3 ('c') folds into the last id
    workloads.corpus_stream.cache_clear()


def test_real_corpus_batches():
    try:
        workloads.find_data_dir()
    except FileNotFoundError as error:
        pytest.skip(f"shared corpora not present: {error}")
    ids = workloads.batch_ids(WORKLOADS["wt2-small"], 4096, "wikitext-2")
    assert ids.shape == (4096,) and int(ids.max()) < 33_278
    assert 500 < torch.unique(ids).numel() < 4096  # real text repeats words


def test_missing_corpus_dir_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv(workloads.ENV_DATA_DIR, str(tmp_path / "absent"))
    monkeypatch.setattr(workloads, "REPO_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        workloads.find_data_dir()


# ------------------------------------------------------------------------------ end to end
# Smaller than TINY: the Triton providers run in the interpreter, whose time grows with the tiles.
END_TO_END = "custom:V=97,n=16,k=32,m=24,N=2,g=4"


# The Triton interpreter is slow; its variants' setup code is the one the other backends run.
INTERPRETER_VARIANTS = ["define-triton-nodedup", "define-triton-sparse", "define-triton-recompute"]


def test_benchmark_runs_every_provider_end_to_end(tmp_path, capsys):
    csv_path = tmp_path / "run.csv"
    run.main(["--device", "cpu", "--providers", "all", "--workload", END_TO_END, "--tokens", "16", "--reps", "1", "--warmup", "1",
              "--compile-backend", "aot_eager", "--csv", str(csv_path), "--plots-dir", str(tmp_path),
              "--no-progress", "--exclude", ",".join(INTERPRETER_VARIANTS),
              "--model-workload", END_TO_END, "--model-tokens", "16", "--model-rounds", "1",
              "--model-dtypes", "float32"])
    printed = capsys.readouterr().out
    # the whole model first: its table, then the input layer's
    assert printed.index("## Whole model") < printed.index("| step-embedding | float32 |") \
        < printed.index("## Input layer") < printed.index("| forward | embedding |")
    with open(tmp_path / "run_whole-model.csv", newline="") as handle:
        model_rows = list(csv.DictReader(handle))
    for dtype in ("float32",):
        base = [r for r in model_rows if r["provider"] == "step-embedding" and r["dtype"] == dtype]
        assert {"time", "peak_memory", "params_embedding", "params_body", "params_head"} <= {r["metric"] for r in base}
        define = {r["metric"] for r in model_rows if r["provider"] == "step-define-fused" and r["dtype"] == dtype}
        assert "time" in define or "unavailable" in define  # until the fused CPU kernel is built
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == report.COLUMNS
        rows = list(reader)
    for column in ("date", "device", "commit", "torch", "triton", "cuda", "workload", "provider",
                   "mode", "dtype", "tokens", "metric", "unit", "value", "p20", "p80"):
        assert column in report.COLUMNS
    assert not [r for r in rows if r["metric"] == "error"], \
        [(r["provider"], r["mode"], r["note"]) for r in rows if r["metric"] == "error"]
    unavailable = {r["provider"]: r["note"] for r in rows if r["metric"] == "unavailable"}
    assert all(unavailable.values()), unavailable  # every provider not run says why
    listed = providers.all_providers()
    assert {"embedding", "embedding-sparse", "define-torch", "define-torch-nodedup",
            "define-torch-sparse", "define-torch-recompute", "define-torch-autocast", "define-cache",
            "define-compile", "plain-eager"} <= {p.name for p in listed}
    spec = providers.Spec(workloads.parse_workload(END_TO_END), torch.device("cpu"), torch.float32)
    for provider in listed:
        if provider.name in INTERPRETER_VARIANTS:
            continue
        if provider.unavailable(spec) is not None:
            assert provider.name in unavailable  # a backend that cannot run here: reported with why
            continue
        modes = {r["mode"] for r in rows if r["provider"] == provider.name and r["metric"] == "time"}
        expected = {"define-cache": {"inference"}, "plain-eager": {"forward", "forward_backward"}}.get(
            provider.name, set(metrics.MODES))
        assert modes == expected, provider.name
        assert f"| {provider.name} |" in printed
    times = [r for r in rows if r["metric"] == "time"]
    assert all(float(r["value"]) > 0 and float(r["p20"]) <= float(r["value"]) <= float(r["p80"])
               for r in times)
    assert all(r["tokens"] == "16" and r["workload"].startswith("custom-V97") for r in times)
    ratios = {(r["provider"], r["mode"]): float(r["value"]) for r in rows if r["metric"] == "time_vs_embedding"}
    assert all(ratios[("embedding", mode)] == 1.0 for mode in metrics.MODES)
    assert any(r["provider"] == report.MATMUL_PROVIDER and float(r["value"]) > 0 for r in rows)
    tflops = [r for r in rows if r["metric"] == "tflops" and r["provider"] == "define-torch"]
    assert tflops and all(float(r["value"]) > 0 for r in tflops)
    pngs = sorted(tmp_path.glob("run_*.png"))
    assert [p.name for p in pngs] == ["run_speedup_vs_eager.png", "run_throughput_vs_tokens.png",
                                      "run_train_time_vs_vocab.png", "run_whole-model.png"]
    assert all(p.stat().st_size > 5000 for p in pngs)


def test_plot_cli_redraws_from_csv(tmp_path):
    meta = dict(date="2026-01-01T00:00:00", device="cpu test", commit="abc", torch="2", triton="", cuda="")
    rows = []
    for vocab in (100, 1000):
        for tokens in (64, 256):
            for provider, ms in (("embedding", 1.0), ("define-torch", 4.0)):
                base = dict(meta, workload=f"w-V{vocab}", provider=provider, mode="train",
                            dtype="float32", tokens=tokens, vocab_size=vocab)
                rows += [dict(base, metric="time", unit="ms", value=ms),
                         dict(base, metric="tokens_per_s", unit="tokens/s", value=tokens / ms * 1e3),
                         dict(base, metric="time_vs_eager", unit="x", value=ms / 4.0)]
    path = report.write_csv(rows, tmp_path / "a.csv")
    plot.main([str(path), "--out", str(tmp_path / "plots")])
    assert len(list((tmp_path / "plots").glob("a_*.png"))) == 3
    assert "| train | define-torch | 4 (—–—)" in report.markdown(report.read_csv([path]))


def sweep_rows(providers_and_ms, vocabs=(100, 1000), tokens_list=(64, 256), modes=("train", "forward")):
    """Rows of a synthetic sweep: every provider at every vocabulary, batch size and mode."""
    meta = dict(date="2026-01-01T00:00:00", device="cpu test", commit="abc", torch="2", triton="", cuda="")
    rows = []
    for vocab in vocabs:
        for tokens in tokens_list:
            for mode in modes:
                for provider, ms in providers_and_ms:
                    base = dict(meta, workload=f"w-V{vocab}", provider=provider, mode=mode, dtype="float32",
                                tokens=str(tokens), vocab_size=str(vocab), corpus="zipf", unique_ids="9", note="")
                    rows += [dict(base, metric="time", unit="ms", value=str(ms)),
                             dict(base, metric="tokens_per_s", unit="tokens/s", value=str(tokens / ms * 1e3)),
                             dict(base, metric="time_vs_eager", unit="x", value=str(ms / 4.0)),
                             dict(base, metric="tflops", unit="TFLOP/s",
                                  value="0" if provider == "embedding" else "0.5")]
    return rows


def legend_colors(fig):
    return {handle.get_label(): handle.get_color() for legend in fig.legends for handle in legend.legend_handles}


def test_plot_palette_is_one_color_per_provider_in_every_figure():
    small = sweep_rows([("embedding", 1.0), ("define-torch", 4.0)])
    large = sweep_rows([("define-cpu_cpp", 5.0), ("define-torch", 4.0), ("define-torch-nodedup", 8.0),
                        ("embedding-sparse", 0.5), ("relative-slimembedding", 2.0), ("embedding", 1.0)])
    seen = {}
    for rows in (small, large):
        for figure in (plot.figure_throughput, plot.figure_train_vs_vocab, plot.figure_speedup):
            fig = figure(rows)
            for label, color in legend_colors(fig).items():
                assert seen.setdefault(label, color) == color, label  # same provider, same colour
            plot.plt.close(fig)
    assert {"nn.Embedding", "DeFINE torch", "DeFINE cpu_cpp", "SlimEmbedding"} <= set(seen)
    known = list(plot.PROVIDER_COLORS.values())
    assert len(set(known)) == len(known)  # no two known providers share a colour
    assert plot.provider_color("define-new_backend") == plot.provider_color("define-new_backend")


def test_plots_draw_every_measured_series():
    rows = sweep_rows([("embedding", 1.0), ("define-torch", 4.0), ("define-cpu_cpp", 5.0)], vocabs=(100, 1000, 5000))
    keys = lambda metric, keep=lambda r: True: {plot.series_key(r) for r in rows  # noqa: E731
                                                if r["metric"] == metric and keep(r)}
    drawn = set()
    plot.plt.close(plot.figure_throughput(rows, drawn))
    assert drawn == keys("tokens_per_s") and len(drawn) == 3 * 3 * 2 * 2
    drawn = set()
    plot.plt.close(plot.figure_train_vs_vocab(rows, drawn))
    assert drawn == keys("time", lambda r: r["mode"] == "train")
    drawn = set()
    fig = plot.figure_speedup(rows, drawn)
    assert drawn == keys("time_vs_eager", lambda r: r["provider"] == "define-cpu_cpp")  # eager = 1x, baselines out
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert "w · V=1000 · training step" in titles  # workload without the -V suffix, vocabulary, mode
    assert "cpu test" in fig._suptitle.get_text() and "float32" in fig._suptitle.get_text()
    # Bars start at 1x and end at the speed-up (eager 4 ms / 5 ms = 0.8x), on a linear axis.
    bars = [patch for ax in fig.axes for patch in ax.patches]
    assert bars and all(bar.get_x() == 1.0 and abs(bar.get_x() + bar.get_width() - 0.8) < 1e-9 for bar in bars)
    assert all(ax.get_xscale() == "linear" for ax in fig.axes if ax.patches)
    labels = [t.get_text() for ax in fig.axes for t in ax.get_yticklabels()]
    assert labels and all("-V" not in label for label in labels)
    assert "64 ids: DeFINE cpu_cpp" in labels
    plot.plt.close(fig)


def test_plot_labels_and_workload_names_are_readable():
    assert plot.provider_label("define-cpu_cpp-nodedup") == "DeFINE cpu_cpp, no dedup"
    assert plot.provider_label("define-torch-sparse") == "DeFINE torch, sparse"
    assert plot.provider_label("embedding") == "nn.Embedding"
    assert plot.base_workload({"workload": "wt2-small-V10000", "vocab_size": "10000"}) == "wt2-small"
    assert plot.base_workload({"workload": "custom-V97-n16", "vocab_size": "97"}) == "custom-V97-n16"


def test_report_shows_a_dash_for_undefined_flop_rates():
    table = report.markdown(sweep_rows([("embedding", 1.0), ("define-torch", 4.0)], vocabs=(100,),
                                       tokens_list=(64,), modes=("train",)))
    embedding_row = next(line for line in table.splitlines() if line.startswith("| train | embedding |"))
    define_row = next(line for line in table.splitlines() if line.startswith("| train | define-torch |"))
    assert embedding_row.split(" | ")[6] == "—"  # TFLOP/s column: no matmul, so undefined, not 0
    assert define_row.split(" | ")[6] == "0.5"


def test_results_path_names_date_device_commit():
    meta = dict(date="2026-11-21T14:00:05", device="NVIDIA H100 80GB HBM3", commit="0b7af7b")
    path = report.results_path(meta, directory="/x")
    assert str(path) == "/x/2026-11-21-140005_NVIDIA-H100-80GB-HBM3_0b7af7b.csv"


def test_bad_flags_are_reported():
    for argv in (["--modes", "backward"], ["--dtypes", "int8"], ["--providers", "nope"],
                 ["--reps", "0"]):
        with pytest.raises(SystemExit):
            run.parse_args(argv)
