"""define_kernels/seed.py: the dropout seed is drawn from torch's default generator by an opaque
op, so torch.manual_seed repeats it and a compiled function draws what eager draws."""
import torch

from define_kernels.seed import draw_seed


def test_seed_follows_manual_seed():
    torch.manual_seed(3)
    first = draw_seed()
    torch.manual_seed(3)
    again = draw_seed()
    assert first.dtype == torch.int64 and first.dim() == 0 and first.device.type == "cpu"
    assert torch.equal(first, again) and 0 <= int(first) < 2**31 - 1


def test_compiled_draw_is_eagers_draw():
    compiled = torch.compile(lambda: draw_seed() + 0, backend="eager", fullgraph=True)
    torch.manual_seed(5)
    eager = draw_seed()
    torch.manual_seed(5)
    assert torch.equal(compiled(), eager)
