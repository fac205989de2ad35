"""Writes tests/old_formats/checkpoint/checkpoint.pt: a checkpoint of ``trainer.fit`` as the library wrote it
before checkpoints had a format version (format version 1), after 1 epoch of ``train``'s run.

Run it with the old library first on the path, from that checkout, e.g.
``cd OLD_CHECKOUT && OMP_NUM_THREADS=1 PYTHONPATH=. python NEW_CHECKOUT/tests/old_formats/write_checkpoint.py
NEW_CHECKOUT/tests/old_formats/checkpoint``. tests/test_checkpoints.py imports ``train`` from here, so the
run that resumes the file is built the same way. It uses only names both libraries have.
"""

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from losses import OnlineTripletLoss
from metrics import AverageNonzeroTripletsMetric
from trainer import fit
from utils import RandomNegativeTripletSelector

EPOCHS_WRITTEN = 1


def build():
    """A triplet run drawing from private generators (the train loader's shuffle, the validation sampler's,
    the selector's negatives) and the global RNG (the weights, dropout): ``(train_loader, val_loader, model,
    loss_fn, optimizer)``."""
    torch.manual_seed(0)
    x = torch.randn(48, 4)
    labels = torch.arange(48) % 4
    train_loader = DataLoader(TensorDataset(x, labels), batch_size=12, shuffle=True,
                              generator=torch.Generator().manual_seed(1))
    val_set = TensorDataset(x[:24] + 0.1, labels[:24])
    val_loader = DataLoader(val_set, batch_size=8, sampler=RandomSampler(
        val_set, generator=torch.Generator().manual_seed(2)))
    selector = RandomNegativeTripletSelector(1.0, generator=torch.Generator().manual_seed(3))
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return train_loader, val_loader, model, OnlineTripletLoss(1.0, selector), optimizer


def train(n_epochs, checkpoint_dir=None, resume=False, seen=None):
    """``(model, history)`` of ``build``'s run, with a StepLR halving the learning rate every epoch, trained to
    ``n_epochs``; ``seen``: a list that receives the first input value of every item of every batch the model
    is called on, in order."""
    train_loader, val_loader, model, loss_fn, optimizer = build()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    if seen is not None:
        model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0][:, 0].tolist()))
    history = fit(train_loader, val_loader, model, loss_fn, optimizer, scheduler, n_epochs, device="cpu",
                  progress=False, log_interval=10_000, metrics=[AverageNonzeroTripletsMetric()],
                  checkpoint_dir=checkpoint_dir, resume=resume)
    return model, history


if __name__ == "__main__":
    train(EPOCHS_WRITTEN, checkpoint_dir=sys.argv[1])
