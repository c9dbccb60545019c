"""Every provider x mode of bench/providers.py at a small size, timed by pytest-benchmark.

    make bench-suite      # = pytest bench/suite --benchmark-only
    pytest bench/suite --benchmark-only --benchmark-compare   # against a saved run

Providers that cannot run here are skipped with their reason. Sizes stay small so the whole
suite finishes in minutes on a CPU; `python -m bench.run` is the tool for real workloads.
"""
import functools

import pytest
import torch

from bench import metrics, providers, workloads

WORKLOAD = workloads.parse_workload("custom:V=2000,n=32,k=128,m=64,N=2,g=4")
TOKENS = 512
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SPEC = providers.Spec(WORKLOAD, DEVICE, DTYPE)
PROVIDERS = {provider.name: provider for provider in providers.all_providers()}


@functools.lru_cache(maxsize=None)
def prepared(name: str):
    """One setup per provider for the whole session, or the reason it cannot run."""
    provider = PROVIDERS[name]
    reason = provider.unavailable(SPEC)
    if reason:
        return None, reason
    try:
        return provider.setup(SPEC), None
    except providers.ProviderUnavailable as error:
        return None, str(error)


@functools.lru_cache(maxsize=1)
def batch():
    ids = workloads.batch_ids(WORKLOAD, TOKENS).to(DEVICE)
    grad_out = torch.randn(TOKENS, WORKLOAD.embedding_dim, generator=torch.Generator().manual_seed(0))
    return ids, grad_out.to(DEVICE, DTYPE)


def _synchronized(step):
    if DEVICE.type != "cuda":
        return step

    def run():
        step()
        torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("mode", metrics.MODES)
@pytest.mark.parametrize("name", sorted(PROVIDERS))
def test_provider(benchmark, name, mode):
    built, reason = prepared(name)
    if built is None:
        pytest.skip(f"{name}: {reason}")
    if mode not in built.modes:
        pytest.skip(f"{name} offers only {built.modes}")
    ids, grad_out = batch()
    built.reset()
    benchmark.group = f"{WORKLOAD.name} {mode} {TOKENS} ids {str(DTYPE).replace('torch.', '')}"
    benchmark.extra_info.update(provider=name, mode=mode, tokens=TOKENS, params=built.parameters)
    benchmark.pedantic(_synchronized(built.step(mode, ids, grad_out)), rounds=5, warmup_rounds=2,
                       iterations=1)
