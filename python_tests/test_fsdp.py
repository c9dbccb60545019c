"""FSDP2 (`torch.distributed.fsdp.fully_shard`) with DeFINE inside a model: two gloo processes on
CPU train to the same parameters as one process on the whole batch (python_tests/fsdp_worker.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fsdp_worker
from tolerances import assert_close

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def run(command, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{HERE}")
    done = subprocess.run(command + ["--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_fully_shard_two_gloo_processes_match_one_process(tmp_path):
    worker = str(HERE / "fsdp_worker.py")
    run([sys.executable, worker, "--single"], tmp_path)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker], tmp_path)
    single = torch.load(tmp_path / "single.pt")
    ranks = [torch.load(tmp_path / f"fsdp_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(rank["sharded"] for rank in ranks), "parameters were not sharded (DTensors)"
    assert ranks[0]["losses"] != ranks[1]["losses"], "each rank must see its own half of the batch"
    for rank in ranks:
        assert rank["state"].keys() == single["state"].keys()
        for name, expected in single["state"].items():
            if name.endswith("_extra_state"):
                assert torch.equal(rank["state"][name], expected)
                continue
            assert_close(rank["state"][name], expected, name=f"{name} after FSDP2 training")
    # Training moved the parameters, so the comparison is not of two initialisations.
    torch.manual_seed(0)
    initial = fsdp_worker.TinyLM().state_dict()
    moved = max((single["state"][name] - value).abs().max().item()
                for name, value in initial.items() if value.is_floating_point())
    assert moved > 1e-3, moved
