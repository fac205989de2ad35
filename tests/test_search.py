"""Tests of search.py: the gallery file, exact and faiss k-NN search, and every subcommand through the API and
the command line, against references computed directly from ``embed_images`` on the same images (brute-force
distances in float64), plus every error path."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import search
from image_folders import read_image
from launch import command_lines
from metrics import knn_accuracy, nmi_score, retrieval_metrics, verification_roc_auc
from model_file import embed_images, load_model, save_model
from networks import EmbeddingNet

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("circle", "square", "triangle")
PER_CLASS = 4
SIZE = 28
DIM = 8
THRESHOLD = 0.5


def _draw(shape, rng):
    """A 28 px RGB image of one shape (its own colour per class) at a jittered place over light noise."""
    pixels = rng.integers(200, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    x, y = rng.integers(3, 9, size=2)
    box = [int(x), int(y), int(x) + 15, int(y) + 15]
    if shape == "circle":
        draw.ellipse(box, fill=(220, 20, 20))
    elif shape == "square":
        draw.rectangle(box, fill=(20, 160, 20))
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=(20, 20, 220))
    return image


def _save_model(path, seed, embedding_dim=DIM, threshold=THRESHOLD):
    torch.manual_seed(seed)
    model = EmbeddingNet(embedding_dim=embedding_dim, in_channels=3, image_size=SIZE)
    arguments = {"embedding_dim": embedding_dim, "in_channels": 3, "image_size": SIZE}
    return save_model(path, model, "embedding-net", arguments, image_size=SIZE, channels=3,
                      normalization={"mean": [0.8, 0.8, 0.8], "std": [0.3, 0.3, 0.3]},
                      class_names=list(CLASSES), threshold=threshold)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A labelled folder (3 classes x 4 images), a flat folder of 3 unlabelled images, 3 query images, the
    model file, its gallery of the labelled folder (indexed in batches of 5) and direct embeddings."""
    root = tmp_path_factory.mktemp("search")
    rng = np.random.default_rng(0)
    folder = root / "shapes"
    paths = []
    for shape in CLASSES:
        os.makedirs(folder / shape)
        for number in range(PER_CLASS):
            path = str(folder / shape / f"{number}.png")
            _draw(shape, rng).save(path)
            paths.append(path)
    flat = root / "flat"
    os.makedirs(flat)
    flat_paths = []
    for number, shape in enumerate(CLASSES):
        path = str(flat / f"{number}.png")
        _draw(shape, rng).save(path)
        flat_paths.append(path)
    queries = []
    for shape in CLASSES:
        path = str(root / f"query_{shape}.png")
        _draw(shape, rng).save(path)
        queries.append(path)
    model_path = _save_model(str(root / "model.pt"), seed=0)
    gallery_path = search.index_folder(model_path, str(folder), str(root / "gallery.npz"), batch_size=5,
                                       progress=False)
    model, info = load_model(model_path)

    def embed(image_paths):
        images = torch.stack([read_image(path, SIZE, 3) for path in image_paths])
        return embed_images(model, images, normalization=info["normalization"]).double()

    return {"root": root, "folder": str(folder), "paths": paths, "labels": np.repeat(np.arange(3), PER_CLASS),
            "flat": str(flat), "flat_paths": flat_paths, "queries": queries, "model": model_path,
            "gallery": gallery_path, "info": info, "embed": embed}


def _run(*arguments):
    """The command line in a subprocess from the repository root: (exit status, stdout, stderr)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "search.py", *map(str, arguments)], cwd=REPO_ROOT, capture_output=True,
                          text=True, env=environment, timeout=300)
    return done.returncode, done.stdout, done.stderr


def _reference_neighbours(queries, gallery, k):
    """Brute force: float64 Euclidean distances, stable sort (equal distances by lower index)."""
    distances = torch.cdist(queries.double(), gallery.double())
    order = distances.sort(dim=1, stable=True).indices[:, :k]
    return distances.gather(1, order), order


# ---------------------------------------------------------------- the gallery file

def test_index_writes_the_gallery_file(setup):
    gallery = search.load_gallery(setup["gallery"])
    with np.load(setup["gallery"], allow_pickle=False) as file:
        assert sorted(file.files) == sorted(search.GALLERY_KEYS)
        assert file["embeddings"].dtype == np.float32 and file["embeddings"].shape == (12, DIM)
        assert file["labels"].dtype == np.int64
        assert file["paths"].dtype.kind == "U" and file["class_names"].dtype.kind == "U"
    assert gallery["paths"].tolist() == setup["paths"]
    assert gallery["labels"].tolist() == setup["labels"].tolist()
    assert gallery["class_names"].tolist() == list(CLASSES)
    assert gallery["fingerprint"] == setup["info"]["fingerprint"]
    assert gallery["embedding_dim"] == DIM
    np.testing.assert_allclose(gallery["embeddings"], setup["embed"](setup["paths"]).numpy(), rtol=1e-5, atol=1e-5)


def test_index_flat_folder_is_unlabelled(setup, tmp_path):
    out = search.index_folder(setup["model"], setup["flat"], tmp_path / "flat.npz", progress=False)
    gallery = search.load_gallery(out)
    assert gallery["paths"].tolist() == setup["flat_paths"]
    assert gallery["labels"].tolist() == [-1, -1, -1]
    assert gallery["class_names"].tolist() == []
    np.testing.assert_allclose(gallery["embeddings"], setup["embed"](setup["flat_paths"]).numpy(), atol=1e-5)


def test_index_csv(setup, tmp_path):
    csv_path = tmp_path / "list.csv"
    rows = [(path, CLASSES[label]) for path, label in zip(setup["paths"], setup["labels"])][::2]
    csv_path.write_text("path,label\n" + "".join(f"{path},{name}\n" for path, name in rows))
    gallery = search.load_gallery(search.index_folder(setup["model"], csv_path, tmp_path / "csv.npz", progress=False))
    assert gallery["paths"].tolist() == [path for path, _ in rows]
    assert [CLASSES[label] for label in gallery["labels"]] == [name for _, name in rows]


def test_index_bad_image_raises_or_is_skipped(setup, tmp_path):
    folder = tmp_path / "with_bad"
    for shape in CLASSES[:2]:
        os.makedirs(folder / shape)
        for number in range(2):
            _draw(shape, np.random.default_rng(number)).save(folder / shape / f"{number}.png")
    bad = folder / "square" / "broken.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="broken.png"):
        search.index_folder(setup["model"], folder, tmp_path / "bad.npz", progress=False)
    assert not os.path.exists(tmp_path / "bad.npz")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        out = search.index_folder(setup["model"], folder, tmp_path / "bad.npz", progress=False, skip_bad_images=True)
    gallery = search.load_gallery(out)
    assert len(gallery["paths"]) == 4 and str(bad) not in gallery["paths"].tolist()
    assert gallery["labels"].tolist() == [0, 0, 1, 1]


def test_index_only_bad_images_raises(setup, tmp_path):
    os.makedirs(tmp_path / "bad")
    (tmp_path / "bad" / "a.png").write_text("no")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of the 1 image files"):
        search.index_folder(setup["model"], tmp_path / "bad", tmp_path / "g.npz", progress=False, skip_bad_images=True)


# ---------------------------------------------------------------- exact search

@pytest.mark.parametrize("seed", range(6))
def test_nearest_neighbours_matches_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    n_queries, n_gallery, dim = [int(v) for v in torch.randint(1, 40, (3,), generator=generator)]
    n_gallery += 10
    k = int(torch.randint(1, n_gallery + 1, (1,), generator=generator))
    queries = torch.randn(n_queries, dim, generator=generator)
    gallery = torch.randn(n_gallery, dim, generator=generator)
    expected_distances, expected_indices = _reference_neighbours(queries, gallery, k)
    # chunk < k, chunk not dividing G, one row at a time, exactly G, more than G
    for chunk_size in sorted({max(1, k - 1), 3, 7, 1, n_gallery, 2 * n_gallery}):
        distances, indices = search.nearest_neighbours(queries, gallery, k, chunk_size=chunk_size)
        assert distances.shape == indices.shape == (n_queries, k) and indices.dtype == torch.int64
        assert torch.equal(indices, expected_indices), chunk_size
        torch.testing.assert_close(distances.double(), expected_distances, rtol=1e-5, atol=1e-5)


def test_nearest_neighbours_ties_go_to_the_lower_index():
    # integer coordinates: squared distances are exact in float32, so the ties are real
    generator = torch.Generator().manual_seed(1)
    gallery = torch.randint(-2, 3, (60, 3), generator=generator).float()
    gallery = torch.cat([gallery, gallery[:20]])  # duplicates later in the gallery
    queries = torch.randint(-2, 3, (25, 3), generator=generator).float()
    for k in (1, 5, 17, 80):
        expected_distances, expected_indices = _reference_neighbours(queries, gallery, k)
        for chunk_size in (1, 4, 13, 80):
            distances, indices = search.nearest_neighbours(queries, gallery, k, chunk_size=chunk_size)
            assert torch.equal(indices, expected_indices), (k, chunk_size)
            torch.testing.assert_close(distances.double(), expected_distances)


def test_nearest_neighbours_takes_numpy_and_blocks_of_queries(monkeypatch):
    rng = np.random.default_rng(2)
    queries, gallery = rng.standard_normal((50, 4)).astype(np.float32), rng.standard_normal((30, 4)).astype(np.float32)
    expected_distances, expected_indices = _reference_neighbours(torch.from_numpy(queries), torch.from_numpy(gallery),
                                                                 4)
    monkeypatch.setattr(search, "MAX_BLOCK_ENTRIES", 7 * 8)  # blocks of 7 queries x chunks of 8
    distances, indices = search.nearest_neighbours(queries, gallery, 4, chunk_size=8)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(distances.double(), expected_distances, rtol=1e-5, atol=1e-5)
    distances, indices = search.nearest_neighbours(queries[:0], gallery, 2)
    assert distances.shape == indices.shape == (0, 2)


def test_faiss_equals_exact():
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(3)
    queries, gallery = torch.randn(40, 16, generator=generator), torch.randn(3000, 16, generator=generator)
    for k in (1, 10, 100):
        exact_distances, exact_indices = search.nearest_neighbours(queries, gallery, k, chunk_size=700)
        faiss_distances, faiss_indices = search.nearest_neighbours(queries, gallery, k, use_faiss=True)
        assert torch.equal(faiss_indices, exact_indices)
        torch.testing.assert_close(faiss_distances, exact_distances, rtol=1e-4, atol=1e-4)


def test_faiss_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        search.nearest_neighbours(torch.zeros(1, 2), torch.zeros(3, 2), 1, use_faiss=True)


@pytest.mark.parametrize("queries, gallery, k, chunk_size, error, match", [
    (torch.zeros(2, 3), torch.zeros(4, 2), 1, 8, ValueError, "same width"),
    (torch.zeros(3), torch.zeros(4, 3), 1, 8, TypeError, "queries must be a 2-D"),
    (torch.zeros(2, 3), torch.zeros(4, 3, dtype=torch.long), 1, 8, TypeError, "gallery must be a 2-D"),
    (torch.zeros(2, 3), torch.zeros(0, 3), 1, 8, ValueError, "gallery is empty"),
    (torch.zeros(2, 3), torch.zeros(4, 3), 0, 8, ValueError, "k must be >= 1"),
    (torch.zeros(2, 3), torch.zeros(4, 3), 5, 8, ValueError, "larger than the gallery"),
    (torch.zeros(2, 3), torch.zeros(4, 3), 2.0, 8, TypeError, "k must be an int"),
    (torch.zeros(2, 3), torch.zeros(4, 3), 2, 0, ValueError, "chunk_size must be >= 1"),
])
def test_nearest_neighbours_errors(queries, gallery, k, chunk_size, error, match):
    with pytest.raises(error, match=match):
        search.nearest_neighbours(queries, gallery, k, chunk_size=chunk_size)


# ---------------------------------------------------------------- subcommands against references

def test_query_matches_brute_force(setup):
    images = setup["queries"] + setup["paths"][:2]
    results = search.query(setup["model"], setup["gallery"], images, k=5)
    expected_distances, expected_indices = _reference_neighbours(setup["embed"](images),
                                                                 setup["embed"](setup["paths"]), 5)
    assert [result["query"] for result in results] == images
    for result, distances, indices in zip(results, expected_distances.tolist(), expected_indices.tolist()):
        assert [item["path"] for item in result["neighbours"]] == [setup["paths"][i] for i in indices]
        assert [item["label"] for item in result["neighbours"]] == [CLASSES[setup["labels"][i]] for i in indices]
        np.testing.assert_allclose([item["distance"] for item in result["neighbours"]], distances, atol=1e-4)
    # a gallery image finds itself first
    assert results[3]["neighbours"][0]["path"] == setup["paths"][0] and results[3]["neighbours"][0]["distance"] < 1e-3


def test_query_unlabelled_gallery_gives_no_labels(setup, tmp_path):
    out = search.index_folder(setup["model"], setup["flat"], tmp_path / "flat.npz", progress=False)
    results = search.query(setup["model"], out, setup["queries"][:1], k=3)
    assert [item["label"] for item in results[0]["neighbours"]] == [None, None, None]


def _reference_vote(labels, distances, n_classes):
    """Majority label, ties by smaller summed distance, then smaller label, and its vote share (loops)."""
    best = None
    for label in range(n_classes):
        votes = sum(1 for other in labels if other == label)
        summed = sum(d for other, d in zip(labels, distances) if other == label)
        key = (-votes, summed, label)
        if votes and (best is None or key < best[0]):
            best = (key, label, votes / len(labels))
    return best[1], best[2]


@pytest.mark.parametrize("k", [1, 3, 5, 12])
def test_classify_matches_brute_force(setup, k):
    images = setup["queries"] + setup["paths"][4:6]
    results = search.classify(setup["model"], setup["gallery"], images, k=k)
    expected_distances, expected_indices = _reference_neighbours(setup["embed"](images),
                                                                 setup["embed"](setup["paths"]), k)
    rows = zip(images, results, expected_distances.tolist(), expected_indices.tolist())
    for path, result, distances, indices in rows:
        label, share = _reference_vote([setup["labels"][i] for i in indices], distances, len(CLASSES))
        assert result == {"path": path, "label": CLASSES[label], "vote_share": pytest.approx(share)}


def _gallery_around(setup, tmp_path, offsets, labels):
    """A gallery file of the setup's model whose items lie at the first query's embedding + offsets (M, D)."""
    centre = setup["embed"](setup["queries"][:1])[0].float().numpy()
    gallery = search.load_gallery(setup["gallery"])
    arrays = {key: gallery[key] for key in search.GALLERY_KEYS}
    arrays["embeddings"] = (centre + np.asarray(offsets, dtype=np.float32)).astype(np.float32)
    arrays["labels"] = np.asarray(labels, dtype=np.int64)
    arrays["paths"] = np.array([f"item{number}.png" for number in range(len(labels))])
    path = tmp_path / "crafted.npz"
    np.savez(path, **arrays)
    return path


def test_classify_vote_ties(setup, tmp_path):
    axis = np.eye(DIM)[0]
    # label 0 has the nearest item but label 1 the smaller summed distance (1 + 4 > 2 + 2.5)
    path = _gallery_around(setup, tmp_path, [1 * axis, 2 * axis, 2.5 * axis, 4 * axis, 9 * axis], [0, 1, 1, 0, 2])
    [result] = search.classify(setup["model"], path, setup["queries"][:1], k=4)
    assert result["label"] == CLASSES[1] and result["vote_share"] == 0.5
    # equal votes and equal summed distances (the same points twice, so the sums are exactly equal): the
    # smaller label, though label 2 has the first neighbour
    path = _gallery_around(setup, tmp_path, [2 * axis, 2 * axis, 3 * axis, 3 * axis], [2, 1, 1, 2])
    [result] = search.classify(setup["model"], path, setup["queries"][:1], k=4)
    assert result["label"] == CLASSES[1] and result["vote_share"] == 0.5
    # unlabelled items never vote
    path = _gallery_around(setup, tmp_path, [0.5 * axis, 0.6 * axis, 3 * axis], [-1, -1, 2])
    [result] = search.classify(setup["model"], path, setup["queries"][:1], k=1)
    assert result["label"] == CLASSES[2] and result["vote_share"] == 1.0


def test_verify_matches_direct_embeddings(setup):
    first, second = setup["queries"][0], setup["paths"][0]
    result = search.verify(setup["model"], first, second)
    embeddings = setup["embed"]([first, second])
    distance = float((embeddings[0] - embeddings[1]).norm())
    assert result["distance"] == pytest.approx(distance, abs=1e-4)
    assert result["similarity"] == pytest.approx(1 / (1 + distance), abs=1e-5)
    assert result["threshold"] == THRESHOLD and result["same"] == (1 / (1 + distance) >= THRESHOLD)
    same = search.verify(setup["model"], first, first)
    assert same == {"distance": 0.0, "similarity": 1.0, "threshold": THRESHOLD, "same": True}


def test_verify_without_threshold(setup, tmp_path):
    model_path = _save_model(str(tmp_path / "no_threshold.pt"), seed=0, threshold=None)
    result = search.verify(model_path, setup["queries"][0], setup["queries"][1])
    assert result["threshold"] is None and result["same"] is None and 0 < result["similarity"] <= 1
    status, out, _ = _run("verify", model_path, setup["queries"][0], setup["queries"][1])
    assert status == 0 and "no verdict" in out and "same" not in out and "different" not in out


def test_evaluate_matches_metrics(setup):
    result = search.evaluate(setup["model"], setup["gallery"])
    embeddings = setup["embed"](setup["paths"]).float()
    labels = torch.from_numpy(setup["labels"])
    expected = retrieval_metrics(embeddings, labels)
    expected.update(knn_accuracy=knn_accuracy(embeddings, labels, embeddings, labels, k=5, exclude_self=True),
                    nmi=nmi_score(embeddings, labels), roc_auc=verification_roc_auc(embeddings, labels))
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-6), name
    assert (result["n_images"], result["n_classes"], result["knn_k"]) == (12, 3, 5)


# ---------------------------------------------------------------- the command line

def test_cli_index_and_query(setup, tmp_path):
    out = tmp_path / "cli.npz"
    status, stdout, stderr = _run("index", setup["model"], setup["folder"], "--out", out, "--batch-size", 7,
                                  "--no-progress")
    assert status == 0, stderr
    assert "indexed 12 images" in stdout and "3 classes" in stdout
    np.testing.assert_allclose(search.load_gallery(out)["embeddings"],
                               search.load_gallery(setup["gallery"])["embeddings"], atol=1e-5)
    expected = search.query(setup["model"], setup["gallery"], setup["queries"][:2], k=3)
    status, stdout, stderr = _run("query", setup["model"], out, *setup["queries"][:2], "--k", 3)
    assert status == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == f"query: {setup['queries'][0]}" and lines[5] == f"query: {setup['queries'][1]}"
    first = expected[0]["neighbours"][0]
    assert lines[1] == f"  1. {first['path']}  label: {first['label']}  distance: {first['distance']:.4f}"
    grid = tmp_path / "grid.png"
    status, stdout, stderr = _run("query", setup["model"], out, *setup["queries"][:2], "--k", 3, "--json",
                                  "--grid", grid)
    assert status == 0, stderr
    parsed = json.loads(stdout)
    assert [result["query"] for result in parsed] == setup["queries"][:2]
    assert [[item["path"] for item in result["neighbours"]] for result in parsed] == \
        [[item["path"] for item in result["neighbours"]] for result in expected]
    with open(grid, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_draw_grid_marks_unreadable_images(setup, tmp_path):
    results = search.query(setup["model"], setup["gallery"], setup["queries"][:1], k=2)
    results[0]["neighbours"][1]["path"] = str(tmp_path / "gone.png")
    path = search.draw_grid(results, str(tmp_path / "sub" / "grid.png"))
    assert Image.open(path).format == "PNG"


def test_cli_verify_classify_evaluate(setup):
    status, stdout, stderr = _run("verify", setup["model"], setup["queries"][0], setup["paths"][0])
    assert status == 0, stderr
    result = search.verify(setup["model"], setup["queries"][0], setup["paths"][0])
    verdict = "same" if result["same"] else "different"
    assert stdout.splitlines() == [f"distance: {result['distance']:.4f}", f"similarity: {result['similarity']:.4f}",
                                   f"threshold: {THRESHOLD:.4f}", f"verdict: {verdict}"]
    # relative and absolute paths: each line starts with the path exactly as given
    relative = os.path.relpath(setup["queries"][1], REPO_ROOT)
    images = [setup["queries"][0], relative]
    status, stdout, stderr = _run("classify", setup["model"], setup["gallery"], *images, "--k", 3)
    assert status == 0, stderr
    expected = search.classify(setup["model"], setup["gallery"], setup["queries"][:2], k=3)
    lines = stdout.splitlines()
    assert len(lines) == 2
    for line, path, result in zip(lines, images, expected):
        assert line == f"{path}\t{result['label']}\t{result['vote_share']:.2f}"
    status, stdout, stderr = _run("evaluate", setup["model"], setup["gallery"])
    assert status == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == ("| images | classes | P@1 | R-Precision | MAP@R | 5-NN accuracy | NMI | ROC-AUC | "
                        "verification acc |")
    result = search.evaluate(setup["model"], setup["gallery"])
    assert lines[2].startswith(f"| 12 | 3 | {result['precision_at_1']:.4f} | {result['r_precision']:.4f} |")


def test_cli_error_exits_with_message(setup, tmp_path):
    status, stdout, stderr = _run("query", setup["model"], tmp_path / "none.npz", setup["queries"][0])
    assert status == 2 and stdout == ""
    assert stderr.startswith("search.py: error: no gallery file at") and "none.npz" in stderr
    status, _, stderr = _run("classify", setup["model"], setup["gallery"])
    assert status == 2 and "IMAGE" in stderr  # argparse: images are required


def test_a_user_mistake_on_the_command_line_is_one_line_and_status_2(setup, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    bad_folder = tmp_path / "folder"
    shutil.copytree(setup["folder"], bad_folder)
    shutil.copy(bad, bad_folder / sorted(os.listdir(bad_folder))[0] / "bad.png")
    not_a_model = tmp_path / "model.pt"
    not_a_model.write_text("hello")
    model, gallery, query = setup["model"], setup["gallery"], setup["queries"][0]
    mistakes = {("query", model, tmp_path / "none.npz", query): "no gallery file at",
                ("query", tmp_path / "none.pt", gallery, query): "none.pt",
                ("query", not_a_model, gallery, query): "is not a model file",
                ("query", model, not_a_model, query): "is not a gallery file",
                ("query", model, gallery, tmp_path / "none.png"): "none.png",
                ("classify", model, gallery, query, "--k", 0): "k must be >= 1",
                ("classify", model, gallery, query, "--k", "x"): "argument --k: invalid int value: 'x'",
                ("verify", model, bad, query): "bad.png",
                ("index", model, tmp_path / "nowhere", "--out", tmp_path / "g.npz"): "nowhere does not exist",
                ("index", model, setup["folder"], "--out", tmp_path / "g.npz", "--batch-size", 0): "batch_size must be",
                ("index", model, bad_folder, "--out", tmp_path / "g.npz", "--no-progress"): "--skip-bad-images",
                ("evaluate", model, gallery, "--k", 3): "unrecognized arguments: --k 3",
                ("search", model): "invalid choice: 'search'",
                (): "the following arguments are required: command"}
    outcomes = command_lines(os.path.join(REPO_ROOT, "search.py"), list(mistakes), REPO_ROOT)
    for (arguments, message), (status, stdout, stderr) in zip(mistakes.items(), outcomes):
        assert status == 2 and "Traceback" not in stderr and stdout == "", (arguments, stderr)
        assert len(stderr.splitlines()) == 1 and stderr.startswith("search.py: error: "), (arguments, stderr)
        assert message in stderr, (arguments, stderr)
    assert not os.path.exists(tmp_path / "g.npz")
    status, stdout, stderr = _run("index", model, bad_folder, "--out", tmp_path / "g.npz", "--no-progress",
                                  "--skip-bad-images")
    assert status == 0 and stdout.startswith("indexed "), stderr


def test_faiss_missing_for_the_faiss_option_is_a_user_error(setup, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "faiss" else real(name, *rest))
    with pytest.raises(ValueError, match="--faiss needs faiss, which is not installed: pip install faiss-cpu"):
        search.main(["query", setup["model"], setup["gallery"], setup["queries"][0], "--faiss"])


# ---------------------------------------------------------------- error paths

def test_gallery_of_another_model_is_refused(setup, tmp_path):
    other = _save_model(str(tmp_path / "other.pt"), seed=1)
    with pytest.raises(ValueError, match="indexed by another model .*fingerprint.*re-run"):
        search.query(other, setup["gallery"], setup["queries"][:1], k=1)
    wider = _save_model(str(tmp_path / "wider.pt"), seed=0, embedding_dim=DIM + 1)
    for call in (lambda: search.classify(wider, setup["gallery"], setup["queries"][:1], k=1),
                 lambda: search.evaluate(wider, setup["gallery"])):
        with pytest.raises(ValueError, match=f"{DIM}-dimensional embeddings but .*{DIM + 1} dimensions.*re-run"):
            call()


def test_missing_files_are_named(setup, tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        search.query(missing + ".pt", setup["gallery"], setup["queries"], k=1)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        search.classify(setup["model"], missing + ".npz", setup["queries"], k=1)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        search.query(setup["model"], setup["gallery"], [setup["queries"][0], missing + ".png"], k=1)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        search.verify(setup["model"], setup["queries"][0], missing + ".png")
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        search.index_folder(setup["model"], missing + "_folder", tmp_path / "g.npz", progress=False)
    with pytest.raises(ValueError, match="no query image given"):
        search.query(setup["model"], setup["gallery"], [], k=1)


def test_unreadable_query_image_is_named(setup, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="bad.png"):
        search.classify(setup["model"], setup["gallery"], [str(bad)], k=1)
    with pytest.raises(ValueError, match="bad.png"):
        search.verify(setup["model"], str(bad), setup["queries"][0])


def test_bad_k_is_refused(setup, tmp_path):
    with pytest.raises(ValueError, match="k must be >= 1"):
        search.query(setup["model"], setup["gallery"], setup["queries"], k=0)
    with pytest.raises(ValueError, match="k=13 is larger than the gallery .*--k 12"):
        search.query(setup["model"], setup["gallery"], setup["queries"], k=13)
    with pytest.raises(ValueError, match="k=13 is larger than the labelled part .*--k 12"):
        search.classify(setup["model"], setup["gallery"], setup["queries"], k=13)
    status, _, stderr = _run("classify", setup["model"], setup["gallery"], setup["queries"][0], "--k", 0)
    assert status == 2 and "k must be >= 1" in stderr


def test_unlabelled_gallery_cannot_classify_or_evaluate(setup, tmp_path):
    out = search.index_folder(setup["model"], setup["flat"], tmp_path / "flat.npz", progress=False)
    with pytest.raises(ValueError, match="is unlabelled .*classify needs"):
        search.classify(setup["model"], out, setup["queries"], k=1)
    with pytest.raises(ValueError, match="is unlabelled .*evaluate needs"):
        search.evaluate(setup["model"], out)


def test_not_a_gallery_file(setup, tmp_path):
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(ValueError, match="text.npz is not a gallery file"):
        search.load_gallery(text)
    other = tmp_path / "other.npz"
    np.savez(other, embeddings=np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="other.npz is not a gallery file .*missing"):
        search.query(setup["model"], other, setup["queries"], k=1)
    gallery = search.load_gallery(setup["gallery"])
    arrays = {key: gallery[key] for key in search.GALLERY_KEYS}
    arrays["labels"] = arrays["labels"][:-1]
    np.savez(other, **arrays)
    with pytest.raises(ValueError, match="do not agree"):
        search.load_gallery(other)


def test_folders_index_refuses(setup, tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no images"):
        search.index_folder(setup["model"], tmp_path / "empty", tmp_path / "g.npz", progress=False)
    os.makedirs(tmp_path / "one_class" / "only")
    _draw("circle", np.random.default_rng(0)).save(tmp_path / "one_class" / "only" / "a.png")
    with pytest.raises(ValueError, match="at least 2 classes"):
        search.index_folder(setup["model"], tmp_path / "one_class", tmp_path / "g.npz", progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        search.index_folder(setup["model"], setup["folder"], tmp_path / "g.npz", progress=False, batch_size=0)
    assert not os.path.exists(tmp_path / "g.npz")


def test_cli_faiss_gives_the_exact_neighbours_and_labels(setup):
    pytest.importorskip("faiss")
    arguments = [setup["model"], setup["gallery"], *setup["queries"][:3], "--k", 4]
    exact = _run("query", *arguments, "--json")
    with_faiss = _run("query", *arguments, "--json", "--faiss")
    assert exact[0] == with_faiss[0] == 0, exact[2] + with_faiss[2]
    paths = [[item["path"] for item in result["neighbours"]] for result in json.loads(exact[1])]
    assert paths == [[item["path"] for item in result["neighbours"]] for result in json.loads(with_faiss[1])]
    assert _run("classify", *arguments)[1] == _run("classify", *arguments, "--faiss")[1]


def test_evaluate_reports_verification_accuracy_at_the_model_threshold(setup):
    result = search.evaluate(setup["model"], setup["gallery"])
    gallery = search.load_gallery(setup["gallery"])
    embeddings, labels = torch.from_numpy(gallery["embeddings"]), torch.from_numpy(gallery["labels"])
    # 12 images: every unordered pair is used once (fewer than n_pairs / 2 of each kind), so brute force
    first, second = torch.triu_indices(len(labels), len(labels), offset=1)
    similarity = 1 / (1 + (embeddings[first].double() - embeddings[second].double()).norm(dim=1))
    same = labels[first] == labels[second]
    assert result["verification_accuracy"] == pytest.approx(float(((similarity >= THRESHOLD) == same).double().mean()))


def test_a_model_file_that_inverts_its_images_indexes_the_inverted_images(setup, tmp_path):
    model, info = load_model(setup["model"])
    path = save_model(tmp_path / "inverting.pt", model, info["architecture"], info["arguments"], image_size=SIZE,
                      channels=3, normalization=info["normalization"], invert=True)
    gallery = search.load_gallery(search.index_folder(path, setup["folder"], tmp_path / "g.npz", progress=False))
    images = torch.stack([read_image(image, SIZE, 3) for image in setup["paths"]])
    expected = embed_images(model, 1 - images, normalization=info["normalization"])
    np.testing.assert_allclose(gallery["embeddings"], expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(gallery["embeddings"], setup["embed"](setup["paths"]).numpy(), atol=1e-3)
