"""Long-format CSV (one value per row, Liger-style) and the markdown table printed by run.py.

Metrics: time (ms, median with p20/p80), tokens_per_s, params, peak_memory (MB, method in
timing.py), tflops, gbps (from metrics.py counts), time_vs_embedding and time_vs_eager (x: this
provider's median time over nn.Embedding's / the eager reference's, same run), matmul_share (% of
the dense matmul rate measured in the same run, provider `dense-matmul`), unavailable / error
(value empty, reason in `note`).
"""
from __future__ import annotations

import csv
import datetime
import platform
import re
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

COLUMNS = ["date", "device", "commit", "torch", "triton", "cuda", "workload", "provider", "mode",
           "dtype", "tokens", "metric", "unit", "value", "p20", "p80", "vocab_size", "unique_ids",
           "corpus", "note"]
MATMUL_PROVIDER = "dense-matmul"
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit_id() -> str:
    """Short commit, with '-dirty' when the working tree differs from it."""
    commit = _git("rev-parse", "--short", "HEAD") or "nogit"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit + ("-dirty" if status else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu {model}"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


def metadata(device: torch.device) -> Dict[str, str]:
    return {"date": datetime.datetime.now().strftime("%Y-%m-%dT%H:%M:%S"),
            "device": device_name(device), "commit": commit_id(), "torch": torch.__version__,
            "triton": _triton_version(), "cuda": torch.version.cuda or ""}


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:limit].strip("-")


def results_path(meta: Dict[str, str], directory: Path = RESULTS_DIR, tag: str = "") -> Path:
    """bench/results/<date>_<device>_<commit>[_<tag>].csv"""
    date = meta["date"].replace(":", "").replace("T", "-")
    name = f"{date}_{slug(meta['device'])}_{meta['commit']}" + (f"_{slug(tag)}" if tag else "")
    return Path(directory) / f"{name}.csv"


def write_csv(rows: Iterable[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({column: _cell(row.get(column)) for column in COLUMNS})
    return path


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def read_csv(paths: Iterable[Path]) -> List[dict]:
    rows = []
    for path in paths:
        with open(path, newline="") as handle:
            rows.extend(csv.DictReader(handle))
    return rows


def _number(text) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "—"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-2):
        return f"{value:.2e}"
    return f"{value:.{digits}g}"


# A provider that does no matmul (nn.Embedding, a cached lookup) has no FLOP rate: run.py writes
# 0 there, which the table shows as undefined rather than as a speed of zero.
FLOP_METRICS = ("tflops", "matmul_share")


def _cell_value(metrics: Dict[str, dict], name: str) -> Optional[float]:
    value = _number(metrics.get(name, {}).get("value"))
    return None if name in FLOP_METRICS and value == 0 else value


def markdown(rows: List[dict]) -> str:
    """One table per (workload, dtype, tokens, corpus); providers that did not run listed below."""
    sections: Dict[tuple, Dict[tuple, Dict[str, dict]]] = {}
    skipped, matmul = [], []
    for row in rows:
        if row["provider"] == MATMUL_PROVIDER:
            matmul.append(row)
            continue
        key = (row["workload"], row["dtype"], str(row["tokens"]), row.get("corpus", ""),
               str(row.get("unique_ids", "")))
        if row["metric"] in ("unavailable", "error"):
            skipped.append(f"- {row['workload']} {row['provider']} {row['mode'] or ''}: "
                           f"{row['metric']}: {row['note']}")
            continue
        cell = sections.setdefault(key, {}).setdefault((row["mode"], row["provider"]), {})
        cell[row["metric"]] = row
    lines = []
    for row in matmul:
        lines.append(f"Dense {row['dtype']} matmul ({row['note']}): {_fmt(_number(row['value']))} TFLOP/s "
                     f"on {row['device']}")
    header = ("| mode | provider | ms median (p20–p80) | tokens/s | × nn.Embedding | × eager | "
              "TFLOP/s | % matmul | GB/s | peak MB | params |")
    for (workload, dtype, tokens, corpus, unique), cells in sections.items():
        lines += ["", f"### {workload} · {dtype} · {tokens} ids ({corpus}, {unique} distinct)", "",
                  header, "|" + "---|" * 11]
        for (mode, provider), metrics in cells.items():
            time = metrics.get("time", {})
            value = lambda name: _cell_value(metrics, name)  # noqa: E731
            lines.append(
                f"| {mode} | {provider} | {_fmt(_number(time.get('value')))} "
                f"({_fmt(_number(time.get('p20')))}–{_fmt(_number(time.get('p80')))}) | "
                f"{_fmt(value('tokens_per_s'))} | {_fmt(value('time_vs_embedding'))} | "
                f"{_fmt(value('time_vs_eager'))} | {_fmt(value('tflops'))} | {_fmt(value('matmul_share'))} | "
                f"{_fmt(value('gbps'))} | "
                f"{_fmt(value('peak_memory'), 4)} | {_fmt(value('params'), 4)} |")
    lines += goal_lines(rows)
    if skipped:
        lines += ["", "Not measured:"] + sorted(set(skipped))
    return "\n".join(lines)


def goal_lines(rows: List[dict]) -> List[str]:
    """The ratios the project's goals are stated in, per workload / dtype / batch:
    best DeFINE training step vs nn.Embedding (dense and sparse), dedup vs no dedup in
    forward+backward, and the cached eval lookup vs nn.Embedding's."""
    times: Dict[tuple, Dict[tuple, float]] = {}
    for row in rows:
        if row["metric"] == "time" and _number(row["value"]):
            key = (row["workload"], row["dtype"], str(row["tokens"]))
            times.setdefault(key, {})[(row["mode"], row["provider"])] = _number(row["value"])
    lines = []
    for (workload, dtype, tokens), t in times.items():
        found = []
        defines = {p: v for (m, p), v in t.items() if m == "train" and p.startswith("define")}
        for baseline in ("embedding", "embedding-sparse"):
            if defines and ("train", baseline) in t:
                best = min(defines, key=defines.get)
                found.append(f"train step: fastest DeFINE ({best}) = {defines[best] / t[('train', baseline)]:.2f}x "
                             f"{baseline}")
        for (mode, provider), value in sorted(t.items()):
            if mode == "forward_backward" and ("forward_backward", provider + "-nodedup") in t:
                found.append(f"forward+backward: {provider} (dedup) = "
                             f"{value / t[('forward_backward', provider + '-nodedup')]:.2f}x {provider}-nodedup")
        if ("inference", "define-cache") in t and ("inference", "embedding") in t:
            found.append(f"inference: define-cache = {t[('inference', 'define-cache')] / t[('inference', 'embedding')]:.2f}x "
                         f"embedding lookup")
        if found:
            lines += ["", f"Ratios ({workload} · {dtype} · {tokens} ids; time / time, lower is faster):"]
            lines += [f"- {line}" for line in found]
    return lines


def main(argv=None) -> None:
    """`python -m bench.report A.csv [B.csv ...]`: the markdown table and ratios of saved runs."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("csv", nargs="+", type=Path)
    print(markdown(read_csv(parser.parse_args(argv).csv)))


if __name__ == "__main__":
    main()
