"""The `reference` LM-head backend: reference.py itself, on every device and dtype."""
from ..checks import FLOAT_DTYPES
from . import reference
from .registry import HeadBackend, register

register(HeadBackend(name="reference", priority=100, devices=("cpu", "cuda", "meta"),
                     dtypes=FLOAT_DTYPES, forward=reference.forward, backward=reference.backward))
