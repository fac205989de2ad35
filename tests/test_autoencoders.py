"""Siamese / triplet autoencoders and VAEs: losses, data and the experiment (the networks are tested in
test_networks.py, the feature extractors in test_features.py).

The KL formulas are checked against torch.distributions, the combined losses against the plain
metric and reconstruction losses they reduce to at M = 1 and M = 0, and run_experiment end to end on
tiny data sets written here (IDX, CIFAR's python pickles, an ImageFolder).
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.distributions import Independent, Normal, kl_divergence

import autoencoders
import datasets
import known_datasets
from fixtures import write_idx_fixture
from test_known_datasets import write_cifar_fixture
from launch import command_lines
from losses import (ContrastiveLoss, OnlineTripletLoss, PairwiseAutoencoderLoss, TripletAutoencoderLoss,
                    TripletLoss, gaussian_kl, kl_to_standard_normal, symmetric_gaussian_kl)
from networks import SiameseAutoencoder, TripletAutoencoder, make_autoencoder
from utils import AllPositivePairSelector, AllTripletSelector, HardNegativePairSelector

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 1e-9  # losses.EPS, under the square root of the contrastive hinge


def batch(shape, n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=generator)


def labels_of(n=8, n_classes=3):
    return torch.arange(n) % n_classes


# ---------------------------------------------------------------------------------------------------
# KL divergences


def gaussian(mean, log_var):
    return Independent(Normal(mean, (0.5 * log_var).exp()), 1)


def random_gaussians(seed, n=7, dim=5):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=generator, dtype=torch.float64) * scale for scale in (2.0, 1.5, 2.0, 1.5)]


@pytest.mark.parametrize("seed", range(5))
def test_gaussian_kl_matches_torch_distributions(seed):
    mean1, log_var1, mean2, log_var2 = random_gaussians(seed)
    expected = kl_divergence(gaussian(mean1, log_var1), gaussian(mean2, log_var2))
    torch.testing.assert_close(gaussian_kl(mean1, log_var1, mean2, log_var2), expected, rtol=1e-12, atol=1e-12)
    backwards = kl_divergence(gaussian(mean2, log_var2), gaussian(mean1, log_var1))
    torch.testing.assert_close(symmetric_gaussian_kl(mean1, log_var1, mean2, log_var2), (expected + backwards) / 2,
                               rtol=1e-12, atol=1e-12)
    prior = gaussian(torch.zeros_like(mean1), torch.zeros_like(log_var1))
    torch.testing.assert_close(kl_to_standard_normal(mean1, log_var1), kl_divergence(gaussian(mean1, log_var1), prior),
                               rtol=1e-12, atol=1e-12)


def test_kl_is_zero_for_identical_gaussians_and_has_exact_gradients():
    mean, log_var, other_mean, other_log_var = random_gaussians(9, n=3, dim=2)
    assert torch.equal(gaussian_kl(mean, log_var, mean, log_var), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(symmetric_gaussian_kl(mean, log_var, other_mean, other_log_var),
                       symmetric_gaussian_kl(other_mean, other_log_var, mean, log_var))
    inputs = [t.clone().requires_grad_() for t in (mean, log_var, other_mean, other_log_var)]
    assert torch.autograd.gradcheck(gaussian_kl, inputs)
    assert torch.autograd.gradcheck(kl_to_standard_normal, inputs[:2])
    with pytest.raises(ValueError, match="one shape"):
        gaussian_kl(mean, log_var, other_mean[:2], other_log_var)


# ---------------------------------------------------------------------------------------------------
# combined losses


def model_output(variational, shape=(20,), n=8, seed=0):
    torch.manual_seed(seed)
    model = make_autoencoder(shape, 3, variational, hidden_dims=(16, 8))
    x = batch(shape, n=n, seed=seed)
    return model, model(x), x


@pytest.mark.parametrize("variational", [False, True])
def test_pairwise_loss_at_m1_is_the_contrastive_loss(variational):
    _, output, x = model_output(variational)
    labels = labels_of()
    loss = PairwiseAutoencoderLoss(1.0, margin=2.0, pair_selector=HardNegativePairSelector())(output, x, labels)
    positives, negatives = HardNegativePairSelector().get_pairs(output.mean, labels)
    pairs = torch.cat([positives, negatives])
    target = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))])
    expected = ContrastiveLoss(2.0)(output.mean[pairs[:, 0]], output.mean[pairs[:, 1]], target)
    assert torch.equal(loss, expected)


@pytest.mark.parametrize("variational", [False, True])
def test_triplet_loss_at_m1_is_the_triplet_loss(variational):
    _, output, x = model_output(variational)
    labels = labels_of()
    loss = TripletAutoencoderLoss(1.0, margin=0.5, triplet_selector=AllTripletSelector())(output, x, labels)
    anchors, positives, negatives = AllTripletSelector().get_triplets(output.mean, labels).unbind(1)
    expected = TripletLoss(0.5)(output.mean[anchors], output.mean[positives], output.mean[negatives])
    assert torch.equal(loss, expected)
    online, _ = OnlineTripletLoss(0.5, AllTripletSelector())(output.mean, labels)
    torch.testing.assert_close(loss, online)


@pytest.mark.parametrize("loss_class, selector", [(PairwiseAutoencoderLoss, HardNegativePairSelector()),
                                                  (TripletAutoencoderLoss, AllTripletSelector())])
@pytest.mark.parametrize("variational", [False, True])
def test_loss_at_m0_is_the_autoencoder_loss(loss_class, selector, variational):
    _, output, x = model_output(variational)
    loss = loss_class(0.0, 1.0, selector, beta=0.7)(output, x, labels_of())
    expected = F.mse_loss(output.reconstruction, x)
    if variational:
        expected = expected + 0.7 * (kl_to_standard_normal(output.mean, output.log_var).mean() / x[0].numel())
    assert torch.equal(loss, expected)
    bce = loss_class(0.0, 1.0, selector, beta=0.7, reconstruction="bce")(output, x, labels_of())
    expected = F.binary_cross_entropy_with_logits(output.reconstruction, x)
    if variational:
        expected = expected + 0.7 * (kl_to_standard_normal(output.mean, output.log_var).mean() / x[0].numel())
    assert torch.equal(bce, expected)


@pytest.mark.parametrize("weight", [0.25, 0.5, 0.9])
def test_loss_in_between_is_the_weighted_sum(weight):
    _, output, x = model_output(True)
    terms = TripletAutoencoderLoss(weight, 1.0, AllTripletSelector(), beta=2.0).terms(output, x, labels_of())
    metric = TripletAutoencoderLoss(1.0, 1.0, AllTripletSelector())(output, x, labels_of())
    autoencoder = TripletAutoencoderLoss(0.0, 1.0, AllTripletSelector(), beta=2.0)(output, x, labels_of())
    torch.testing.assert_close(terms["total"], weight * metric + (1 - weight) * autoencoder)
    assert torch.equal(terms["metric"], metric)
    assert terms["n_selected"] == len(AllTripletSelector().get_triplets(output.mean, labels_of()))


def test_kl_distance_uses_the_symmetrised_posterior_kl():
    _, output, x = model_output(True)
    labels = labels_of()
    pair_loss = PairwiseAutoencoderLoss(1.0, 3.0, AllPositivePairSelector(balance=False), distance="kl")
    positives, negatives = AllPositivePairSelector(balance=False).get_pairs(output.mean, labels)
    pairs = torch.cat([positives, negatives])
    target = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))])
    d = symmetric_gaussian_kl(output.mean[pairs[:, 0]], output.log_var[pairs[:, 0]],
                              output.mean[pairs[:, 1]], output.log_var[pairs[:, 1]])
    expected = (0.5 * (target * d + (1 - target) * F.relu(3.0 - (d + EPS).sqrt()).pow(2))).mean()
    torch.testing.assert_close(pair_loss(output, x, labels), expected)

    a, p, n = AllTripletSelector().get_triplets(output.mean, labels).unbind(1)
    d_ap = symmetric_gaussian_kl(output.mean[a], output.log_var[a], output.mean[p], output.log_var[p])
    d_an = symmetric_gaussian_kl(output.mean[a], output.log_var[a], output.mean[n], output.log_var[n])
    triplet_loss = TripletAutoencoderLoss(1.0, 3.0, AllTripletSelector(), distance="kl")
    torch.testing.assert_close(triplet_loss(output, x, labels), F.relu(d_ap - d_an + 3.0).mean())


@pytest.mark.parametrize("variational", [False, True])
def test_given_pairs_and_triplets(variational):
    torch.manual_seed(0)
    model = make_autoencoder((20,), 2, variational, hidden_dims=(16,))
    x1, x2, x3 = (batch((20,), n=5, seed=seed) for seed in range(3))
    target = torch.tensor([1, 0, 1, 0, 0])
    outputs = SiameseAutoencoder(model)(x1, x2)
    loss = PairwiseAutoencoderLoss(0.3, beta=0.5).on_pairs(*outputs, x1, x2, target)
    metric = ContrastiveLoss(1.0)(outputs[0].mean, outputs[1].mean, target)
    autoencoder = F.mse_loss(torch.cat([o.reconstruction for o in outputs]), torch.cat([x1, x2]))
    if variational:
        kl = kl_to_standard_normal(torch.cat([o.mean for o in outputs]), torch.cat([o.log_var for o in outputs]))
        autoencoder = autoencoder + 0.5 * kl.mean() / 20
    torch.testing.assert_close(loss, 0.3 * metric + 0.7 * autoencoder)

    outputs = TripletAutoencoder(model)(x1, x2, x3)
    loss = TripletAutoencoderLoss(1.0).on_triplets(*outputs, x1, x2, x3)
    assert torch.equal(loss, TripletLoss(1.0)(*(o.mean for o in outputs)))
    loss = TripletAutoencoderLoss(0.0, beta=0.0).on_triplets(*outputs, x1, x2, x3)
    assert torch.equal(loss, F.mse_loss(torch.cat([o.reconstruction for o in outputs]), torch.cat([x1, x2, x3])))


def test_metric_only_loss_leaves_the_decoder_untouched_and_empty_selections_backpropagate():
    model, output, x = model_output(True)
    PairwiseAutoencoderLoss(1.0, pair_selector=HardNegativePairSelector())(output, x, labels_of()).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.decoder.parameters())
    assert model.to_mean.weight.grad.abs().sum() > 0

    model, output, x = model_output(False)
    distinct = torch.arange(8)  # no positive pair, so no triplet and no (balanced) pair at all
    for loss in (PairwiseAutoencoderLoss(0.5, pair_selector=HardNegativePairSelector()),
                 TripletAutoencoderLoss(0.5, triplet_selector=AllTripletSelector())):
        terms = loss.terms(output, x, distinct)
        assert terms["metric"].item() == 0 and terms["n_selected"] == 0
        assert torch.equal(terms["total"], 0.5 * terms["metric"] + 0.5 * terms["reconstruction"])
        terms["total"].backward(retain_graph=True)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_loss_arguments_are_checked():
    _, ae_output, x = model_output(False)
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\]"):
        PairwiseAutoencoderLoss(1.5)
    with pytest.raises(TypeError, match="weight"):
        TripletAutoencoderLoss("0.5")
    with pytest.raises(TypeError, match="weight"):
        TripletAutoencoderLoss(True)
    with pytest.raises(ValueError, match="beta"):
        PairwiseAutoencoderLoss(0.5, beta=-1)
    with pytest.raises(ValueError, match="margin"):
        PairwiseAutoencoderLoss(0.5, margin=-1)
    with pytest.raises(ValueError, match="distance"):
        PairwiseAutoencoderLoss(0.5, distance="cosine")
    with pytest.raises(ValueError, match="reconstruction"):
        TripletAutoencoderLoss(0.5, reconstruction="l1")
    with pytest.raises(TypeError, match="get_pairs"):
        PairwiseAutoencoderLoss(0.5, pair_selector=AllTripletSelector())
    with pytest.raises(TypeError, match="get_triplets"):
        TripletAutoencoderLoss(0.5, triplet_selector=HardNegativePairSelector())
    with pytest.raises(ValueError, match="pair_selector"):
        PairwiseAutoencoderLoss(0.5)(ae_output, x, labels_of())
    with pytest.raises(ValueError, match="triplet_selector"):
        TripletAutoencoderLoss(0.5)(ae_output, x, labels_of())
    with pytest.raises(ValueError, match="VAE"):
        TripletAutoencoderLoss(0.5, triplet_selector=AllTripletSelector(), distance="kl")(ae_output, x, labels_of())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PairwiseAutoencoderLoss(0.5, pair_selector=HardNegativePairSelector(), reconstruction="bce")(
            ae_output, x * 2 - 1, labels_of())
    with pytest.raises(ValueError, match="reconstruction has shape"):
        PairwiseAutoencoderLoss(0.5, pair_selector=HardNegativePairSelector())(ae_output, x[:4], labels_of())
    with pytest.raises(ValueError, match="labels"):
        PairwiseAutoencoderLoss(0.5, pair_selector=HardNegativePairSelector())(ae_output, x, labels_of(5))
    with pytest.raises(TypeError, match="AutoencoderOutput"):
        PairwiseAutoencoderLoss(0.5, pair_selector=HardNegativePairSelector())(ae_output.mean, x, labels_of())
    with pytest.raises(ValueError, match="target"):
        PairwiseAutoencoderLoss(0.5).on_pairs(ae_output, ae_output, x, x, torch.ones(3))


# ---------------------------------------------------------------------------------------------------
# data


def test_the_old_import_paths_of_the_data_loaders_still_work():
    assert autoencoders.load_image_splits is known_datasets.load_image_splits
    assert autoencoders.load_cifar10 is known_datasets.load_cifar10
    assert autoencoders.read_cifar10 is known_datasets.read_cifar10



def test_labels_can_be_merged_and_named():
    labels = torch.tensor([0, 1, 2, 3, 2])
    merged = autoencoders.relabel(labels, {0: 0, 2: 0})
    assert merged.tolist() == [0, 1, 0, 3, 0]
    assert autoencoders.label_names(["a", "b", "c", "d"], merged, {0: 0, 2: 0}) == {0: "a+c", 1: "b", 3: "d"}
    assert autoencoders.label_names(["a", "b", "c", "d"], merged, {0: 0, 2: 0}, keys=["x", "y", "z", "w"]) == \
        {0: "x", 1: "y", 3: "w"}
    with pytest.raises(ValueError, match="keys"):
        autoencoders.label_names(["a"], merged, keys={0: "x"})
    with pytest.raises(TypeError, match="composite_labels"):
        autoencoders.relabel(labels, [0, 0])
    assert autoencoders.balanced_batch_shape(torch.arange(100) % 10, 64) == (10, 6)
    assert autoencoders.balanced_batch_shape(torch.arange(100) % 10, 8) == (4, 2)


# ---------------------------------------------------------------------------------------------------
# training: through trainer.fit, the library's one loop


def test_an_iteration_budget_is_whole_epochs_of_a_fixed_length():
    assert autoencoders.training_epochs(20000, 1000) == (20, 1000)
    assert autoencoders.training_epochs(200, 33) == (7, 33)  # 6 epochs of 33 batches and one of 2
    assert autoencoders.training_epochs(5, 33) == (1, 5)
    with pytest.raises(ValueError, match="num_iters"):
        autoencoders.training_epochs(0, 10)


def reference_training(model, loss_fn, inputs, labels, sampler, num_iters):
    """The plain loop: Adam steps on the sampler's batches, pass after pass, until num_iters."""
    optimizer = torch.optim.Adam(model.parameters(), lr=autoencoders.LEARNING_RATE)
    model.train()
    done = 0
    while done < num_iters:
        for batch in sampler:
            index = torch.as_tensor(batch)
            loss = loss_fn(model(inputs[index]), inputs[index], labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == num_iters:
                break


@pytest.mark.parametrize("num_iters", [2, 4, 9])  # a part of one pass; one pass and a part; three passes
@pytest.mark.parametrize("constraint", ["pairwise", "triplet"])
def test_train_model_is_the_plain_loop_through_fit(constraint, num_iters):
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(30, 6, generator=generator), torch.arange(30) % 3
    trained = []
    for train in (autoencoders.train_model, reference_training):
        torch.manual_seed(0)
        model = make_autoencoder((6,), 2, variational=True, hidden_dims=(8,))
        loss_fn = autoencoders.build_loss(constraint, 0.5, 1.0, 1.0, "euclidean", "mse",
                                          torch.Generator().manual_seed(1))
        sampler = datasets.BalancedBatchSampler(labels, 3, 3, seed=0)  # 3 batches a pass
        if train is reference_training:
            train(model, loss_fn, inputs, labels, sampler, num_iters)
        else:
            final = train(model, loss_fn, inputs, labels, sampler, num_iters, device="cpu", progress=False)
            assert final["num_iters"] == num_iters and set(final) == set(autoencoders.LOSS_TERMS) | {"num_iters"}
        trained.append(model.state_dict())
    for key in trained[0]:
        assert torch.equal(trained[0][key], trained[1][key]), key


def test_train_model_stops_on_a_non_finite_loss():
    inputs, labels = torch.randn(12, 4), torch.arange(12) % 2
    inputs[3] = float("nan")
    model = make_autoencoder((4,), 2, hidden_dims=(8,))
    loss_fn = autoencoders.build_loss("triplet", 0.5, 1.0, 1.0, "euclidean", "mse", None)
    with pytest.raises(FloatingPointError, match="loss"):
        autoencoders.train_model(model, loss_fn, inputs, labels, datasets.BalancedBatchSampler(labels, 2, 6, seed=0),
                                 3, device="cpu", progress=False)


# ---------------------------------------------------------------------------------------------------
# the experiment


RESULT_FIELDS = {"knn_accuracy", "precision_at_1", "r_precision", "map_at_r", "nmi", "roc_auc",
                 "reconstruction_mse", "final_total_loss", "train_seconds", "weight", "latent_dim"}


def test_run_experiment_end_to_end(tmp_path):
    write_idx_fixture(tmp_path / "data")
    results, images, runs = tmp_path / "results", tmp_path / "images", tmp_path / "runs"
    arguments = dict(num_iters=3, batch_size=16, root=tmp_path / "data", download=False, max_train=120,
                     max_test=60, progress=False, runs_dir=runs)
    rows = autoencoders.run_experiment("triplet", "vae", "fashion-mnist", [0, 1], [2, 3], results_dir=results,
                                       images_dir=images, **arguments)
    # other settings than the study's: the run's own folder, named by what it changed
    run = runs / "autoencoders-fashion-mnist" / "num-iters-3_batch-size-16_max-train-120_max-test-60"
    assert not results.exists() and not images.exists()
    assert [(row["latent_dim"], row["weight"]) for row in rows] == [(2, 0.0), (2, 1.0), (3, 0.0), (3, 1.0)]
    for row in rows:
        assert RESULT_FIELDS <= row.keys()
        assert row["features"] == "images" and row["n_train"] == 120 and row["batch_size"] == 16
        assert all(0 <= row[key] <= 1 for key in ("knn_accuracy", "map_at_r", "nmi", "roc_auc"))
        assert os.path.isfile(row["latent_plot"]) and os.path.isfile(row["reconstruction_plot"])
        assert row["latent_plot"].startswith(str(run / "images"))
    assert os.path.isfile(run / "images" / "fashion-mnist_triplet_vae_images_tradeoff.png")
    with open(run / "results" / "autoencoders-fashion-mnist.json") as file:
        assert json.load(file) == json.loads(json.dumps(rows))
    table = (run / "results" / "autoencoders-fashion-mnist.md").read_text()
    assert table.count("| triplet | vae | images |") == 4

    # a second sweep adds its rows; the same seed reproduces a model exactly
    again = autoencoders.run_experiment("pairwise", "embenc", "fashion-mnist", [0.5], [2], results_dir=results,
                                        images_dir=None, feature_extractor="pixels", **arguments)
    repeated = autoencoders.run_experiment("pairwise", "embenc", "fashion-mnist", [0.5], [2], results_dir=None,
                                           images_dir=None, feature_extractor="pixels", **arguments)
    assert {k: v for k, v in again[0].items() if k != "train_seconds"} == \
        {k: v for k, v in repeated[0].items() if k != "train_seconds"}
    with open(run / "results" / "autoencoders-fashion-mnist.json") as file:
        assert len(json.load(file)) == 5


def _digests(folder):
    """{path relative to folder: sha256} of every file under ``folder``."""
    digests = {}
    for current, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(current, name), "rb") as file:
                digests[os.path.relpath(os.path.join(current, name), folder)] = hashlib.sha256(file.read()).hexdigest()
    return digests


def test_a_run_with_other_settings_leaves_the_committed_sweep_alone(tmp_path, monkeypatch):
    # a checkout's committed results/ and images/ (copies; the checkout's own are compared too)
    for folder in ("results", "images"):
        shutil.copytree(os.path.join(REPOSITORY, folder), tmp_path / folder)
    before = {folder: _digests(tmp_path / folder) for folder in ("results", "images")}
    checkout = {folder: _digests(os.path.join(REPOSITORY, folder)) for folder in ("results", "images")}
    splits = [datasets.InMemoryDataset(torch.rand(n, 1, 28, 28), torch.arange(n) % 10, classes=list("abcdefghij"))
              for n in (80, 40)]
    monkeypatch.chdir(tmp_path)  # run_experiment's default folders: results/, images/, runs/
    rows = autoencoders.run_experiment("pairwise", "embenc", "fashion-mnist", [0, 0.25], [2], num_iters=60,
                                       feature_extractor="pixels", splits=splits, progress=False)
    assert {folder: _digests(tmp_path / folder) for folder in ("results", "images")} == before
    assert {folder: _digests(os.path.join(REPOSITORY, folder)) for folder in ("results", "images")} == checkout
    run = os.path.join("runs", "autoencoders-fashion-mnist", "num-iters-60")
    with open(os.path.join(run, "results", "autoencoders-fashion-mnist.json")) as file:
        assert json.load(file) == json.loads(json.dumps(rows)) and len(rows) == 2
    assert all(row["num_iters"] == 60 and row["latent_plot"].startswith(os.path.join(run, "images")) for row in rows)
    assert sorted(os.listdir(os.path.join(run, "images"))) == [
        "fashion-mnist_pairwise_embenc_pixels_M0.25_2d_latent.png",
        "fashion-mnist_pairwise_embenc_pixels_M0.25_2d_reconstructions.png",
        "fashion-mnist_pairwise_embenc_pixels_M0_2d_latent.png",
        "fashion-mnist_pairwise_embenc_pixels_M0_2d_reconstructions.png",
        "fashion-mnist_pairwise_embenc_pixels_tradeoff.png"]


def test_where_a_sweep_writes():
    study = os.path.join("images", "autoencoders")
    assert autoencoders.sweep_outputs("mnist") == ("results", study)
    assert autoencoders.sweep_outputs("mnist", **autoencoders.SWEEP_SETTINGS) == ("results", study)
    quick = os.path.join("runs", "autoencoders-mnist", "quick")  # a quick run: its own folder, as every other run
    assert autoencoders.sweep_outputs("mnist", quick=True, num_iters=3) == (
        os.path.join(quick, "results"), os.path.join(quick, "images"))
    assert autoencoders.sweep_tag(quick=True, num_iters=3, seed=2) == "quick"  # whatever its settings
    run = os.path.join("runs", "autoencoders-mnist", "num-iters-60_batch-size-32_seed-1")
    assert autoencoders.sweep_outputs("mnist", num_iters=60, batch_size=32, seed=1) == (
        os.path.join(run, "results"), os.path.join(run, "images"))
    assert autoencoders.sweep_outputs("mnist", False, None, "images", "elsewhere", margin=0.5) == (
        None, os.path.join("elsewhere", "autoencoders-mnist", "margin-0.5", "images"))
    assert autoencoders.sweep_tag(learning_rate=0.01, normalize=False) == "normalize-False_learning-rate-0.01"
    assert re.fullmatch(r"hidden-dims-[0-9a-f]{8}", autoencoders.sweep_tag(hidden_dims=(64,)))
    labels = autoencoders.sweep_tag(composite_labels={0: 0, 2: 0})
    assert re.fullmatch(r"composite-labels-[0-9a-f]{8}", labels)
    assert labels != autoencoders.sweep_tag(composite_labels={0: 1})
    assert autoencoders.sweep_tag(feature_params={"weights": None}) == ""  # the extractor's defaults
    for quick in (False, True):
        with pytest.raises(ValueError, match=r"unknown settings \['iters'\]"):
            autoencoders.sweep_tag(quick, iters=3)


def test_rows_are_keyed_by_every_setting_that_defines_them(tmp_path):
    with open(os.path.join(REPOSITORY, "results", "autoencoders-fashion-mnist.json")) as file:
        committed = json.load(file)
    shutil.copy(os.path.join(REPOSITORY, "results", "autoencoders-fashion-mnist.json"), tmp_path)
    first = committed[0]
    for field, value in (("num_iters", 60), ("batch_size", 16), ("seed", 1), ("n_train", 120), ("quick", True),
                         ("margin", 0.5)):
        autoencoders.record_results([dict(first, **{field: value})], "fashion-mnist", tmp_path)
    rows = autoencoders.record_results([dict(first, knn_accuracy=0.5)], "fashion-mnist", tmp_path)
    assert len(rows) == len(committed) + 6  # other settings add rows; the same settings replace their row
    assert [row for row in rows if row["knn_accuracy"] == 0.5] == [dict(first, knn_accuracy=0.5)]


def test_run_experiment_with_features_and_merged_classes(tmp_path):
    write_idx_fixture(tmp_path / "data")
    rows = autoencoders.run_experiment(
        "pairwise", "vae", "fashion-mnist", [0.5], [2], num_iters=3, batch_size=8, root=tmp_path / "data",
        download=False, max_train=60, max_test=40, feature_extractor="hog", distance="kl",
        composite_labels={k: k % 2 for k in range(10)}, keys=["even", "odd"], results_dir=None,
        images_dir=tmp_path / "images", runs_dir=tmp_path / "runs", progress=False)
    assert rows[0]["features"] == "hog" and rows[0]["distance"] == "kl"
    assert rows[0]["reconstruction_plot"] is None  # HOG features are not images
    assert json.loads(rows[0]["composite_labels"])["3"] == 1
    assert os.listdir(tmp_path / "data" / "feature-cache" / "fashion-mnist")


def test_run_experiment_on_cifar10_and_an_image_folder(tmp_path):
    write_cifar_fixture(tmp_path / "cifar")
    rows = autoencoders.run_experiment("triplet", "embenc", "cifar10", [0.5], [2], num_iters=2, batch_size=8,
                                       root=tmp_path / "cifar", download=False, max_train=60, results_dir=None,
                                       images_dir=tmp_path / "images", runs_dir=tmp_path / "runs", progress=False)
    assert rows[0]["n_train"] == 60 and rows[0]["n_test"] == 30
    assert os.path.isfile(rows[0]["reconstruction_plot"])

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("cat", "dog", "fox"):
            folder = tmp_path / "folder" / "imagenet" / split / name
            folder.mkdir(parents=True)
            for item in range(4):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{item}.png")
    train, test = known_datasets.load_image_splits("imagenet", tmp_path / "folder")
    assert train.classes == ["cat", "dog", "fox"] and len(test.targets) == 12
    assert train.data.shape == (12, 3, 32, 32) and 0 <= train.data.min() and train.data.max() <= 1
    rows = autoencoders.run_experiment("pairwise", "embenc", "imagenet", [1.0], [2], num_iters=2, batch_size=6,
                                       root=tmp_path / "folder", feature_extractor="pixels", results_dir=None,
                                       images_dir=None, progress=False)
    assert rows[0]["n_train"] == 12


def test_run_experiment_arguments_are_checked(tmp_path):
    arguments = ("fashion-mnist", [0.5], [2])
    with pytest.raises(ValueError, match="constraint_type"):
        autoencoders.run_experiment("quadruplet", "vae", *arguments)
    with pytest.raises(ValueError, match="encoder_type"):
        autoencoders.run_experiment("pairwise", "gan", *arguments)
    with pytest.raises(ValueError, match="VAE posteriors"):
        autoencoders.run_experiment("pairwise", "embenc", *arguments, distance="kl")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        autoencoders.run_experiment("pairwise", "vae", "fashion-mnist", [0.5, 2], [2])
    with pytest.raises(ValueError, match="normalize=False"):
        autoencoders.run_experiment("pairwise", "vae", *arguments, reconstruction="bce")
    with pytest.raises(ValueError, match="feature_extractor"):
        autoencoders.run_experiment("pairwise", "vae", *arguments, feature_extractor="sift")
    with pytest.raises(ValueError, match="dataset"):
        autoencoders.run_experiment("pairwise", "vae", "svhn", [0.5], [2])
    with pytest.raises(FileNotFoundError, match="ImageNet"):
        autoencoders.run_experiment("pairwise", "vae", "imagenet", [0.5], [2], root=tmp_path)


def test_command_line_quick_run(tmp_path, monkeypatch, capsys):
    write_idx_fixture(tmp_path / "data", train_per_class=10, test_per_class=5)
    monkeypatch.chdir(tmp_path)
    rows = autoencoders.main(["--dataset", "mnist", "--constraint", "pairwise", "--encoder", "embenc,vae",
                              "--weights", "0,1", "--iters", "2", "--batch-size", "8", "--root", "data",
                              "--no-download", "--quick", "--no-progress"])
    assert [(row["encoder"], row["weight"]) for row in rows] == [("embenc", 0.0), ("embenc", 1.0), ("vae", 0.0),
                                                                 ("vae", 1.0)]
    assert all(row["quick"] and row["num_iters"] == 2 for row in rows)
    quick = tmp_path / "runs" / "autoencoders-mnist" / "quick"  # as every other run's (results.output_dirs)
    assert (quick / "results" / "autoencoders-mnist.md").is_file()
    assert (quick / "images" / "mnist_tradeoff.png").is_file()  # all four models
    assert sorted(os.listdir(tmp_path)) == ["data", "runs"]  # not the checkout's results/ and images/
    assert "| pairwise | vae | images | 1 | 2 |" in capsys.readouterr().out


def _command_line(arguments, cwd):
    """``python autoencoders.py ARGUMENTS`` in a fresh interpreter: (exit status, stdout, stderr)."""
    completed = subprocess.run([sys.executable, os.path.join(REPOSITORY, "autoencoders.py"), *map(str, arguments)],
                               cwd=cwd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return completed.returncode, completed.stdout, completed.stderr


def test_a_user_mistake_on_the_command_line_is_one_line_and_status_2(tmp_path):
    write_idx_fixture(tmp_path / "data", train_per_class=4, test_per_class=2)
    usual = ["--dataset", "mnist", "--root", "data", "--no-download", "--quick", "--no-progress"]
    mistakes = {("--iters", "-3"): "--iters must be >= 1, got -3",
                ("--iters", "x"): "argument --iters: invalid int value: 'x'",
                ("--batch-size", "2"): "--batch-size must be >= 4",
                ("--weights", "0,2"): "every weight must be in [0, 1]",
                ("--weights", "a"): "--weights: expected a comma-separated list",
                ("--latent-dims", "0"): "every --latent-dims size must be >= 1",
                ("--constraint", "quadruplet"): "unknown --constraint 'quadruplet'",
                ("--encoder", ","): "--constraint, --encoder and --latent-dims each need at least one value",
                ("--composite-labels", "x"): "--composite-labels: expected old:new pairs",
                ("--dataset", "svhn"): "argument --dataset: invalid choice: 'svhn'",
                ("--margin2", "1"): "unrecognized arguments: --margin2 1",
                ("--device", "nonsense"): "unknown device 'nonsense'",
                ("--root", "nowhere"): "MNIST (train split) not found"}
    outcomes = command_lines(os.path.join(REPOSITORY, "autoencoders.py"), [[*usual, *arguments] for arguments in mistakes],
                             tmp_path)
    for (arguments, message), (status, stdout, stderr) in zip(mistakes.items(), outcomes):
        assert status == 2 and "Traceback" not in stderr, (arguments, stderr)
        assert len(stderr.splitlines()) == 1 and stderr.startswith("autoencoders.py: error: "), (arguments, stderr)
        assert message in stderr, (arguments, stderr)
    assert sorted(os.listdir(tmp_path)) == ["data"]  # refused before anything is written
    status, stdout, stderr = _command_line([*usual, "--constraint", "pairwise", "--encoder", "embenc", "--weights", "1",
                                            "--iters", "2", "--batch-size", "8"], tmp_path)
    assert status == 0, stderr
    assert "Results in runs/autoencoders-mnist/quick/results/autoencoders-mnist.md, plots in " \
        "runs/autoencoders-mnist/quick/images/." in stdout
