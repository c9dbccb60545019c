#!/usr/bin/env python3
"""Prints the skip count of a pytest run against the expected list; exit 1 on an unexpected skip.

Usage: python .ci/check_skips.py report.xml [--expected .ci/expected_skips.txt]
(report.xml from `pytest --junitxml=report.xml`). Each non-comment line of the expected list is
a regular expression matched against "<test id>: <skip message>"; a skip matching none of them is
unexpected, e.g. a backend that should run here and silently did not.
"""
import argparse
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def skipped_tests(report: Path):
    for case in ET.parse(report).getroot().iter("testcase"):
        skip = case.find("skipped")
        if skip is not None and skip.get("type") != "pytest.xfail":
            yield f"{case.get('classname')}::{case.get('name')}", skip.get("message", "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--expected", type=Path, default=Path(__file__).with_name("expected_skips.txt"))
    args = parser.parse_args()
    patterns = [line.split("  #")[0].strip() for line in args.expected.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    skips = list(skipped_tests(args.report))
    unexpected = [f"{test}: {message}" for test, message in skips
                  if not any(re.search(p, f"{test}: {message}") for p in patterns)]
    print(f"skips: {len(skips)} ({len(skips) - len(unexpected)} expected, {len(unexpected)} unexpected; "
          f"{len(patterns)} patterns in {args.expected.name})")
    for line in unexpected:
        print(f"  UNEXPECTED SKIP {line}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
