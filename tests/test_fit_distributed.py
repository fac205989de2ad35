"""fit under torchrun: 2 CPU processes (gloo) train like one process on the same global batches.

A script written into tmp_path is run with ``python -m torch.distributed.run --nproc-per-node 2``:
fit initialises the process group itself, wraps the model in DistributedDataParallel, and only rank 0
prints and writes the checkpoint. The final weights must match a single-process fit of the same model
on the same global batches (BalancedBatchSampler with the same seed), since OnlineTripletLoss mines
over the global batch and scales so that DDP's gradient average is the single-process gradient.
"""

import os
import socket
import subprocess
import sys
import textwrap

import torch
from torch.utils.data import DataLoader

from datasets import BalancedBatchSampler
from trainer import CHECKPOINT_NAME, fit

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
dist.destroy_process_group()
"""


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fit_under_torchrun_matches_one_process(tmp_path):
    (tmp_path / "setup_fit.py").write_text(textwrap.dedent(SETUP))
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    checkpoint_dir, weights = tmp_path / "checkpoints", tmp_path / "weights.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path)]), OMP_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script),
         str(checkpoint_dir), str(weights)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
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
