"""On a CUDA GPU (marked ``cuda``: skipped without one, left out of ``make test``, run by
benchmarks/gpu_check.sh): the selectors choose on the GPU what they choose on the CPU, the online losses
agree, fit trains on the GPU in float32, bf16, fp16 and compiled, with checkpoints a CPU can resume, and
a study run trains, scores, plots and records its row on the GPU."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import experiments
import methods
from checkpoints import CHECKPOINT_NAME
from fixtures import write_idx_fixture
from losses import OnlineTripletLoss
from results import image_path, output_dirs
from runs import RUN_ROW
from trainer import MixedPrecision, fit
from utils import HardNegativePairSelector

pytestmark = pytest.mark.cuda

DETERMINISTIC = ("all", "hardest", "batch-hard")


def batch(seed, device, n_classes=16, per_class=8, dim=32):
    """Float64 embeddings (so that no threshold test is decided by rounding) and labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    embeddings = torch.randn(n_classes, dim, generator=generator, dtype=torch.float64)[labels]
    embeddings = embeddings + torch.randn(len(labels), dim, generator=generator, dtype=torch.float64)
    return embeddings.to(device), labels.to(device)


def rows(indices):
    return sorted(map(tuple, indices.cpu().tolist()))


@pytest.mark.parametrize("selector", DETERMINISTIC)
def test_deterministic_selectors_choose_on_the_gpu_what_they_choose_on_the_cpu(selector):
    for seed in range(5):
        on_gpu = methods.SELECTORS[selector](1.0, None).get_triplets(*batch(seed, "cuda"))
        on_cpu = methods.SELECTORS[selector](1.0, None).get_triplets(*batch(seed, "cpu"))
        assert on_gpu.device.type == "cuda"
        assert rows(on_gpu) == rows(on_cpu)


def test_hard_negative_pairs_on_the_gpu_are_those_on_the_cpu():
    for seed in range(5):
        gpu_pairs = HardNegativePairSelector().get_pairs(*batch(seed, "cuda"))
        cpu_pairs = HardNegativePairSelector().get_pairs(*batch(seed, "cpu"))
        for on_gpu, on_cpu in zip(gpu_pairs, cpu_pairs):
            assert rows(on_gpu) == rows(on_cpu)


@pytest.mark.parametrize("selector", sorted(methods.SELECTORS))
def test_every_selector_runs_on_the_gpu_with_a_gpu_or_cpu_generator(selector):
    embeddings, labels = batch(0, "cuda")
    for generator in (torch.Generator(device="cuda").manual_seed(0), torch.Generator().manual_seed(0)):
        triplets = methods.SELECTORS[selector](1.0, generator).get_triplets(embeddings, labels)
        assert triplets.device.type == "cuda" and triplets.shape[1] == 3
        anchors, positives, negatives = triplets.unbind(1)
        assert bool((labels[anchors] == labels[positives]).all() and (labels[anchors] != labels[negatives]).all())


def test_the_hardest_triplet_loss_and_its_gradient_agree_between_gpu_and_cpu():
    results = []
    for device in ("cuda", "cpu"):
        embeddings, labels = batch(1, device)
        embeddings = embeddings.float().requires_grad_()
        loss, count = OnlineTripletLoss(1.0, methods.SELECTORS["hardest"](1.0, None))(embeddings, labels)
        loss.backward()
        results.append((loss.item(), count, embeddings.grad.cpu()))
    assert results[0][1] == results[1][1]
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-4, atol=1e-6)


def test_under_autocast_on_the_gpu_the_loss_is_float32():
    embeddings, labels = batch(2, "cuda")
    layer = nn.Linear(embeddings.shape[1], 8).cuda()
    with MixedPrecision("bf16", "cuda").autocast():
        outputs = layer(embeddings.float())
        loss, _ = OnlineTripletLoss(1.0, methods.SELECTORS["batch-hard"](1.0, None))(outputs, labels)
    assert outputs.dtype == torch.bfloat16 and loss.dtype == torch.float32


@pytest.mark.parametrize("options", [{}, {"amp": "bf16"}, {"amp": "fp16"}, {"compile": True}])
def test_fit_trains_on_the_gpu_and_a_cpu_resumes_its_checkpoint(tmp_path, options):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2), nn.LogSoftmax(dim=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    history = fit(loader, None, model, nn.NLLLoss(), optimizer, None, 4, device="cuda", progress=False,
                  checkpoint_dir=tmp_path, **options)
    assert next(model.parameters()).device.type == "cuda"
    assert history["train_loss"][-1] < 0.6 * history["train_loss"][0]
    checkpoint = torch.load(tmp_path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert (checkpoint["grad_scaler"] is not None) == (options.get("amp") == "fp16")
    cpu_model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2), nn.LogSoftmax(dim=1))
    cpu_optimizer = torch.optim.Adam(cpu_model.parameters(), lr=1e-2)
    resumed = fit(loader, None, cpu_model, nn.NLLLoss(), cpu_optimizer, None, 5, device="cpu", progress=False,
                  resume=tmp_path)
    assert resumed["epoch"] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("method, selector", [("softmax", None), ("online-triplet", "random-hard")])
def test_a_study_run_on_the_gpu_writes_its_row_plots_and_model_file(tmp_path, monkeypatch, method, selector):
    write_idx_fixture(tmp_path / "data", 30, 10)
    monkeypatch.chdir(tmp_path)
    row = experiments.run_method("mnist", method, selector=selector, embedding_dim=3, quick=True, root="data",
                                 device="cuda", progress=False, run_dir="run", model_file="model.pt")
    assert row["device"] == torch.cuda.get_device_name()
    label = experiments.method_label(method, selector)
    for split in ("train", "test"):
        assert (tmp_path / image_path("mnist", label, split, 3, output_dirs("mnist", "quick", committed=False).images)).exists()
    assert (tmp_path / "model.pt").exists() and (tmp_path / "run" / RUN_ROW).exists()
