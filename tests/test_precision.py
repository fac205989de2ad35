"""Mixed precision and compilation in training: ``fit(..., amp="bf16" | "fp16", compile=True)``.

bfloat16 and float16 autocast run on CPUs too, so everything is tested here: the model computes in half
precision inside ``MixedPrecision.autocast()`` while every distance, and so every selector's choice and
every loss, stays in float32 (the same triplets and the same loss as on the float32 copy of the
embeddings); a bf16 run trains like a float32 one; fp16's gradient scaler is saved in checkpoints and a
resumed run equals an uninterrupted one bit for bit; a compiled model trains like the eager one and
checkpoints the same weights; experiments.py takes ``--amp`` and ``--compile``.
"""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import experiments
import utils
from fixtures import write_idx_fixture
from losses import OnlineContrastiveLoss, OnlineTripletLoss
from trainer import CHECKPOINT_NAME, MixedPrecision, fit
from utils import paired_squared_distances, pdist, squared_distances

SEEDS = range(5)


def half_embeddings(seed, n_classes=4, per_class=6, dim=8):
    """Embeddings ``(B, D)`` made by a linear layer under bfloat16 autocast, and labels ``(B,)``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n_classes * per_class, 16, generator=generator)
    layer = nn.Linear(16, dim)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(dim, 16, generator=generator) / 4)
    with MixedPrecision("bf16", "cpu").autocast():
        embeddings = layer(inputs)
    return embeddings, torch.arange(n_classes).repeat_interleave(per_class)


def test_the_model_runs_in_bfloat16_and_the_distances_in_float32():
    embeddings, _ = half_embeddings(0)
    assert embeddings.dtype == torch.bfloat16  # autocast is on
    exact = embeddings.float()
    with MixedPrecision("bf16", "cpu").autocast():
        matrix, queries, paired = pdist(embeddings), squared_distances(embeddings, embeddings), \
            paired_squared_distances(embeddings, embeddings.flip(0))
    assert matrix.dtype == queries.dtype == paired.dtype == torch.float32
    assert torch.equal(matrix, pdist(exact))
    assert torch.equal(queries, squared_distances(exact, exact))
    assert torch.equal(paired, paired_squared_distances(exact, exact.flip(0)))
    double = torch.randn(5, 3, dtype=torch.float64)
    with MixedPrecision("bf16", "cpu").autocast():
        assert pdist(double).dtype == torch.float64  # float64 is left alone


@pytest.mark.parametrize("selector", sorted(experiments.SELECTORS))
def test_every_selector_mines_under_autocast_what_it_mines_in_float32(selector):
    for seed in SEEDS:
        embeddings, labels = half_embeddings(seed)
        exact = embeddings.detach().float().requires_grad_()
        half = embeddings.detach().requires_grad_()
        losses = [OnlineTripletLoss(1.0, experiments.SELECTORS[selector](1.0, torch.Generator().manual_seed(seed)))
                  for _ in range(2)]
        with MixedPrecision("bf16", "cpu").autocast():
            under_autocast = losses[0].triplet_selector.get_triplets(half, labels)
        assert torch.equal(under_autocast, losses[1].triplet_selector.get_triplets(exact, labels))
        for loss in losses:  # the same generators again, for the losses' own draws
            loss.triplet_selector = experiments.SELECTORS[selector](1.0, torch.Generator().manual_seed(seed))
        with MixedPrecision("bf16", "cpu").autocast():
            (loss_half, count_half) = losses[0](half, labels)
        loss_exact, count_exact = losses[1](exact, labels)
        assert loss_half.dtype == torch.float32 and count_half == count_exact
        assert torch.equal(loss_half, loss_exact)
        loss_half.backward()
        loss_exact.backward()
        assert half.grad.dtype == torch.bfloat16  # the gradient reaches the half-precision embeddings
        torch.testing.assert_close(half.grad.float(), exact.grad.to(torch.bfloat16).float())


def test_the_contrastive_loss_under_autocast_is_its_float32_value():
    embeddings, labels = half_embeddings(3)
    loss = OnlineContrastiveLoss(1.0, utils.HardNegativePairSelector())
    with MixedPrecision("bf16", "cpu").autocast():
        value = loss(embeddings, labels)
    assert value.dtype == torch.float32
    assert torch.equal(value, loss(embeddings.float(), labels))


def classification(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=generator)
    y = (x[:, 0] + x[:, 1] > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2), nn.LogSoftmax(dim=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return DataLoader(TensorDataset(x, y), batch_size=16), model, optimizer


def train(epochs, **options):
    loader, model, optimizer = classification()
    history = fit(loader, None, model, nn.NLLLoss(), optimizer, None, epochs, device="cpu", progress=False,
                  log_interval=10_000, **options)
    return model, optimizer, history


def test_a_bfloat16_run_trains_like_a_float32_one():
    model, _, history = train(6, amp="bf16")
    reference, _, reference_history = train(6)
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
    assert history["train_loss"][-1] == pytest.approx(reference_history["train_loss"][-1], rel=0.1)
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())  # weights stay float32
    for trained, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(trained, expected, atol=0.05, rtol=0.05)


def test_float16_scales_the_loss_and_its_scaler_resumes_exactly(tmp_path):
    straight, straight_optimizer, straight_history = train(4, amp="fp16", checkpoint_dir=tmp_path / "straight")
    train(2, amp="fp16", checkpoint_dir=tmp_path / "split")
    resumed, resumed_optimizer, resumed_history = train(4, amp="fp16", checkpoint_dir=tmp_path / "split",
                                                        resume=True)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert {key: value for key, value in straight_history.items() if key != "seconds"} == \
        {key: value for key, value in resumed_history.items() if key != "seconds"}
    scalers = [torch.load(tmp_path / folder / CHECKPOINT_NAME, weights_only=True)["grad_scaler"]
               for folder in ("straight", "split")]
    assert scalers[0] == scalers[1]
    # 4 batches an epoch, 4 epochs: the resumed run continued the scaler's count of good steps
    assert scalers[0]["_growth_tracker"] == 16 and scalers[0]["scale"] == 65536.0


def test_a_checkpoint_without_amp_holds_no_scaler(tmp_path):
    train(1, checkpoint_dir=tmp_path)
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["grad_scaler"] is None


@pytest.mark.parametrize("amp", ["fp8", "float16", True])
def test_an_unknown_amp_is_refused_by_name(amp):
    with pytest.raises(ValueError, match="amp"):
        train(1, amp=amp)


def test_compile_must_be_true_or_false():
    with pytest.raises(TypeError, match="compile"):
        train(1, compile="yes")


def test_a_compiled_model_trains_like_the_eager_one_and_checkpoints_its_plain_weights(tmp_path):
    compiled, _, history = train(2, compile=True, checkpoint_dir=tmp_path)
    eager, _, eager_history = train(2)
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert history["train_loss"] == pytest.approx(eager_history["train_loss"], rel=1e-5)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["model"]
    assert saved.keys() == eager.state_dict().keys()  # no "_orig_mod." prefix


def test_experiments_takes_amp_and_records_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_idx_fixture(tmp_path / "data")
    rows = experiments.main(["--dataset", "mnist", "--methods", "online-triplet", "--quick", "--no-progress",
                             "--root", "data", "--amp", "bf16"])
    assert rows[0]["amp"] == "bf16" and rows[0]["compile"] is False
    assert 0 < rows[0]["final_train_loss"] < float("inf")
    assert rows[0]["precision_at_1"] > 0.2  # 10 classes: it learned something in bfloat16
