"""The one reader of environment variables, so every switch follows the same rule.

A yes/no variable is on when its value is 1, true, yes, on or y (any case), the rule Triton's own
TRITON_INTERPRET follows; unset, empty or anything else is off. A value variable is its text,
or the default when unset or empty. Each switch is read where it is used, when it is used.
"""
from __future__ import annotations

import os
from typing import Optional

_ON = ("1", "true", "yes", "on", "y")


def flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _ON


def value(name: str, default: Optional[str] = None) -> Optional[str]:
    text = os.environ.get(name, "")
    return text if text else default
