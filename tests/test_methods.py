"""methods.py: each method of the study put together by name (build_training, build_method), with its
recipe (Recipe, RECIPES, CLASSIC_RECIPES) reaching every loss, selector, network and batch shape."""

import pytest

import experiments
import methods
from fixtures import write_idx_fixture


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
def test_each_selector_trains_with_its_recipe_unless_told_otherwise(splits, label):
    method, selector = label.split("/")
    recipe = methods.RECIPES[label]
    for asked, expected in ((None, recipe), ("classic", methods.CLASSIC_RECIPES.get(label, methods.CLASSIC)),
                            (methods.CLASSIC, methods.CLASSIC)):
        model, loss_fn, train_loader = methods.build_training(method, *splits, selector=selector, recipe=asked)[:3]
        assert model.config().get("batch_norm", False) == expected.batch_norm
        assert train_loader.batch_sampler.n_samples == expected.batch_samples
        assert (loss_fn.margin, loss_fn.soft, loss_fn.distance) == (expected.margin, expected.soft, expected.distance)
        easy = type(loss_fn.easy_selector).__name__ if loss_fn.easy_selector is not None else None
        assert easy == {None: None, "random-hard": "FunctionNegativeTripletSelector"}[expected.easy_selector]
        assert experiments.method_run_dir("c", "d", label, recipe=asked).endswith(
            "" if expected == recipe else "_" + methods.recipe_tag(label, asked))
    with pytest.raises(ValueError, match="recipe"):
        methods.method_recipe(label, "tuned")
