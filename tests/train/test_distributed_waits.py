"""Under torchrun, ranks waiting for rank-0-only work (prediction, evaluation, backtest) must not time out the job:
two gloo processes, the training group's timeout cut to 3 s, rank 0 busy for 8 s."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocess + torchrun

REPO = Path(__file__).resolve().parents[2]
SCRIPT = r"""
import sys, time
from datetime import timedelta
import torch.distributed as dist
from kronos.config import Config
from kronos.pipeline import KronosPipeline, barrier, is_main_process
from kronos.train import distributed as kd

kd.COLLECTIVE_TIMEOUT = timedelta(seconds=3)  # the training group's timeout, short for the test
mode = sys.argv[1]
assert not dist.is_initialized()

class Probe(KronosPipeline):  # run() from Python under torchrun sets up (and removes) its own group
    def __init__(self):
        self.config = Config(device="cpu", run_folders=False)  # no run folder: this probe writes nothing
    def _locked_run(self, *args, **kwargs):  # what run() calls inside its process group (steps not needed here)
        return dist.get_world_size()

if mode == "probe":  # its own torchrun: a second group in one process races on gloo's rendezvous keys
    size = Probe().run()
    sys.stdout.write(f"pipeline group size {size} {dist.is_initialized()}\n")  # one write: ranks share the pipe
    sys.stdout.flush()
    sys.exit(0)
with kd.process_group(Config(device="cpu", dist_wait_hours=0.05)) as ctx:  # what KronosPipeline.run() does
    assert dist.is_initialized() and ctx.world_size == 2 and ctx.backend == "gloo"
    if is_main_process():
        time.sleep(8)  # a long rank-0 step (prediction / evaluation)
    if mode == "wait":
        barrier()  # the pipeline's wait between steps
    else:
        dist.barrier()  # the training group: times out
    print(f"rank {ctx.rank} waited", flush=True)
assert not dist.is_initialized()  # the group it set up is gone
"""


def _torchrun(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "waits.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


def test_a_slow_rank0_step_does_not_time_out_the_wait(tmp_path: Path) -> None:
    r = _torchrun(tmp_path, "wait")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("waited") == 2


def test_pipeline_run_from_python_sets_up_its_own_group(tmp_path: Path) -> None:
    r = _torchrun(tmp_path, "probe")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("pipeline group size 2 False") == 2


def test_the_training_group_alone_would_time_out(tmp_path: Path) -> None:
    # The control: the same slow step with a barrier on the training group fails, so the test above can fail.
    r = _torchrun(tmp_path, "plain")
    assert r.returncode != 0
    assert "rank 1 waited" not in r.stdout
