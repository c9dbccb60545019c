"""torch.compile(fullgraph=True) of models using DeFINE / HGT on CPU matches eager."""
import pytest
import torch
from torch import nn

from define_kernels import HGT, DeFINE, HGTConfig
from tolerances import assert_close


class TinyLM(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.embed = DeFINE(40, 16, map_dim=8, expand_dim=32, depth=2, max_groups=2, **options)
        self.head = nn.Linear(16, 40)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Inductor draws random numbers with its own generator unless told to fall back to eager's;
    # the dropout seed comes from torch.randint, so eager and compiled must share the generator.
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("options", [dict(), dict(padding_idx=0, dropout=0.2),
                                     dict(activations="save"), dict(activations="recompute", dropout=0.2),
                                     dict(activations="save", backend="cpu_cpp", dropout=0.2)],
                         ids=["plain", "pad-dropout", "save", "recompute-dropout", "save-cpu_cpp"])
def test_compiled_define_matches_eager_forward_and_backward(options):
    model = TinyLM(**options)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    ids = torch.randint(0, 40, (3, 7))
    ids[0, 0] = 0
    for training in (True, False):
        model.train(training)
        torch.manual_seed(2)
        eager = model(ids)
        torch.manual_seed(2)
        out = compiled(ids)
        assert_close(out, eager, name=f"logits (training={training})")
    model.train()
    torch.manual_seed(2)
    model(ids).sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(2)
    compiled(ids).sum().backward()
    for (name, param), expected in zip(model.named_parameters(), eager_grads):
        assert_close(param.grad, expected, name=f"grad {name}")


def test_compiled_hgt_dynamic_shapes():
    model = HGT(HGTConfig(8, 24, 6, 2, 2, shuffle=True))
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for rows in (3, 5, 11):
        x = torch.randn(rows, 8)
        assert_close(compiled(x), model(x), name=f"rows={rows}")
