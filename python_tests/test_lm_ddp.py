"""The LM trainer under torchrun: two gloo processes on CPU (localhost) train a few steps with
DistributedDataParallel; the replicas' parameters must stay identical and the loss must fall."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEFINE_KERNELS_DATA") or REPO.parent / "shared" / "data")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
@pytest.mark.skipif(not (DATA / "ptb").is_dir(), reason=f"PTB not found under {DATA}")
def test_two_gloo_replicas_stay_identical_and_learn(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "bench.lm.train", "--dataset", "ptb", "--data-dir", str(DATA), "--device", "cpu",
               "--variants", "define", "--train-tokens", "20000", "--eval-tokens", "500",
               "--layers", "1", "--emb-dim", "16", "--hidden", "16", "--map-dim", "8", "--expand-dim", "24",
               "--depth", "2", "--max-groups", "2", "--batch-size", "8", "--bptt", "10", "--lr", "1e-2",
               "--dropout", "0.1", "--steps", "30", "--eval-interval", "30", "--no-progress", "--no-plot",
               "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "lm.csv"),
               "--ddp-dump", str(tmp_path / "dump")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ranks = [torch.load(tmp_path / "dump" / f"define_rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["params"].numel() > 1000
    assert torch.equal(ranks[0]["params"], ranks[1]["params"]), "replicas diverged"
    for rank in ranks:
        losses = rank["losses"]
        assert len(losses) == 30
        # Each rank saw its own half of the batch, so the per-rank losses differ but both fall.
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert ranks[0]["losses"] != ranks[1]["losses"]  # the batch really was sharded
    assert (tmp_path / "lm.csv").exists()  # rank 0 wrote the results
