"""fit under torchrun: 2 CPU processes (gloo) train like one process on the same global batches.

A script written into tmp_path is run with ``python -m torch.distributed.run --nproc-per-node 2``:
fit initialises the process group itself, wraps the model in DistributedDataParallel, and only rank 0
prints and writes the checkpoint. The final weights must match a single-process fit of the same model
on the same global batches (BalancedBatchSampler with the same seed), since OnlineTripletLoss mines
over the global batch and scales so that DDP's gradient average is the single-process gradient.

Faults: the two ranks are started by hand (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as any launcher
sets them, so that no torchrun agent stops the survivor for it); rank 1 kills itself (SIGKILL) or hangs
(SIGSTOP) in the middle of epoch 2. Rank 0 must stop by itself, non-zero, within a bounded time (at once
for a dead rank, within the process-group timeout for a hung one), with an error that says what happened
and names the checkpoint; the same job relaunched with torchrun resumes from epoch 1's checkpoint and
ends with the weights of an uninterrupted single-process run.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch.utils.data import DataLoader

from checkpoints import CHECKPOINT_NAME
from datasets import BalancedBatchSampler
from launch import clean_environment, free_port, launcher
from trainer import fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETUP = """
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import losses
import utils


def build():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    generator = torch.Generator().manual_seed(1)
    data = torch.randn(32, 6, generator=generator)
    labels = torch.arange(4).repeat_interleave(8)  # 4 classes x 8 items
    loss_fn = losses.OnlineTripletLoss(1.0, utils.HardestNegativeTripletSelector(1.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, TensorDataset(data, labels), labels, loss_fn, optimizer
"""

SCRIPT = """
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from datasets import DistributedBalancedBatchSampler
from distributed import close_distributed
from setup_fit import build
from trainer import fit

model, dataset, labels, loss_fn, optimizer = build()
sampler = DistributedBalancedBatchSampler(labels, 4, 4, seed=0,
                                          num_replicas=int(os.environ["WORLD_SIZE"]),
                                          rank=int(os.environ["RANK"]))
loader = DataLoader(dataset, batch_sampler=sampler)
fit(loader, None, model, loss_fn, optimizer, None, n_epochs=2, device="cpu", progress=False,
    checkpoint_dir=sys.argv[1])
if dist.get_rank() == 0:
    torch.save(model.state_dict(), sys.argv[2])
close_distributed()
"""


def test_fit_under_torchrun_matches_one_process(tmp_path):
    (tmp_path / "setup_fit.py").write_text(textwrap.dedent(SETUP))
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    checkpoint_dir, weights = tmp_path / "checkpoints", tmp_path / "weights.pt"
    result = subprocess.run(launcher(2) + [str(script), str(checkpoint_dir), str(weights)],
                            env=clean_environment(ROOT, tmp_path), cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("Epoch")]
    assert [line.split(":")[0] for line in epoch_lines] == ["Epoch 1/2", "Epoch 2/2"]  # rank 0 only
    assert os.listdir(checkpoint_dir) == [CHECKPOINT_NAME]

    namespace = {}
    exec(textwrap.dedent(SETUP), namespace)  # the same build() as the script's, in this process
    model, dataset, labels, loss_fn, optimizer = namespace["build"]()
    loader = DataLoader(dataset, batch_sampler=BalancedBatchSampler(labels, 4, 4, seed=0))
    fit(loader, None, model, loss_fn, optimizer, None, n_epochs=2, device="cpu", progress=False)
    distributed = torch.load(weights, weights_only=True)
    single = model.state_dict()
    assert distributed.keys() == single.keys()
    untrained = namespace["build"]()[0].state_dict()
    assert not torch.equal(single["weight"], untrained["weight"])  # training did move the weights
    for key in single:
        torch.testing.assert_close(distributed[key], single[key], rtol=1e-5, atol=1e-6)
    checkpoint = torch.load(checkpoint_dir / CHECKPOINT_NAME, weights_only=True)
    assert checkpoint["epoch"] == 2
    for key in single:  # the unwrapped model's state_dict: no "module." prefix
        torch.testing.assert_close(checkpoint["model"][key], distributed[key])


# fit through the public distributed helpers; rank 1 (FAULT "kill" or "stop") stops in its 4th training
# batch: the second of epoch 2 (2 batches an epoch), after epoch 1's checkpoint.
FAULT_SCRIPT = """
import os
import signal
import sys

import torch
from torch.utils.data import DataLoader

from datasets import DistributedBalancedBatchSampler
from distributed import close_distributed, is_main_process
from setup_fit import build
from trainer import fit, setup_distributed

setup_distributed("cpu")
model, dataset, labels, loss_fn, optimizer = build()
training_batches = []


def loss_with_fault(embeddings, target):
    if torch.is_grad_enabled():
        training_batches.append(len(embeddings))
        if os.environ.get("FAULT") and os.environ["RANK"] == "1" and len(training_batches) == 4:
            os.kill(os.getpid(), signal.SIGKILL if os.environ["FAULT"] == "kill" else signal.SIGSTOP)
    return loss_fn(embeddings, target)


loader = DataLoader(dataset, batch_sampler=DistributedBalancedBatchSampler(labels, 4, 4, seed=0))
fit(loader, None, model, loss_with_fault, optimizer, None, n_epochs=3, device="cpu", progress=False,
    checkpoint_dir=sys.argv[1], resume=True)
if is_main_process():
    torch.save(model.state_dict(), sys.argv[2])
close_distributed()
"""


def _start_ranks(tmp_path, fault, timeout_seconds):
    """The two ranks of the fault script, started by hand: [rank 0's Popen, rank 1's Popen]."""
    port = free_port()
    processes = []
    for rank in (0, 1):
        env = clean_environment(ROOT, tmp_path, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FAULT=fault,
                                SIAMESE_TRIPLET_PG_TIMEOUT_S=str(timeout_seconds))
        processes.append(subprocess.Popen(
            [sys.executable, str(tmp_path / "fault.py"), str(tmp_path / "checkpoints"), str(tmp_path / "weights.pt")],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_dead_or_hung_rank_stops_the_other_and_the_job_resumes(tmp_path, fault):
    (tmp_path / "setup_fit.py").write_text(textwrap.dedent(SETUP))
    (tmp_path / "fault.py").write_text(textwrap.dedent(FAULT_SCRIPT))
    timeout_seconds = 5
    started = time.monotonic()
    survivor, victim = _start_ranks(tmp_path, fault, timeout_seconds)
    try:
        output, errors = survivor.communicate(timeout=120)  # bounded: a hang fails the test here
        stopped_after = time.monotonic() - started
    finally:
        victim.kill()
        victim.communicate()
    assert survivor.returncode != 0, output + errors
    assert victim.returncode == -signal.SIGKILL
    assert "rank 0 of 2 stopped in epoch 2" in errors, errors[-3000:]
    assert "another process died" in errors and "hung for longer than the process-group timeout" in errors
    assert str(tmp_path / "checkpoints" / CHECKPOINT_NAME) in errors  # what was kept, and how to resume
    assert stopped_after < 90
    checkpoint = torch.load(tmp_path / "checkpoints" / CHECKPOINT_NAME, weights_only=True)
    assert checkpoint["epoch"] == 1

    relaunched = subprocess.run(
        launcher(2) + [str(tmp_path / "fault.py"), str(tmp_path / "checkpoints"), str(tmp_path / "weights.pt")],
        env=clean_environment(ROOT, tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert relaunched.returncode == 0, relaunched.stdout + relaunched.stderr
    epochs = [line.split(":")[0] for line in relaunched.stdout.splitlines() if line.startswith("Epoch")]
    assert epochs == ["Epoch 2/3", "Epoch 3/3"]  # resumed after epoch 1

    namespace = {}
    exec(textwrap.dedent(SETUP), namespace)
    model, dataset, labels, loss_fn, optimizer = namespace["build"]()
    loader = DataLoader(dataset, batch_sampler=BalancedBatchSampler(labels, 4, 4, seed=0))
    fit(loader, None, model, loss_fn, optimizer, None, n_epochs=3, device="cpu", progress=False)
    resumed = torch.load(tmp_path / "weights.pt", weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)
