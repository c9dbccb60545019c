"""Soak: thousands of train/eval alternations with optimizer steps, state_dict saves and loads,
backend switches (torch <-> cpu_cpp) and cache invalidations. Asserts: no drift from the float64
reference, process RSS growth within SOAK_RSS_BOUND_MIB after warm-up, no leaked cache tables.

DEFINE_KERNELS_SOAK_ITERS sets the length (default 3000 alternations, under a minute on a
2-core CI machine); the run prints its figures (README "Reliability" quotes them).
"""
import io
import os
import time
import weakref

import torch

from define_kernels import DeFINE, backends

from tolerances import assert_close

ITERATIONS = int(os.environ.get("DEFINE_KERNELS_SOAK_ITERS", "3000"))
WARMUP = min(200, ITERATIONS // 5)
SOAK_RSS_BOUND_MIB = 32
CHECK_EVERY, SWITCH_EVERY, SAVE_EVERY = 25, 7, 50
ARGS = dict(map_dim=8, expand_dim=24, depth=2, max_groups=2, padding_idx=0, dropout=0.1)


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reference_output(model, ids):
    """The same parameters on the float64 reference, live (no cache)."""
    twin = DeFINE(model.num_embeddings, model.embedding_dim, backend="torch", cache=False, **ARGS).double()
    twin.load_state_dict(model.state_dict())
    return twin.eval()(ids)


def test_soak_train_eval_alternation():
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-offs would dominate (and vary with machine load)
    try:
        soak()
    finally:
        torch.set_num_threads(previous_threads)


def soak():
    names = [n for n in ("torch", "cpu_cpp") if n in backends.available_backends()]
    torch.manual_seed(0)
    model = DeFINE(40, 8, backend=names[0], **ARGS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    tables, start_rss, builds_expected, checks, switches, saves = [], None, 0, 0, 0, 0
    started = time.perf_counter()
    for step in range(ITERATIONS):
        if step == WARMUP:
            start_rss = rss_mib()
        if step % SWITCH_EVERY == 0 and len(names) > 1:
            model.hgt.backend = names[(step // SWITCH_EVERY) % len(names)]
            switches += 1
        ids = torch.randint(0, 40, (3, 5), generator=generator)
        model.train()
        y = model(ids)
        (y * torch.randn(y.shape, generator=generator)).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % SAVE_EVERY == 0:
            buffer = io.BytesIO()
            torch.save(model.state_dict(), buffer)
            buffer.seek(0)
            model.load_state_dict(torch.load(buffer))
            saves += 1
        model.eval()
        with torch.no_grad():  # where the cache serves (no gradient can be needed)
            y_eval = model(ids)
        builds_expected += 1  # parameters changed since the last eval: exactly one rebuild
        assert model.cache.builds == builds_expected, "cache not rebuilt (or rebuilt twice) after a step"
        tables.append(weakref.ref(model.cache.table))
        assert sum(ref() is not None for ref in tables) == 1, "a stale cache table is still alive"
        tables = [ref for ref in tables if ref() is not None]
        assert torch.equal(y_eval[ids == 0], torch.zeros_like(y_eval[ids == 0]))
        if step % CHECK_EVERY == 0 or step == ITERATIONS - 1:
            assert_close(y_eval.double(), reference_output(model, ids), torch.float32,
                         name=f"eval output at step {step} ({model.backend})")
            checks += 1
    growth = rss_mib() - start_rss
    elapsed = time.perf_counter() - started
    print(f"\nsoak: {ITERATIONS} train/eval alternations in {elapsed:.1f} s, backends {names}, "
          f"{switches} switches, {saves} state_dict round trips, {builds_expected} cache rebuilds, "
          f"{checks} reference checks, RSS growth {growth:+.1f} MiB after warm-up "
          f"(bound {SOAK_RSS_BOUND_MIB} MiB)")
    assert growth < SOAK_RSS_BOUND_MIB, f"RSS grew {growth:.1f} MiB over {ITERATIONS - WARMUP} steps"
