"""End to end: online triplet training of EmbeddingNet with BalancedBatchSampler,
OnlineTripletLoss and trainer.fit on a small synthetic image set learns an embedding that k-NN
classifies held-out images with, and a resumed run reproduces an uninterrupted one exactly."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from datasets import BalancedBatchSampler, InMemoryDataset
from losses import OnlineTripletLoss
from metrics import AverageNonzeroTripletsMetric, extract_embeddings, knn_accuracy
from networks import EmbeddingNet
from trainer import fit
from utils import RandomNegativeTripletSelector

N_CLASSES = 5
MARGIN = 1.0
N_EPOCHS = 4


def synthetic_images(n_per_class, generator):
    """(n_per_class * N_CLASSES) 28x28 images: each class is a fixed random 7x7 block pattern
    upscaled to 28x28 with values +-1, plus unit Gaussian noise per pixel."""
    patterns = torch.rand(N_CLASSES, 1, 7, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    patterns = F.interpolate(patterns.float(), size=28, mode="nearest") * 2 - 1
    labels = torch.arange(N_CLASSES).repeat_interleave(n_per_class)
    images = patterns[labels] + torch.randn(len(labels), 1, 28, 28, generator=generator)
    return InMemoryDataset(images, labels)


@pytest.fixture(scope="module")
def splits():
    generator = torch.Generator().manual_seed(1)
    return synthetic_images(40, generator), synthetic_images(20, generator)


def build(train_set, model_seed):
    torch.manual_seed(model_seed)
    model = EmbeddingNet(embedding_dim=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.1)
    # 5 classes x 8 images = 40 per batch, 5 batches per epoch, order seeded per epoch
    sampler = BalancedBatchSampler(train_set.targets, n_classes=N_CLASSES, n_samples=8, seed=0)
    loader = DataLoader(train_set, batch_sampler=sampler)
    return model, optimizer, scheduler, loader


def train(train_set, model, optimizer, scheduler, loader, n_epochs, **kwargs):
    loss_fn = OnlineTripletLoss(MARGIN, RandomNegativeTripletSelector(MARGIN))
    return fit(loader, None, model, loss_fn, optimizer, scheduler, n_epochs,
               metrics=[AverageNonzeroTripletsMetric()], progress=False, **kwargs)


def held_out_knn_accuracy(model, train_set, test_set):
    gallery, gallery_labels = extract_embeddings(DataLoader(train_set, batch_size=100), model)
    queries, query_labels = extract_embeddings(DataLoader(test_set, batch_size=100), model)
    return knn_accuracy(queries, query_labels, gallery, gallery_labels, k=5)


@pytest.fixture(scope="module")
def straight_run(splits):
    train_set, test_set = splits
    model, optimizer, scheduler, loader = build(train_set, model_seed=0)
    untrained_accuracy = held_out_knn_accuracy(model, train_set, test_set)
    torch.manual_seed(1)  # the triplet selector draws from the global RNG
    history = train(train_set, model, optimizer, scheduler, loader, N_EPOCHS)
    return model, optimizer, history, untrained_accuracy


def test_online_triplet_training_learns_a_knn_separable_embedding(splits, straight_run):
    train_set, test_set = splits
    model, _, history, untrained_accuracy = straight_run
    assert history["epoch"] == list(range(1, N_EPOCHS + 1))
    assert history["train_loss"][-1] < history["train_loss"][0]
    nonzero_triplets = history["train_average_nonzero_triplets"]
    assert nonzero_triplets[-1] < 0.25 * nonzero_triplets[0]
    trained_accuracy = held_out_knn_accuracy(model, train_set, test_set)
    chance = 1 / N_CLASSES
    assert trained_accuracy >= chance + 0.6
    assert trained_accuracy >= untrained_accuracy + 0.3


def test_resumed_training_matches_the_uninterrupted_run(splits, straight_run, tmp_path):
    train_set, _ = splits
    straight_model, straight_optimizer, straight_history, _ = straight_run

    model, optimizer, scheduler, loader = build(train_set, model_seed=0)
    torch.manual_seed(1)
    train(train_set, model, optimizer, scheduler, loader, N_EPOCHS // 2, checkpoint_dir=tmp_path)

    # A new process would start from fresh objects and an unrelated RNG state.
    model, optimizer, scheduler, loader = build(train_set, model_seed=123)
    torch.rand(11)
    history = train(train_set, model, optimizer, scheduler, loader, N_EPOCHS,
                    checkpoint_dir=tmp_path, resume=True)

    for (name, parameter), straight_parameter in zip(model.named_parameters(),
                                                     straight_model.parameters()):
        assert torch.equal(parameter, straight_parameter), name
    assert optimizer.state_dict()["param_groups"] == straight_optimizer.state_dict()["param_groups"]
    for key in history:
        if key != "seconds":
            assert history[key] == straight_history[key], key
