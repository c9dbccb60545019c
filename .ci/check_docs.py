#!/usr/bin/env python3
"""Docs check (stdlib only): python .ci/check_docs.py [--repo DIR] [--python PY]

Over README.md and docs/*.md:
  - README.md is under MAX_README_LINES lines;
  - every relative link (and image) points at a file or folder that exists, and an anchor into a
    markdown file names one of its headings;
  - no text names a development session, an issue number ("#NN", "issue NN") or a lettered run
    ("run A".."run N");
  - every bench/results file named anywhere in them exists;
and the package's long description (`setup.py --long-description`, run with --python) is README.md.
Exit status 1 with one line per problem.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterable, List, Optional

MAX_README_LINES = 250

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")
SESSION = re.compile(r"\bsessions?\b", re.IGNORECASE)
ISSUE = re.compile(r"(?<![\w#&/])#\d+(?![\w-])|\bissues? #?\d+\b", re.IGNORECASE)
LETTERED_RUN = re.compile(r"\b[Rr]uns? [A-N](?:\s*(?:-|–|,|and)\s*[A-N])*\b(?![\w-])")
RESULTS_FILE = re.compile(r"bench/results/[\w.+-]+\.\w+")


def doc_files(repo: Path) -> List[Path]:
    return [repo / "README.md"] + sorted((repo / "docs").glob("*.md"))


def without_code_blocks(text: str) -> str:
    """Fenced code blocks blanked out (line count kept), so that code is not read as links."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set:
    found = set()
    for line in without_code_blocks(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            found.add(slug(match.group(1)))
    return found


def check_links(path: Path, text: str, repo: Path) -> List[str]:
    problems = []
    for number, line in enumerate(without_code_blocks(text).splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(repo)}:{number}"
            if not dest.exists():
                problems.append(f"{where}: broken link {target}")
            elif anchor and dest.suffix == ".md" and dest.is_file() and anchor not in anchors(dest):
                problems.append(f"{where}: no heading for anchor {target}")
    return problems


def check_history(path: Path, text: str, repo: Path) -> List[str]:
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        for rule, name in ((SESSION, "names a session"), (ISSUE, "names an issue number"),
                           (LETTERED_RUN, "names a lettered run")):
            match = rule.search(line)
            if match:
                problems.append(f"{path.relative_to(repo)}:{number}: {name}: {match.group(0)!r}")
    return problems


def check_results_files(path: Path, text: str, repo: Path) -> List[str]:
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        for name in RESULTS_FILE.findall(line):
            if not (repo / name).is_file():
                problems.append(f"{path.relative_to(repo)}:{number}: missing result file {name}")
    return problems


def check_readme_length(repo: Path) -> List[str]:
    lines = len((repo / "README.md").read_text(encoding="utf-8").splitlines())
    if lines >= MAX_README_LINES:
        return [f"README.md: {lines} lines, the limit is under {MAX_README_LINES}"]
    return []


def check_long_description(repo: Path, python: str) -> List[str]:
    result = subprocess.run([python, "setup.py", "--long-description"], cwd=repo, capture_output=True,
                            text=True)
    if result.returncode:
        return [f"setup.py --long-description failed: {result.stderr.strip()[-500:]}"]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    if result.stdout.strip() != readme.strip():
        return ["setup.py: the long description is not README.md"]
    return []


def check(repo: Path, python: Optional[str] = None) -> List[str]:
    """Every problem found; the long description is checked only when python is given."""
    problems = check_readme_length(repo)
    for path in doc_files(repo):
        text = path.read_text(encoding="utf-8")
        problems += check_links(path, text, repo)
        problems += check_history(path, text, repo)
        problems += check_results_files(path, text, repo)
    if python:
        problems += check_long_description(repo, python)
    return problems


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--python", default=sys.executable, help="interpreter for setup.py (default: this one)")
    args = parser.parse_args(argv)
    problems = check(args.repo.resolve(), args.python)
    for problem in problems:
        print(problem)
    count = len(doc_files(args.repo))
    print(f"docs check: {count} files, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
