"""The dropout hash of docs/math.md in plain Python integers, written from the doc, not from the
library: the tests that check the library's masks bit for bit (test_reference) and that place a
draw exactly on the keep threshold (test_reference.py) both read it from here."""


def fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def draw24(seed: int, layer: int, row_key: int, feature: int) -> int:
    """The 24-bit draw for one element; kept when draw >= int(p * 2^24)."""
    return fmix32(fmix32(fmix32(seed ^ fmix32(layer)) ^ row_key) ^ feature) >> 8
