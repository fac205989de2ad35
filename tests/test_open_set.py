"""Tests of open_set.py and of search.py's calibrate and --precision: the curve against a brute-force loop over
thresholds (tests/reference.py), the threshold rule, the precision reached on a fresh sample of synthetic
Gaussian classes (some absent from the gallery) within a binomial bound, the rejection of unseen classes,
the gallery file's calibration keys, the command line end to end on a tiny folder, and every error path."""

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cli
import open_set
import search
from image_folders import read_image
from model_file import embed_images, load_model
from reference import ref_precision_recall_curve
from test_search import CLASSES, SIZE, _draw, _run, _save_model

# ---------------------------------------------------------------- the curve and the thresholds

CLASS_NAMES = ["a", "b", "c", "d"]


@given(st.lists(st.tuples(st.integers(0, 6), st.sampled_from(CLASS_NAMES), st.sampled_from(CLASS_NAMES)),
                min_size=1, max_size=40))
def test_curve_matches_the_brute_force_loop(queries):
    # integer distances: many ties, each compared exactly
    distances = np.array([distance for distance, _, _ in queries], dtype=np.float64) / 4
    nearest = [near for _, near, _ in queries]
    truth = [true for _, _, true in queries]
    gallery_classes = CLASS_NAMES[:3]  # "d" is a class the gallery lacks: its matches are errors
    nearest = [near if near in gallery_classes else "a" for near in nearest]  # a nearest label is a gallery class
    if not any(true in gallery_classes for true in truth):
        with pytest.raises(ValueError, match="none of the calibration queries"):
            open_set.calibrate(distances, nearest, truth, gallery_classes, 0.5)
        return
    correct, known = open_set.match_outcomes(nearest, truth, gallery_classes)
    curve = open_set.precision_recall_curve(distances, correct, known)
    expected = ref_precision_recall_curve(distances, nearest, truth, gallery_classes)
    assert curve.dtype == np.float64 and curve.shape == (len(expected), 3)
    np.testing.assert_allclose(curve, np.array(expected), rtol=0, atol=1e-12)
    # the threshold of each precision: the largest distance whose precision reaches it
    for precision in (0.25, 0.5, 0.75, 1.0):
        reaching = [row[0] for row in expected if row[1] >= precision]
        if not reaching:
            best = max(row[1] for row in expected)
            with pytest.raises(ValueError, match=f"best reachable is {best:.4f}"):
                open_set.thresholds_for(curve, precision)
            continue
        assert open_set.thresholds_for(curve, precision)[1][0] == max(reaching)


def test_thresholds_are_sorted_by_precision_and_exact_quotients_reach_their_precision():
    # 20 queries at distances 1..20, the 20th wrong: precision 19/20 = 0.95 at t=20, 1.0 up to t=19
    distances = np.arange(1, 21, dtype=np.float64)
    truth = ["a"] * 20
    nearest = ["a"] * 19 + ["b"]
    calibration = open_set.calibrate(distances, nearest, truth, ["a", "b"], [1.0, 0.95, 0.95])
    assert calibration["calibration_precisions"].tolist() == [0.95, 1.0]
    assert open_set.thresholds_for(calibration["calibration_curve"], np.array(0.95))[1].tolist() == [20.0]
    assert calibration["calibration_thresholds"].tolist() == [20.0, 19.0]
    assert open_set.curve_at(calibration["calibration_curve"], 19.5) == (1.0, 19 / 20)
    precision, recall = open_set.curve_at(calibration["calibration_curve"], 0.5)
    assert np.isnan(precision) and recall == 0.0


def test_tied_distances_are_accepted_together():
    # three queries at one distance, one wrong: no threshold splits them, so precision 1 is out of reach
    curve = open_set.precision_recall_curve([2.0, 2.0, 2.0, 3.0], [True, False, True, True], [True] * 4)
    np.testing.assert_allclose(curve, [[2.0, 2 / 3, 2 / 4], [3.0, 3 / 4, 3 / 4]])
    with pytest.raises(ValueError, match=r"reaches precision 0.9 .*best reachable is 0.7500; ask for 0.75 or less"):
        open_set.thresholds_for(curve, 0.9)


# ---------------------------------------------------------------- synthetic classes, some unseen

N_SEEN, N_UNSEEN, DIM, PER_GALLERY_CLASS = 5, 2, 8, 20


def _gaussian_law(seed=0):
    """Class centres (7, DIM): the gallery holds classes 0-4 (PER_GALLERY_CLASS points each, unit noise);
    queries come from all 7, so classes 5 and 6 are unseen and overlap the others at random."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2.5, (N_SEEN + N_UNSEEN, DIM))
    gallery_labels = np.repeat(np.arange(N_SEEN), PER_GALLERY_CLASS)
    gallery = centres[gallery_labels] + rng.normal(0, 1, (len(gallery_labels), DIM))
    return centres, torch.from_numpy(gallery), gallery_labels


def _answers_of(centres, gallery, gallery_labels, n_queries, seed):
    """(nearest distances (Q,), nearest labels, true labels) of n_queries fresh queries of the law."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, N_SEEN + N_UNSEEN, n_queries)
    queries = torch.from_numpy(centres[truth] + rng.normal(0, 1, (n_queries, DIM)))
    distances, indices = search.nearest_neighbours(queries, gallery, 1)
    return distances[:, 0], [str(gallery_labels[i]) for i in indices[:, 0].tolist()], [str(t) for t in truth]


def test_calibrated_precision_holds_on_a_fresh_sample():
    centres, gallery, gallery_labels = _gaussian_law()
    classes = [str(label) for label in range(N_SEEN)]
    calibration_set = _answers_of(centres, gallery, gallery_labels, 4000, seed=1)
    test_set = _answers_of(centres, gallery, gallery_labels, 4000, seed=2)
    for asked in (0.8, 0.9):
        calibration = open_set.calibrate(*calibration_set, classes, asked)
        threshold = float(calibration["calibration_thresholds"][0])
        reached, _ = open_set.curve_at(calibration["calibration_curve"], threshold)
        scores = open_set.open_set_scores(open_set.open_set_labels(test_set[0], test_set[1], threshold),
                                          test_set[2], classes)
        n_calibration_accepted = int((calibration_set[0] <= threshold).sum())
        # both samples' binomial errors, 4 standard deviations
        bound = 4 * np.sqrt(asked * (1 - asked) * (1 / n_calibration_accepted + 1 / scores["n_accepted"]))
        assert asked <= reached < asked + 0.01
        assert abs(scores["precision"] - asked) <= bound, (asked, scores, bound)
        assert 0.1 < scores["recall"] < 1 and 0 < scores["unseen_rejected"] < 1


def test_unseen_classes_far_away_are_rejected():
    centres, gallery, gallery_labels = _gaussian_law()
    classes = [str(label) for label in range(N_SEEN)]
    calibration = open_set.calibrate(*_answers_of(centres, gallery, gallery_labels, 2000, seed=3), classes, 0.9)
    threshold = float(calibration["calibration_thresholds"][0])
    far = torch.from_numpy(np.random.default_rng(4).normal(0, 1, (50, DIM)) + 100.0)
    distances, indices = search.nearest_neighbours(far, gallery, 1)
    answers = open_set.open_set_labels(distances[:, 0], [str(gallery_labels[i]) for i in indices[:, 0]], threshold)
    assert answers == [open_set.UNKNOWN] * 50
    assert open_set.open_set_scores(answers, ["9"] * 50, classes)["unseen_rejected"] == 1.0


def test_open_set_labels_accept_at_the_threshold_itself():
    answers = open_set.open_set_labels(torch.tensor([0.5, 1.0, 1.5]), ["x", "y", "z"], 1.0)
    assert answers == ["x", "y", open_set.UNKNOWN]
    with pytest.raises(ValueError, match="must be as long"):
        open_set.open_set_labels([0.5], ["x", "y"], 1.0)


def test_open_set_scores_counts():
    scores = open_set.open_set_scores(["a", "b", "unknown", "unknown", "a"], ["a", "a", "b", "z", "z"], ["a", "b"])
    assert scores == {"precision": 1 / 3, "recall": 1 / 3, "unseen_rejected": 0.5, "n_queries": 5, "n_seen": 3,
                      "n_unseen": 2, "n_accepted": 3, "n_correct": 1}
    nothing = open_set.open_set_scores(["unknown"], ["a"], ["a"])
    assert np.isnan(nothing["precision"]) and nothing["recall"] == 0 and np.isnan(nothing["unseen_rejected"])


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, float("nan"), True, "0.9", None, []])
def test_bad_precisions_are_refused(bad):
    curve = np.array([[1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="precision"):
        open_set.thresholds_for(curve, bad)


def test_bad_curve_inputs_are_refused():
    with pytest.raises(ValueError, match="no calibration queries"):
        open_set.precision_recall_curve([], [], [])
    with pytest.raises(ValueError, match="must be as long"):
        open_set.precision_recall_curve([1.0], [True, True], [True])
    with pytest.raises(ValueError, match="finite"):
        open_set.precision_recall_curve([np.nan], [True], [True])
    with pytest.raises(ValueError, match="correct and known disagree"):
        open_set.precision_recall_curve([1.0], [True], [False])
    with pytest.raises(ValueError, match="must be as long"):
        open_set.match_outcomes(["a"], [], ["a"])


def test_calibrated_thresholds_of_a_gallery_dict():
    assert open_set.calibrated_thresholds({"embeddings": np.zeros((1, 2))}) == {}
    gallery = {"calibration_precisions": np.array([0.9, 0.95]), "calibration_thresholds": np.array([1.5, 1.0]),
               "calibration_curve": np.zeros((4, 3))}
    assert open_set.calibrated_thresholds(gallery) == {0.9: 1.5, 0.95: 1.0}
    assert open_set.threshold_at(gallery, 0.95, "g.npz") == 1.0
    with pytest.raises(ValueError, match=r"g.npz is not calibrated for precision 0.99 \(it holds: 0.9, 0.95\); "
                                         r"run `python search.py calibrate MODEL g.npz FOLDER --precision 0.99`"):
        open_set.threshold_at(gallery, 0.99, "g.npz")
    with pytest.raises(ValueError, match="precision must be one number"):
        open_set.threshold_at(gallery, [0.9, 0.95], "g.npz")
    for broken in ({"calibration_precisions": np.array([0.9])},
                   {**gallery, "calibration_thresholds": np.array([1.0])},
                   {**gallery, "calibration_curve": np.zeros((4, 2))}):
        with pytest.raises(ValueError, match="incomplete or disagree; calibrate it again"):
            open_set.calibrated_thresholds(broken)


# ---------------------------------------------------------------- search.py: calibrate, query and classify

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A gallery of 3 shape classes x 3 images, a calibration folder of 3 more each plus 3 images of a class
    the gallery lacks ("star", drawn like a triangle: a confusable unseen class), the model file, and the
    reference nearest distances and labels of the calibration images (float64 brute force)."""
    root = tmp_path_factory.mktemp("open_set")
    rng = np.random.default_rng(0)
    for folder, classes in (("gallery", CLASSES), ("calibration", CLASSES + ("star",))):
        for shape in classes:
            os.makedirs(root / folder / shape)
            for number in range(3):
                _draw(shape, rng).save(root / folder / shape / f"{number}.png")
    model_path = _save_model(str(root / "model.pt"), seed=0)
    gallery_path = search.index_folder(model_path, root / "gallery", root / "gallery.npz", progress=False)
    model, info = load_model(model_path)
    gallery = search.load_gallery(gallery_path)
    calibration_paths = sorted(str(path) for path in (root / "calibration").glob("*/*.png"))
    images = torch.stack([read_image(path, SIZE, 3) for path in calibration_paths])
    embeddings = embed_images(model, images, normalization=info["normalization"]).double()
    distances = torch.cdist(embeddings, torch.from_numpy(gallery["embeddings"]).double())
    nearest = distances.argmin(dim=1)
    return {"root": root, "model": model_path, "gallery": gallery_path, "calibration": str(root / "calibration"),
            "distances": distances.min(dim=1).values.numpy(), "paths": calibration_paths,
            "nearest": [CLASSES[gallery["labels"][i]] for i in nearest.tolist()],
            "truth": [os.path.basename(os.path.dirname(path)) for path in calibration_paths]}


def _reachable_precisions(shapes):
    curve = np.array(ref_precision_recall_curve(shapes["distances"], shapes["nearest"], shapes["truth"], CLASSES))
    return sorted({float(curve[:, 1].max()), float(curve[-1, 1])}), curve


def _copy_gallery(shapes, tmp_path):
    path = tmp_path / "gallery.npz"
    path.write_bytes(open(shapes["gallery"], "rb").read())
    return str(path)


def test_calibrate_stores_the_reference_thresholds_and_keeps_other_keys(shapes, tmp_path):
    gallery_path = _copy_gallery(shapes, tmp_path)
    precisions, curve = _reachable_precisions(shapes)
    levels = search.calibrate(shapes["model"], gallery_path, shapes["calibration"], precisions,
                              plot=tmp_path / "curve.png")
    assert [level["precision"] for level in levels] == precisions
    for level in levels:
        expected = max(row[0] for row in curve if row[1] >= level["precision"])
        assert level["threshold"] == pytest.approx(expected, rel=1e-5)
        assert level["calibration_precision"] >= level["precision"]
        assert level["n_queries"] == 12 and level["n_unseen"] == 3
    before, after = search.load_gallery(shapes["gallery"]), search.load_gallery(gallery_path)
    for key in search.GALLERY_KEYS:
        assert np.array_equal(before[key], after[key]), key
    np.testing.assert_allclose(after["calibration_curve"], curve, rtol=1e-5)
    assert set(open_set.calibrated_thresholds(after)) == set(precisions)
    assert os.path.getsize(tmp_path / "curve.png") > 0
    # recalibrating replaces the earlier precisions
    search.calibrate(shapes["model"], gallery_path, shapes["calibration"], precisions[:1])
    assert list(open_set.calibrated_thresholds(search.load_gallery(gallery_path))) == precisions[:1]


def test_query_and_classify_answer_unknown_beyond_the_threshold(shapes, tmp_path):
    gallery_path = _copy_gallery(shapes, tmp_path)
    precision = _reachable_precisions(shapes)[0][-1]  # the highest: a threshold that rejects some images
    threshold = search.calibrate(shapes["model"], gallery_path, shapes["calibration"], precision)[0]["threshold"]
    # the threshold is one calibration image's distance as search computes it (float32); that image's float64
    # reference distance may round to either side of it (it does on some CPUs), so the reference answers are
    # taken with a relative tolerance, the one the distances are compared with below
    expected = open_set.open_set_labels(shapes["distances"], shapes["nearest"], threshold * (1 + 1e-5))
    assert 0 < expected.count(open_set.UNKNOWN) < len(expected)
    classified = search.classify(shapes["model"], gallery_path, shapes["paths"], k=3, precision=precision)
    assert [result["label"] for result in classified] == expected
    assert [result["path"] for result in classified] == shapes["paths"]
    np.testing.assert_allclose([result["distance"] for result in classified], shapes["distances"], rtol=1e-5)
    assert all(result["precision"] == precision for result in classified)
    assert all(result["vote_share"] == 0 for result in classified if result["label"] == open_set.UNKNOWN)
    queried = search.query(shapes["model"], gallery_path, shapes["paths"], k=2, precision=precision)
    assert [(result["path"], result["label"]) for result in queried] == [(r["path"], r["label"]) for r in classified]
    assert all(result["distance"] == result["neighbours"][0]["distance"] for result in queried)
    # without precision, nothing changes
    assert "label" not in search.query(shapes["model"], gallery_path, shapes["paths"][:1], k=1)[0]
    # a threshold between two distances: the answers flip exactly there
    tight = float(np.sort(shapes["distances"])[5])
    assert open_set.open_set_labels(shapes["distances"], shapes["nearest"], tight).count(open_set.UNKNOWN) == 6


def test_command_line_end_to_end(shapes, tmp_path, capsys):
    gallery_path = _copy_gallery(shapes, tmp_path)
    precisions = _reachable_precisions(shapes)[0]
    arguments = ["calibrate", shapes["model"], gallery_path, shapes["calibration"], "--plot", tmp_path / "c.png"]
    for precision in precisions:
        arguments += ["--precision", precision]
    assert cli.run(search.main, "search.py", list(map(str, arguments))) == 0
    printed = capsys.readouterr().out
    assert "calibrated on 12 images" in printed and "(3 of classes the gallery lacks)" in printed
    assert all(f"precision >= {precision:g}: threshold" in printed for precision in precisions)
    assert f"wrote the curve and thresholds into {gallery_path}" in printed
    query = shapes["paths"][0]
    common = [shapes["model"], gallery_path, *shapes["paths"], "--precision", str(precisions[-1])]
    assert cli.run(search.main, "search.py", ["classify", *common, "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    expected = search.classify(shapes["model"], gallery_path, shapes["paths"], precision=precisions[-1])
    assert [(item["path"], item["label"]) for item in parsed] == [(item["path"], item["label"]) for item in expected]
    assert cli.run(search.main, "search.py", ["classify", *common]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith(f"{query}\t{expected[0]['label']}\t") and f"precision {precisions[-1]:g}" in first_line
    assert cli.run(search.main, "search.py", ["query", *common, "--k", "1"]) == 0
    assert f"answer: {expected[0]['label']}  distance: " in capsys.readouterr().out
    assert cli.run(search.main, "search.py", ["query", *common, "--k", "1", "--json"]) == 0
    assert [item["label"] for item in json.loads(capsys.readouterr().out)] == [item["label"] for item in expected]


def test_errors_name_what_to_change(shapes, tmp_path, capsys):
    gallery_path = _copy_gallery(shapes, tmp_path)
    original = open(gallery_path, "rb").read()
    model, calibration = shapes["model"], shapes["calibration"]
    flat = tmp_path / "flat"
    os.makedirs(flat)
    _draw("circle", np.random.default_rng(9)).save(flat / "0.png")
    unlabelled = search.index_folder(model, flat, tmp_path / "flat.npz", progress=False)
    unseen_only = tmp_path / "unseen_only"
    for shape in ("star", "moon"):
        os.makedirs(unseen_only / shape)
        _draw(shape, np.random.default_rng(9)).save(unseen_only / shape / "0.png")
    mistakes = {
        ("calibrate", model, gallery_path, calibration): "the following arguments are required: --precision",
        ("calibrate", model, gallery_path, calibration, "--precision", "1.5"): "precision must be a number in (0, 1]",
        ("calibrate", model, gallery_path, calibration, "--precision", "x"): "invalid float value: 'x'",
        ("calibrate", model, gallery_path, flat, "--precision", "0.5"): "is unlabelled: calibrate needs each image's",
        ("calibrate", model, unlabelled, calibration, "--precision", "0.5"): "flat.npz is unlabelled",
        ("calibrate", model, gallery_path, tmp_path / "none", "--precision", "0.5"): "none does not exist",
        ("calibrate", model, gallery_path, calibration, "--precision", "1.0", "--precision", "0.5"):
            "no threshold reaches precision 1 on the calibration set: the best reachable is",
        ("calibrate", model, gallery_path, unseen_only, "--precision", "0.5"):
            "none of the calibration queries has a class the gallery holds",
        ("classify", model, gallery_path, shapes["paths"][0], "--precision", "0.9"):
            "is not calibrated for precision 0.9 (it holds: none); run `python search.py calibrate MODEL",
        ("query", model, gallery_path, shapes["paths"][0], "--precision", "0"): "precision must be a number in (0, 1]",
    }
    if _reachable_precisions(shapes)[0][-1] == 1.0:  # the data reaches 1: ask for the impossible differently
        del mistakes[("calibrate", model, gallery_path, calibration, "--precision", "1.0", "--precision", "0.5")]
    for arguments, message in mistakes.items():
        assert cli.run(search.main, "search.py", list(map(str, arguments))) == 2, arguments
        error = capsys.readouterr().err
        assert error.startswith("search.py: error: ") and message in error, (arguments, error)
        assert len(error.strip().splitlines()) == 1
    assert open(gallery_path, "rb").read() == original  # no error wrote into the gallery
    gallery_folder = os.path.dirname(os.path.dirname(search.load_gallery(gallery_path)["paths"][0]))
    with pytest.raises(ValueError, match="9 calibration images of .* are in the gallery .*: calibrate on images"):
        search.calibrate(model, gallery_path, gallery_folder, 0.5)


def test_command_line_in_a_process(shapes, tmp_path):
    gallery_path = _copy_gallery(shapes, tmp_path)
    precision = _reachable_precisions(shapes)[0][-1]
    status, stdout, stderr = _run("calibrate", shapes["model"], gallery_path, shapes["calibration"],
                                  "--precision", precision)
    assert status == 0 and stderr == "" and f"precision >= {precision:g}: threshold" in stdout
    status, stdout, stderr = _run("classify", shapes["model"], gallery_path, shapes["paths"][0], "--precision", 0.5)
    assert status == 2 and stdout == ""
    assert stderr == (f"search.py: error: {gallery_path} is not calibrated for precision 0.5 (it holds: "
                      f"{precision:g}); run `python search.py calibrate MODEL {gallery_path} FOLDER --precision 0.5` with a labelled "
                      "folder of calibration images\n")
