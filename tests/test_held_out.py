"""held_out.py, and its scenario through experiments.py end to end: held-out classes (--train-classes) on the
IDX fixture, the model trained on some classes and one-shot learning measured on the others. (Omniglot's
study and command line: tests/test_omniglot.py.)"""

import pytest
import torch

import datasets
import experiments
import metrics
from datasets import InMemoryDataset
from episodes import few_shot_accuracy
from fixtures import write_idx_fixture
from held_out import HELD_OUT_EPISODES, parse_classes


@pytest.mark.parametrize("spec, expected", [("0-4", [0, 1, 2, 3, 4]), ("0,1,2,3,4", [0, 1, 2, 3, 4]),
                                            ("7, 0-2", [0, 1, 2, 7]), ("3", [3]), ([5, 1, 1], [1, 5])])
def test_parse_classes(spec, expected):
    assert parse_classes(spec, 10) == expected


@pytest.mark.parametrize("spec, message", [("0-10", "ids in 0..9"), ("a-b", "cannot read"), ("", "ids in 0..9"),
                                           ("0-8", "leave at least 2"), ("-1", "cannot read")])
def test_parse_classes_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_classes(spec, 10)


def test_class_subset_relabels_in_the_given_order():
    dataset = InMemoryDataset(torch.arange(12.0).view(12, 1, 1, 1), torch.arange(12) % 4,
                              classes=["a", "b", "c", "d"])
    subset = datasets.class_subset(dataset, [3, 1])
    assert subset.classes == ["d", "b"]
    assert subset.targets.tolist() == [1, 0, 1, 0, 1, 0]
    assert subset.data.flatten().tolist() == [1, 3, 5, 7, 9, 11]


def test_held_out_run_on_the_idx_fixture(tmp_path, monkeypatch):
    write_idx_fixture(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    scored = []  # what run_method hands to evaluate_held_out: the trained model and the held-out set
    evaluate_held_out = experiments.evaluate_held_out
    monkeypatch.setattr(experiments, "evaluate_held_out",
                        lambda model, held_out, seed: scored.append((model, held_out)) or
                        evaluate_held_out(model, held_out, seed))
    row = experiments.run_method("fashion-mnist", "online-triplet", quick=True, root=str(tmp_path / "data"),
                                 train_classes="0-4", progress=False, seed=3)
    assert row["train_classes"] == "0-4" and row["held_out_n_way"] == 5
    (model, held_out), = scored
    # the held-out set is every test image of classes 5-9, and nothing the model trained on
    _, test_set = experiments.load_splits("fashion-mnist", str(tmp_path / "data"), quick=True)
    assert held_out.classes == test_set.classes[5:] and len(held_out) == int((test_set.targets >= 5).sum())
    # the row's numbers are those of the trained model's embeddings of those images
    embeddings = model.get_embedding(held_out.data).detach()
    episodes = few_shot_accuracy(embeddings, held_out.targets, 5, 1, HELD_OUT_EPISODES,
                                             seed=3)
    assert row["held_out_one_shot"] == pytest.approx(episodes["accuracy"], abs=1e-6)
    assert row["held_out_one_shot_ci95"] == pytest.approx(episodes["ci95"], abs=1e-6)
    assert row["held_out_roc_auc"] == pytest.approx(
        metrics.verification_roc_auc(embeddings, held_out.targets, seed=3), abs=1e-6)
    assert row["held_out_map_at_r"] == pytest.approx(
        metrics.retrieval_metrics(embeddings, held_out.targets)["map_at_r"], abs=1e-6)
    assert 0.2 < row["held_out_one_shot"] < 1  # above 5-way chance, not a constant
    quick = tmp_path / "runs" / "fashion-mnist" / "quick"  # a quick run's own folder (results.output_dirs)
    table = (quick / "results" / "train-classes-0-4" / "fashion-mnist.md").read_text()
    assert "| held-out 1-shot acc |" in table
    assert (quick / "images" / "train-classes-0-4").is_dir()
    assert not (quick / "results" / "fashion-mnist.md").exists()  # the usual table is untouched
    plain = {"method": "x", "embedding_dim": 2}
    assert "held-out" not in experiments.results_table([plain])


def test_held_out_baselines_score_pixels_and_the_untrained_network(tmp_path):
    write_idx_fixture(tmp_path / "data")
    train_set, test_set = experiments.load_splits("fashion-mnist", str(tmp_path / "data"), quick=True)
    rows = experiments.held_out_baselines("fashion-mnist", train_set, test_set, "0-4", embedding_dim=3, seed=1,
                                          results_dir=str(tmp_path / "results"))
    pixels, untrained = rows
    assert (pixels["method"], pixels["embedding_dim"]) == ("pixels", 28 * 28)
    assert (untrained["method"], untrained["embedding_dim"], untrained["epochs"]) == ("untrained network", 3, 0)
    _, held_out, _ = experiments.held_out_splits(train_set, test_set, "0-4")
    images = torch.stack([held_out[i][0] for i in range(len(held_out))]).flatten(1)
    direct = few_shot_accuracy(images, held_out.targets, 5, 1, HELD_OUT_EPISODES, seed=1)
    assert pixels["held_out_one_shot"] == pytest.approx(direct["accuracy"])
    torch.manual_seed(1)  # the network run_method(seed=1) would start training from
    start = experiments.EmbeddingNet(3)
    assert untrained["held_out_one_shot"] == pytest.approx(
        experiments.evaluate_held_out(start, held_out, seed=1)["held_out_one_shot"])
    table = (tmp_path / "results" / "train-classes-0-4" / "fashion-mnist.md").read_text()
    assert "| pixels | 784 |" in table and "| untrained network | 3 |" in table


def test_command_line_held_out_run_adds_the_baselines(tmp_path, monkeypatch):
    write_idx_fixture(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    rows = experiments.main(["--quick", "--methods", "online-contrastive", "--train-classes", "0-4",
                             "--root", str(tmp_path / "data"), "--no-progress"])
    assert [row["method"] for row in rows] == ["online-contrastive", "pixels", "untrained network"]
    quick = tmp_path / "runs" / "fashion-mnist" / "quick"  # a quick run's own folder (results.output_dirs)
    table = (quick / "results" / "train-classes-0-4" / "fashion-mnist.md").read_text()
    assert "| online-contrastive | 2 |" in table and "| pixels | 784 |" in table


def test_held_out_splits_never_train_on_held_out_classes(tmp_path):
    write_idx_fixture(tmp_path)
    train_set, test_set = experiments.load_splits("fashion-mnist", str(tmp_path), quick=True)
    (seen_train, seen_test), held_out, tag = experiments.held_out_splits(train_set, test_set, "0,1,2,3,4")
    assert tag == "0-4" and seen_train.classes == train_set.classes[:5] and held_out.classes == train_set.classes[5:]
    assert len(seen_train) == int((train_set.targets < 5).sum()) and set(seen_train.targets.tolist()) == set(range(5))
    assert len(held_out) == int((test_set.targets >= 5).sum())
    assert experiments.held_out_splits(train_set, test_set, "0,2,4")[2] == "0,2,4"
