"""Results: one CSV row per (run, variant) in bench/results/lm_<date>_<device>_<commit>.csv and a
plot of test perplexity against parameters beside it (.png). Rows of later runs on the same
day, device and commit are appended; the plot shows every (dataset, model, mode) group."""
from __future__ import annotations

import csv
import datetime
import re
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
COLUMNS = ("date", "device", "commit", "mode", "dataset", "model", "variant", "params_embedding",
           "params_transform", "params_context", "params_output", "params_total", "steps",
           "train_tokens", "train_seconds", "best_step", "val_ppl", "test_ppl", "world_size",
           "seed", "torch", "config",
           # added with the seeded Transformer suite; train_seconds excludes evaluation since then
           "head", "amp", "epochs", "wall_seconds", "tokens_per_s", "seconds_per_epoch", "peak_rss_mb",
           "stop_reason", "target_ppl", "seconds_to_target", "tokens_to_target", "threads", "load_avg")
# one row per evaluation of a run (train.py --curve-out)
CURVE_COLUMNS = ("variant", "seed", "step", "tokens", "train_seconds", "wall_seconds", "lr", "train_ppl",
                 "val_ppl")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return device.type


def commit_id() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS_DIR.parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "nogit"
    except (OSError, subprocess.SubprocessError):
        return "nogit"


def results_path(device: torch.device, directory: Path = RESULTS_DIR) -> Path:
    date = datetime.date.today().strftime("%Y%m%d")
    return Path(directory) / f"lm_{date}_{device_name(device)}_{commit_id()}.csv"


def append_rows(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({column: row.get(column, "") for column in COLUMNS})


def write_rows(path: Path, rows: list, columns=COLUMNS) -> None:
    """Write (replace) a CSV atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: row.get(column, "") for column in columns})
    temporary.replace(path)


def read_rows(path: Path) -> list:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def plot(csv_path: Path) -> Path:
    """Test perplexity (log) against total parameters (M), one panel per run group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    groups = {}
    for row in rows:
        groups.setdefault((row["mode"], row["dataset"], row["model"]), []).append(row)
    figure, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for axis, ((mode, dataset, model), members) in zip(axes[0], groups.items()):
        for row in members:
            x, y = int(row["params_total"]) / 1e6, float(row["test_ppl"])
            axis.scatter(x, y, s=30, color="C3" if row["variant"] in ("define", "define_nomix") else "C0")
            axis.annotate(row["variant"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
        axis.set_xlabel("parameters (M, total)")
        axis.set_ylabel("test perplexity")
        axis.set_title(f"{dataset} {model} ({mode})")
        axis.grid(alpha=0.3)
    figure.suptitle(csv_path.stem)
    figure.tight_layout()
    png = csv_path.with_suffix(".png")
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return png
