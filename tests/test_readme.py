"""The README's quick-start code runs as printed (on a small synthetic stand-in for the data)."""

import os
import re

import torch

from datasets import InMemoryDataset

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def quick_start_code():
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def synthetic_split(n_per_class, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(n_per_class)
    images = torch.randn(len(labels), 1, 28, 28, generator=generator) + labels.view(-1, 1, 1, 1) / 5
    return InMemoryDataset(images, labels)


def test_quick_start_runs_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = quick_start_code().replace("n_epochs=20", "n_epochs=2")
    namespace = {"train_set": synthetic_split(25, 0), "test_set": synthetic_split(25, 1)}
    exec(compile(code, "README quick start", "exec"), namespace)
    history = namespace["history"]
    assert history["epoch"] == [1, 2]
    assert all(torch.isfinite(torch.tensor(history["train_loss"])))
    assert (tmp_path / "checkpoints" / "online-triplet" / "checkpoint.pt").is_file()
