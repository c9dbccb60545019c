"""define_kernels/codes.py: the layer codes, and the C++ header generated from them."""
from define_kernels import codes
from define_kernels.codes import Activation, InputKind
from define_kernels.config import ACTS, INPUT_CONCAT, INPUT_MIX, INPUT_PREV, INPUT_PROJ, INPUT_X


def test_generated_header_is_current():
    """csrc/include/define_kernels/codes.h is what `python -m define_kernels.codes` writes."""
    assert codes.HEADER.read_text() == codes.header_text(), \
        "csrc/include/define_kernels/codes.h is stale: run python -m define_kernels.codes"
    assert codes.main(["--check"]) == 0


def test_labels_are_the_config_names():
    assert [kind.label for kind in InputKind] == [INPUT_X, INPUT_MIX, INPUT_CONCAT, INPUT_PREV, INPUT_PROJ]
    assert set(ACTS) == {act.label for act in Activation}
    for kind in InputKind:
        assert InputKind.of(kind.label) is kind
    for act in Activation:
        assert Activation.of(act.label) is act


def test_header_holds_every_code():
    text = codes.header_text()
    for kind in InputKind:
        assert f"kInput{kind.name.title()} = {int(kind)}" in text
    for act in Activation:
        assert f"kAct{act.name.title()} = {int(act)}" in text
    assert f"kIntsPerLayer = {codes.INTS_PER_LAYER}" in text
