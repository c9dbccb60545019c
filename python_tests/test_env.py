"""define_kernels/env.py: one rule for every switch read from the environment."""
import pytest

from define_kernels import env


@pytest.mark.parametrize("text, on", [
    ("1", True), ("true", True), ("YES", True), ("on", True), (" y ", True),
    ("0", False), ("", False), ("false", False), ("no", False), ("off", False), ("2", False),
])
def test_flag(monkeypatch, text, on):
    monkeypatch.setenv("DEFINE_KERNELS_TEST_FLAG", text)
    assert env.flag("DEFINE_KERNELS_TEST_FLAG") is on


def test_flag_unset_is_off(monkeypatch):
    monkeypatch.delenv("DEFINE_KERNELS_TEST_FLAG", raising=False)
    assert env.flag("DEFINE_KERNELS_TEST_FLAG") is False


def test_value(monkeypatch):
    monkeypatch.delenv("DEFINE_KERNELS_TEST_VALUE", raising=False)
    assert env.value("DEFINE_KERNELS_TEST_VALUE", "auto") == "auto"
    monkeypatch.setenv("DEFINE_KERNELS_TEST_VALUE", "")
    assert env.value("DEFINE_KERNELS_TEST_VALUE", "auto") == "auto"
    monkeypatch.setenv("DEFINE_KERNELS_TEST_VALUE", "torch")
    assert env.value("DEFINE_KERNELS_TEST_VALUE", "auto") == "torch"
