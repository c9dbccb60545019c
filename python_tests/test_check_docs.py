"""The rules of .ci/check_docs.py on made-up repositories (no network, no package build)."""
import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / ".ci" / "check_docs.py"
_SPEC = importlib.util.spec_from_file_location("check_docs", _PATH)
check_docs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(check_docs)

GOOD_README = textwrap.dedent("""\
    # pkg

    See [the API](docs/api.md#the-api-v2), [results](bench/results/run.csv) and
    [the paper](https://arxiv.org/abs/1911.12385).

    ![plot](bench/results/plot.png)

    ```python
    x = [a](not/a/link.md)  # code is not read for links
    ```
    """)
GOOD_API = textwrap.dedent("""\
    # The API (v2)

    ## `lm_head_loss`: the LM head

    Back to the [README](../README.md), the [head](#lm_head_loss-the-lm-head), the
    [math](math.md#5-standard-workloads).
    """)
MATH = "# Math\n\n## §5 Standard workloads\n"
SETUP = textwrap.dedent("""\
    import os
    from setuptools import setup
    here = os.path.dirname(os.path.abspath(__file__))
    setup(name="pkg", version="0.1.0",
          long_description=open(os.path.join(here, "README.md"), encoding="utf-8").read())
    """)


def make_repo(tmp_path: Path, readme: str = GOOD_README, api: str = GOOD_API) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "run.csv").write_text("a,b\n")
    (tmp_path / "bench" / "results" / "plot.png").write_bytes(b"png")
    (tmp_path / "README.md").write_text(readme)
    (tmp_path / "docs" / "api.md").write_text(api)
    (tmp_path / "docs" / "math.md").write_text(MATH)
    (tmp_path / "setup.py").write_text(SETUP)
    return tmp_path


def test_clean_repo_passes(tmp_path):
    assert check_docs.check(make_repo(tmp_path)) == []


def test_long_readme_fails(tmp_path):
    repo = make_repo(tmp_path, readme=GOOD_README + "line\n" * check_docs.MAX_README_LINES)
    assert any("lines" in p for p in check_docs.check(repo))


@pytest.mark.parametrize("link", ["docs/missing.md", "docs/api.md#no-such-heading", "bench/plot.png"])
def test_broken_relative_link_fails(tmp_path, link):
    repo = make_repo(tmp_path, readme=GOOD_README + f"\n[x]({link})\n")
    problems = check_docs.check(repo)
    assert len(problems) == 1 and link in problems[0]


def test_broken_link_in_docs_page_fails(tmp_path):
    repo = make_repo(tmp_path, api=GOOD_API + "\nSee [gone](../CHANGES.md).\n")
    problems = check_docs.check(repo)
    assert len(problems) == 1 and problems[0].startswith("docs/api.md:")


@pytest.mark.parametrize("line, rule", [
    ("This session's changes.", "session"),
    ("As earlier sessions found.", "session"),
    ("Fixed in #12.", "issue"),
    ("The CPU goals of issue 9.", "issue"),
    ("Measured in run A.", "lettered run"),
    ("Runs I-J are older.", "lettered run"),
    ("see runs L, M and N", "lettered run"),
])
def test_development_history_fails(tmp_path, line, rule):
    repo = make_repo(tmp_path, api=GOOD_API + "\n" + line + "\n")
    problems = check_docs.check(repo)
    assert len(problems) == 1 and rule in problems[0], problems


@pytest.mark.parametrize("line", [
    "A training run takes minutes.",
    "Run `make test`.",
    "Under bf16 autocast; a run of 25 rounds.",
    "Anchors such as [math](math.md#5-standard-workloads) are not issue numbers.",
    "In C#, nothing; colour #fff; item &#12;",
])
def test_ordinary_prose_passes(tmp_path, line):
    repo = make_repo(tmp_path, api=GOOD_API + "\n" + line + "\n")
    assert check_docs.check(repo) == []


def test_missing_results_file_fails_even_without_a_link(tmp_path):
    repo = make_repo(tmp_path, api=GOOD_API + "\nFrom `bench/results/gone_9c3fe86.csv`.\n")
    problems = check_docs.check(repo)
    assert len(problems) == 1 and "bench/results/gone_9c3fe86.csv" in problems[0]


def test_long_description_must_be_the_readme(tmp_path):
    repo = make_repo(tmp_path)
    assert check_docs.check(repo, sys.executable) == []
    (repo / "setup.py").write_text(SETUP.replace('open(os.path.join(here, "README.md"), encoding="utf-8").read()',
                                                 '"something else"'))
    problems = check_docs.check(repo, sys.executable)
    assert problems == ["setup.py: the long description is not README.md"]


def test_slug_matches_github():
    assert check_docs.slug("§5 Standard workloads") == "5-standard-workloads"
    assert check_docs.slug("LM head: `lm_head_loss`") == "lm-head-lm_head_loss"
    assert check_docs.slug("The authors' layout") == "the-authors-layout"
    assert check_docs.slug("Triton kernels under `torch.compile`") == "triton-kernels-under-torchcompile"
