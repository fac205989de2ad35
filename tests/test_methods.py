"""methods.py: each method of the study put together by name (build_training, build_method), with its
recipe (Recipe, RECIPES, CLASSIC_RECIPES) reaching every loss, selector, network, batch shape and
cross-batch memory; the memory's settings recorded only when there is one, so earlier rows and run folders
keep matching."""

import json
import os

import pytest
import torch
from torch import nn

import experiments
import methods
from cross_batch_memory import CrossBatchMemory
from fixtures import write_idx_fixture
from losses import MultiSimilarityLoss
from networks import EmbeddingNet, SiameseNetwork

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """(train, test) quick splits of the IDX fixture (25 items per class and split)."""
    root = tmp_path_factory.mktemp("methods-data")
    write_idx_fixture(root, 25, 25)
    return experiments.load_splits("mnist", root, quick=True)


@pytest.mark.parametrize("method", ["siamese", "triplet", "online-contrastive", "online-triplet"])
def test_a_recipe_reaches_every_loss_selector_and_the_network(splits, method):
    model, loss_fn = methods.build_training(method, *splits, selector="batch-hard",
                                                recipe=methods.Recipe(0.0, True, "euclidean", True))[:2]
    embedding_net = getattr(model, "embedding_net", model)
    assert embedding_net.config()["batch_norm"] is True
    assert loss_fn.distance == "euclidean" and loss_fn.margin == 0.0
    if method in ("triplet", "online-triplet"):
        assert loss_fn.soft is True
    if method == "online-triplet":
        assert loss_fn.triplet_selector.distance == "euclidean"
    classic = methods.build_training(method, *splits, selector="batch-hard")[1]
    assert classic.distance == "squared" and classic.margin == methods.MARGIN


def test_a_recipe_sets_the_images_per_class_of_the_online_batches_and_says_so_only_when_not_classic(splits):
    fewer = methods.CLASSIC._replace(batch_norm=True, easy_selector="random-hard", batch_samples=4)
    for method in ("online-contrastive", "online-triplet"):
        for recipe, samples in ((fewer, 4), (methods.CLASSIC, methods.BALANCED_BATCH[1])):
            train_loader, val_loader = methods.build_training(method, *splits, selector="semi-hard",
                                                                  recipe=recipe)[2:4]
            for loader in (train_loader, val_loader):
                assert (loader.batch_sampler.n_classes, loader.batch_sampler.n_samples) == (
                    methods.BALANCED_BATCH[0], samples)
    assert methods.recipe_label(fewer) == "BN, 4 images per class, + random-hard"
    assert methods.recipe_tag("online-triplet/semi-hard", fewer) == "bn-4-images-per-class-random-hard"
    settings = experiments.method_settings("mnist", "online-triplet/semi-hard", 2, 20, 0, recipe=fewer)
    assert settings["batch_samples"] == 4
    # recipes recorded before the batch shape was part of them still match their run folders
    assert "batch_samples" not in experiments.method_settings("mnist", "online-triplet/semi-hard", 2, 20, 0)
    assert methods.Recipe(**{field: settings[field] for field in methods.Recipe._fields
                             if field not in methods.LATER_RECIPE_FIELDS}).batch_samples == methods.BALANCED_BATCH[1]


@pytest.mark.parametrize("label", sorted(methods.RECIPES))
def test_each_method_trains_with_its_recipe_unless_told_otherwise(splits, label):
    method, _, selector = label.partition("/")
    recipe = methods.RECIPES[label]
    for asked, expected in ((None, recipe), ("classic", methods.CLASSIC_RECIPES.get(label, methods.CLASSIC)),
                            (methods.CLASSIC, methods.CLASSIC)):
        model, loss_fn, train_loader = methods.build_training(method, *splits, selector=selector or "random-hard",
                                                              recipe=asked)[:3]
        assert model.config().get("batch_norm", False) == expected.batch_norm
        assert model.config().get("normalize", False) == expected.normalize
        assert train_loader.batch_sampler.n_samples == expected.batch_samples
        if method == "online-triplet":
            assert (loss_fn.margin, loss_fn.soft, loss_fn.distance) == (expected.margin, expected.soft,
                                                                        expected.distance)
            easy = type(loss_fn.easy_selector).__name__ if loss_fn.easy_selector is not None else None
            assert easy == {None: None, "random-hard": "FunctionNegativeTripletSelector"}[expected.easy_selector]
        assert experiments.method_run_dir("c", "d", label, recipe=asked).endswith(
            "" if expected == recipe else "_" + methods.recipe_tag(label, asked))
    with pytest.raises(ValueError, match="recipe"):
        methods.method_recipe(label, "tuned")


def test_multi_similarity_mines_the_balanced_batches_with_its_loss(splits):
    model, loss_fn, train_loader, val_loader, metrics = methods.build_training("multi-similarity", *splits)[:5]
    assert isinstance(model, EmbeddingNet) and isinstance(loss_fn, MultiSimilarityLoss) and loss_fn.memory is None
    assert (loss_fn.alpha, loss_fn.beta, loss_fn.base, loss_fn.epsilon) == (2.0, 50.0, 0.5, 0.1)  # its defaults
    for loader in (train_loader, val_loader):
        assert (loader.batch_sampler.n_classes, loader.batch_sampler.n_samples) == methods.BALANCED_BATCH
    assert metrics == []  # no triplet count; trainer.fit reports its active pairs from last_selection
    assert methods.method_recipe(methods.method_label("multi-similarity")) == methods.Recipe(normalize=True)
    assert model.normalize and not methods.build_training("multi-similarity", *splits, recipe="classic")[0].normalize


@pytest.mark.parametrize("method", methods.ONLINE_METHODS)
def test_a_recipe_with_a_memory_gives_the_online_loss_one_of_its_size_and_warm_up(splits, method):
    recipe = methods.CLASSIC._replace(memory=512, memory_warmup=3)
    loss_fn = methods.build_training(method, *splits, embedding_dim=16, recipe=recipe)[1]
    memory = loss_fn.memory
    assert isinstance(memory, CrossBatchMemory)
    assert (memory.size, memory.embedding_dim, memory.warmup, int(memory.filled)) == (512, 16, 3, 0)
    default = methods.build_training(method, *splits, recipe=methods.CLASSIC._replace(memory=64))[1].memory
    assert (default.size, default.embedding_dim, default.warmup) == (64, 2, methods.MEMORY_WARMUP)
    assert methods.build_training(method, *splits)[1].memory is None


def test_the_memory_takes_the_embedding_size_of_every_study_network(splits):
    train_set = splits[0]
    for network in (methods.build_embedding_net("resnet18", 12, train_set)[0], SiameseNetwork(28, 6, channels=4)):
        loss_fn = methods.build_method("online-triplet", network, train_set, memory=100, memory_warmup=0)[1]
        memory = loss_fn.memory
        assert (memory.size, memory.embedding_dim, memory.warmup) == (100, network.embedding_dim, 0)
    unsized = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 4))
    with pytest.raises(ValueError, match="Sequential has no embedding_dim.*--memory"):
        methods.build_method("online-contrastive", unsized, train_set, memory=100)
    assert methods.build_method("online-contrastive", unsized, train_set)[1].memory is None  # no memory: no size


@pytest.mark.parametrize("method", ["softmax", "siamese", "triplet"])
def test_a_method_that_mines_no_batch_refuses_a_memory(splits, method):
    with pytest.raises(ValueError, match=f"needs an online method .*; {method} mines no batch.*--memory"):
        methods.build_training(method, *splits, recipe=methods.CLASSIC._replace(memory=512))
    with pytest.raises(ValueError, match=f"; {method} mines no batch"):
        methods.check_memory(method, 1)
    assert methods.check_memory(method, 0) == 0


def test_the_memory_settings_are_checked():
    for memory, warmup, message in ((-1, 0, "memory must be"), (8, -1, "memory_warmup must be"),
                                    (0, 5, r"warm-up of a cross-batch memory: give its size too \(--memory M\)")):
        with pytest.raises(ValueError, match=message):
            methods.check_memory("online-triplet", memory, warmup)
    with pytest.raises(TypeError, match="memory must be an int"):
        methods.check_memory("online-triplet", 1.5)
    assert methods.check_memory("multi-similarity", 8, 0) == 8


def test_a_recipe_says_its_memory_and_records_it_only_when_there_is_one():
    memory = methods.CLASSIC._replace(memory=4096)
    assert methods.recipe_label(memory) == "memory 4096"
    assert methods.recipe_label(memory._replace(memory_warmup=0, batch_norm=True)) == "BN, memory 4096, warm-up 0"
    assert methods.recipe_tag("online-contrastive", memory._replace(memory_warmup=0)) == "memory-4096-warm-up-0"
    label = "online-triplet/random-hard"
    settings = experiments.method_settings("mnist", label, 64, 20, 0, recipe=memory)
    assert (settings["memory"], "memory_warmup" in settings) == (4096, False)
    assert experiments.method_settings("mnist", label, 64, 20, 0, recipe=memory._replace(memory_warmup=7))[
        "memory_warmup"] == 7
    # settings without a memory are those recorded before it existed, so every earlier run folder still resumes
    for recipe in (None, "classic", methods.CLASSIC._replace(batch_norm=True)):
        for method in ("online-contrastive", label, "online-triplet/semi-hard"):
            assert not {"memory", "memory_warmup"} & experiments.method_settings("mnist", method, 2, 20, 0,
                                                                                 recipe=recipe).keys()
    row_fields = {field: settings[field] for field in methods.Recipe._fields if field in settings}
    assert methods.Recipe(**row_fields) == memory  # what finish_run labels the row with


def test_a_recipe_with_normalize_trains_unit_norm_embeddings_and_records_it_only_when_on(splits):
    recipe = methods.CLASSIC._replace(normalize=True)
    assert methods.recipe_label(recipe) == "L2"
    assert methods.recipe_label(recipe._replace(batch_norm=True, memory=64)) == "BN, L2, memory 64"
    assert methods.recipe_tag("online-contrastive", recipe) == "l2"
    assert methods.recipe_tag("multi-similarity", recipe) == ""  # its study recipe (RECIPES)
    assert experiments.method_settings("mnist", "multi-similarity", 64, 20, 0, recipe=recipe)["normalize"] is True
    for other in (None, "classic", methods.CLASSIC._replace(batch_norm=True)):  # earlier run folders still match
        assert "normalize" not in experiments.method_settings("mnist", "online-contrastive", 64, 20, 0, recipe=other)
    assert "normalize" not in experiments.method_settings("mnist", "multi-similarity", 64, 20, 0, recipe="classic")
    for method in ("siamese", "online-contrastive", "multi-similarity"):
        model = methods.build_training(method, *splits, embedding_dim=8, recipe=recipe)[0]
        embedding_net = getattr(model, "embedding_net", model)
        assert embedding_net.normalize and embedding_net.config()["normalize"] is True
        images = splits[0].data[:6].float()
        torch.testing.assert_close(embedding_net(images).norm(dim=1), torch.ones(6))
    assert not methods.build_training("online-contrastive", *splits)[0].normalize
    with pytest.raises(ValueError, match="--normalize is an option of the classic network"):
        methods.build_embedding_net("resnet18", 8, splits[0], normalize=True)


@pytest.mark.parametrize("table", ["fashion-mnist.json", "fashion-mnist-recipes.json"])
def test_the_committed_rows_keep_their_recipe_labels(table):
    with open(os.path.join(REPOSITORY, "results", table)) as file:
        rows = json.load(file)
    assert rows
    for row in rows:
        if not row.get("memory"):  # the memory's fields are recorded only for a run that used one
            assert "memory" not in row and "memory_warmup" not in row, row["method"]
        recipe = methods.Recipe(**{field: row[field] for field in methods.Recipe._fields if field in row})
        assert methods.recipe_label(recipe) == row["recipe"], row["method"]
