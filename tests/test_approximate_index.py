"""Tests of approximate_index.py and of search.py through an approximate index: an index configured to be exact
(HNSW with efSearch >= N, IVF with nprobe = its lists) returns the brute-force neighbours; otherwise its recall
is measured against exact search and checked against a loose bound on clustered data; the index file is
refused when stale, missing or not an index; every bad parameter is named; the command line end to end.
Skipped as a whole when faiss is not installed (CI installs faiss-cpu)."""

import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies

pytest.importorskip("faiss", reason="the approximate index needs faiss (pip install faiss-cpu)")

import approximate_index  # noqa: E402
import cli  # noqa: E402
import search  # noqa: E402
from reference import ref_nearest_neighbours  # noqa: E402
from test_search import _run, _save_model, setup  # noqa: E402,F401 (setup: the labelled folder, model, gallery)


def _points(seed, n_items, dim=8, n_queries=6):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_items, dim)).astype(np.float32),
            rng.standard_normal((n_queries, dim)).astype(np.float32))


def _clustered(seed, n_clusters=40, per_cluster=50, dim=16, spread=0.3, n_queries=100):
    """Gaussian clusters (centres N(0, I), points centre + spread N(0, I)) and queries drawn from the same law."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    points = np.repeat(centres, per_cluster, axis=0) + spread * rng.standard_normal((n_clusters * per_cluster, dim))
    queries = centres[rng.integers(0, n_clusters, n_queries)] + spread * rng.standard_normal((n_queries, dim))
    return points.astype(np.float32), queries.astype(np.float32)


def _assert_equals_reference(result, queries, gallery, k):
    distances, indices = result
    expected_distances, expected_indices = ref_nearest_neighbours(queries, gallery, k)
    assert indices.dtype == torch.int64 and indices.tolist() == expected_indices
    np.testing.assert_allclose(distances.numpy(), expected_distances, rtol=1e-5, atol=1e-5)


def _assert_same_answers(first, second):
    """Two lists of query results (``search.query``'s) with the same neighbours, distances equal up to float
    rounding (faiss and the chunked search round differently)."""
    assert [[(item["path"], item["label"]) for item in result["neighbours"]] for result in first] == \
        [[(item["path"], item["label"]) for item in result["neighbours"]] for result in second]
    np.testing.assert_allclose([[item["distance"] for item in result["neighbours"]] for result in first],
                               [[item["distance"] for item in result["neighbours"]] for result in second],
                               rtol=1e-5, atol=1e-6)


@pytest.fixture
def gallery_copy(setup, tmp_path):  # noqa: F811
    """The setup gallery copied into tmp_path, so an index written beside it stays in this test."""
    path = str(tmp_path / "gallery.npz")
    shutil.copy(setup["gallery"], path)
    return path


# ---------------------------------------------------------------- exact when configured to be

@settings(max_examples=8)
@given(seed=strategies.integers(0, 10 ** 6), n_items=strategies.integers(1, 120), k=strategies.integers(1, 6))
def test_hnsw_with_ef_search_at_least_n_equals_brute_force(seed, n_items, k):
    gallery, queries = _points(seed, n_items)
    k = min(k, n_items)
    index = approximate_index.new_index(gallery, "hnsw", hnsw_m=4, chunk_size=7)
    _assert_equals_reference(approximate_index.search_index(index, queries, k, ef_search=n_items), queries,
                             gallery, k)


@settings(max_examples=8)
@given(seed=strategies.integers(0, 10 ** 6), n_items=strategies.integers(2, 120), lists=strategies.integers(1, 8),
       k=strategies.integers(1, 6))
def test_ivf_with_nprobe_equal_to_its_lists_equals_brute_force(seed, n_items, lists, k):
    gallery, queries = _points(seed, n_items)
    k, lists = min(k, n_items), min(lists, n_items)
    index = approximate_index.new_index(gallery, "ivf", ivf_lists=lists, seed=seed, chunk_size=11)
    _assert_equals_reference(approximate_index.search_index(index, queries, k, nprobe=lists), queries, gallery, k)


@pytest.mark.parametrize("kind, parameters", [("hnsw", {"ef_search": 200}), ("ivf", {"nprobe": 5})])
def test_a_subset_is_searched_alone_and_answered_in_its_positions(kind, parameters):
    gallery, queries = _points(3, 200)
    subset = np.arange(1, 200, 3)
    index = approximate_index.new_index(gallery, kind, ivf_lists=5)
    result = approximate_index.search_index(index, queries, 4, subset=subset, **parameters)
    _assert_equals_reference(result, queries, gallery[subset], 4)


def test_the_search_parameters_do_not_change_the_index():
    gallery, queries = _points(4, 100)
    ivf = approximate_index.new_index(gallery, "ivf", ivf_lists=8)
    hnsw = approximate_index.new_index(gallery, "hnsw")
    approximate_index.search_index(ivf, queries, 3, nprobe=2)
    approximate_index.search_index(hnsw, queries, 3, ef_search=5)
    assert ivf.nprobe == 8 and hnsw.hnsw.efSearch == approximate_index.HNSW_EF_SEARCH


def test_the_ivf_sample_and_clusters_are_seeded():
    gallery, queries = _clustered(0, n_clusters=10, per_cluster=20)
    first, second = (approximate_index.new_index(gallery, "ivf", ivf_lists=10, seed=5) for _ in range(2))
    np.testing.assert_array_equal(first.quantizer.reconstruct_n(0, 10), second.quantizer.reconstruct_n(0, 10))
    for nprobe in (1, 2):
        assert torch.equal(approximate_index.search_index(first, queries, 3, nprobe=nprobe)[1],
                           approximate_index.search_index(second, queries, 3, nprobe=nprobe)[1])


# ---------------------------------------------------------------- recall when approximate

def test_recall_at_k_counts_the_exact_neighbours_found():
    exact = [[0, 1, 2], [3, 4, 5]]
    assert approximate_index.recall_at_k([[2, 1, 0], [3, 4, 5]], exact) == 1.0
    assert approximate_index.recall_at_k([[2, 9, 8], [5, 6, 7]], exact) == pytest.approx(2 / 6)
    assert approximate_index.recall_at_k(torch.tensor([[7, 8, 9], [0, 1, 2]]), np.array(exact)) == 0.0
    with pytest.raises(ValueError, match=r"approximate_indices and exact_indices must both be \(Q, k\)"):
        approximate_index.recall_at_k([[0, 1]], exact)
    with pytest.raises(ValueError, match="must both be"):
        approximate_index.recall_at_k(np.zeros((0, 3), dtype=int), np.zeros((0, 3), dtype=int))


@pytest.mark.parametrize("kind, parameters, bound", [
    ("hnsw", {"ef_search": 10}, 0.8),  # a narrow beam, still far above chance on well separated clusters
    ("ivf", {"nprobe": 3}, 0.8),  # 3 of 40 lists: the query's cluster and its neighbours
])
def test_recall_on_clustered_data_is_measured_against_exact_search(kind, parameters, bound):
    gallery, queries = _clustered(1)
    index = approximate_index.new_index(gallery, kind, hnsw_m=8, ef_construction=20, ivf_lists=40)
    _, approximate = approximate_index.search_index(index, queries, 10, **parameters)
    _, exact = search.nearest_neighbours(queries, gallery, 10)
    found = [len(set(a) & set(e)) / 10 for a, e in zip(approximate.tolist(), exact.tolist())]
    recall = approximate_index.recall_at_k(approximate, exact)
    assert recall == pytest.approx(np.mean(found)) and bound <= recall <= 1


def test_fewer_than_k_found_is_an_error_naming_the_parameter():
    gallery, queries = _clustered(2, n_clusters=20, per_cluster=5)
    index = approximate_index.new_index(gallery, "ivf", ivf_lists=20)
    with pytest.raises(ValueError, match="found fewer than k=30 neighbours .* raise nprobe or search exactly"):
        approximate_index.search_index(index, queries, 30, nprobe=1)


# ---------------------------------------------------------------- bad parameters

@pytest.mark.parametrize("arguments, error, match", [
    ({"kind": "lsh"}, ValueError, "unknown kind 'lsh'; choose one of hnsw, ivf"),
    ({"kind": "ivf", "ivf_lists": 31}, ValueError, r"ivf_lists=31 is larger than the gallery \(30 items\)"),
    ({"kind": "ivf", "ivf_lists": 0}, ValueError, "ivf_lists must be >= 1"),
    ({"kind": "ivf", "ivf_lists": 4, "train_size": 3}, ValueError, "train_size must be >= 4"),
    ({"kind": "ivf", "train_size": 31}, ValueError, r"train_size=31 is larger than the gallery \(30 items\)"),
    ({"kind": "hnsw", "hnsw_m": 1}, ValueError, "hnsw_m must be >= 2"),
    ({"kind": "hnsw", "ef_construction": 2.5}, TypeError, "ef_construction must be an int"),
    ({"kind": "hnsw", "chunk_size": 0}, ValueError, "chunk_size must be >= 1"),
    ({"kind": "ivf", "seed": -1}, ValueError, "seed must be >= 0"),
])
def test_bad_build_parameters_are_named(arguments, error, match):
    gallery, _ = _points(0, 30)
    with pytest.raises(error, match=match):
        approximate_index.new_index(gallery, **arguments)


def test_bad_embeddings_are_refused():
    with pytest.raises(ValueError, match="embeddings are empty"):
        approximate_index.new_index(np.zeros((0, 4), np.float32), "hnsw")
    with pytest.raises(TypeError, match="embeddings must be a 2-D floating array"):
        approximate_index.new_index(np.zeros(4, np.float32), "hnsw")


@pytest.mark.parametrize("kind, parameters, error, match", [
    ("hnsw", {"nprobe": 2}, ValueError, r"nprobe does not apply to an hnsw index; .* ef_search \(--ef-search\)"),
    ("ivf", {"ef_search": 8}, ValueError, r"ef_search does not apply to an ivf index; .* nprobe \(--nprobe\)"),
    ("hnsw", {"ef_search": 0}, ValueError, "ef_search must be >= 1"),
    ("ivf", {"nprobe": 0}, ValueError, "nprobe must be >= 1"),
    ("ivf", {"nprobe": 5}, ValueError, r"nprobe=5 is more than the index's 4 lists; pass nprobe <= 4"),
    ("hnsw", {"k": 41}, ValueError, r"k=41 is larger than the items searched \(40\)"),
    ("ivf", {"k": 0}, ValueError, "k must be >= 1"),
    ("hnsw", {"queries": np.zeros((2, 3), np.float32)}, ValueError, r"queries must be \(Q, 8\) for this index"),
])
def test_bad_search_parameters_are_named(kind, parameters, error, match):
    gallery, queries = _points(0, 40)
    index = approximate_index.new_index(gallery, kind, ivf_lists=4)
    arguments = {"queries": queries, "k": 3, **parameters}
    with pytest.raises(error, match=match):
        approximate_index.search_index(index, **arguments)


@pytest.mark.parametrize("options, has_index, match", [
    ({"ef": 3}, True, r"unknown search option\(s\) \['ef'\]; choose from exact, ef_search, nprobe"),
    ({"exact": True, "nprobe": 3}, True, "nprobe sets the approximate search, and exact search was asked for"),
    ({"ef_search": 3}, False, "ef_search is set but the gallery has no approximate index; build one with"),
    ({"nprobe": -1}, True, "nprobe must be >= 1"),
])
def test_bad_search_options_are_named(options, has_index, match):
    with pytest.raises(ValueError, match=match):
        approximate_index.check_search_options(options, has_index)


def test_search_options_are_completed():
    assert approximate_index.check_search_options(None) == {"exact": False, "ef_search": None, "nprobe": None}
    assert approximate_index.check_search_options({"nprobe": np.int64(3)}, True)["nprobe"] == 3
    with pytest.raises(TypeError, match="exact must be True or False"):
        approximate_index.check_search_options({"exact": 1})


# ---------------------------------------------------------------- the index file

@pytest.mark.parametrize("kind, build, parameters", [("hnsw", {"hnsw_m": 4}, {"ef_search": 12}),
                                                     ("ivf", {"ivf_lists": 3}, {"nprobe": 3})])
def test_built_saved_loaded_and_searched_like_exact_search(setup, gallery_copy, kind, build,  # noqa: F811
                                                           parameters):
    path = approximate_index.build_index(gallery_copy, kind, progress=False, **build)
    assert path == gallery_copy + ".ann" == approximate_index.index_path(gallery_copy)
    assert approximate_index.has_index(gallery_copy)
    assert not [name for name in os.listdir(os.path.dirname(path)) if name.endswith(".tmp")]
    loaded = approximate_index.load_index(gallery_copy)
    assert loaded.kind == kind and loaded.path == path
    assert loaded.settings == ({"hnsw_m": 4, "ef_construction": 40, "ef_search": 64} if kind == "hnsw" else
                               {"ivf_lists": 3, "train_size": 12, "seed": 0, "nprobe": 3})
    embeddings = search.load_gallery(gallery_copy)["embeddings"]
    queries = setup["embed"](setup["queries"]).float().numpy()
    _assert_equals_reference(approximate_index.search_index(loaded.index, queries, 5, **parameters), queries,
                             embeddings, 5)
    ann_options = {"ef_search": 12} if kind == "hnsw" else {"nprobe": 3}
    _assert_same_answers(search.query(setup["model"], gallery_copy, setup["queries"], k=5, ann_options=ann_options),
                         search.query(setup["model"], gallery_copy, setup["queries"], k=5, ann_options={"exact": True}))
    assert search.classify(setup["model"], gallery_copy, setup["queries"], k=3, ann_options=ann_options) == \
        search.classify(setup["model"], setup["gallery"], setup["queries"], k=3)


def test_classify_searches_only_the_labelled_items(setup, tmp_path):  # noqa: F811
    with np.load(setup["gallery"]) as file:
        arrays = {key: file[key] for key in file.files}
    arrays["labels"][::2] = -1  # every other item unlabelled: the index holds them, classify must skip them
    path = str(tmp_path / "half.npz")
    np.savez(path, **arrays)
    approximate_index.build_index(path, "hnsw", progress=False)
    assert search.classify(setup["model"], path, setup["queries"], k=3, ann_options={"ef_search": 12}) == \
        search.classify(setup["model"], path, setup["queries"], k=3, ann_options={"exact": True})


def test_a_stale_index_is_refused_with_how_to_rebuild(setup, gallery_copy, tmp_path):  # noqa: F811
    approximate_index.build_index(gallery_copy, "ivf", ivf_lists=2, progress=False)
    search.index_folder(setup["model"], setup["flat"], gallery_copy, progress=False)  # indexed again, 3 items
    stale = fr"{gallery_copy}.ann was built from other embeddings than those now in {gallery_copy} \(12 items " \
            r"then, 3 now\): the gallery was indexed again; rebuild it"
    with pytest.raises(ValueError, match=stale):
        approximate_index.load_index(gallery_copy)
    with pytest.raises(ValueError, match="was built from other embeddings"):
        search.query(setup["model"], gallery_copy, setup["queries"][:1], k=2)
    assert search.query(setup["model"], gallery_copy, setup["queries"][:1], k=2, ann_options={"exact": True})


def test_an_index_of_the_same_count_but_other_embeddings_is_stale(setup, gallery_copy, tmp_path):  # noqa: F811
    approximate_index.build_index(gallery_copy, "hnsw", progress=False)
    other_model = _save_model(str(tmp_path / "other.pt"), seed=1)
    search.index_folder(other_model, setup["folder"], gallery_copy, progress=False)
    with pytest.raises(ValueError, match=r"\(12 items then, 12 now\): the gallery was indexed again"):
        approximate_index.load_index(gallery_copy)


def test_a_missing_or_foreign_index_file_is_named(gallery_copy):
    with pytest.raises(FileNotFoundError, match=fr"no approximate index at {gallery_copy}.ann; build one with"):
        approximate_index.load_index(gallery_copy)
    with open(gallery_copy + ".ann", "wb") as file:
        file.write(b"not an index")
    with pytest.raises(ValueError, match=fr"{gallery_copy}.ann is not an approximate index file \(.*\); rebuild"):
        approximate_index.load_index(gallery_copy)
    shutil.copy(gallery_copy, gallery_copy + ".ann")  # an .npz, but a gallery
    with pytest.raises(ValueError, match=r"is not an approximate index file \(KeyError\)"):
        approximate_index.load_index(gallery_copy)


def test_faiss_missing_says_how_to_install(setup, gallery_copy, monkeypatch):  # noqa: F811
    approximate_index.build_index(gallery_copy, "hnsw", progress=False)
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match="needs faiss, which is not installed: pip install faiss-cpu"):
        approximate_index.new_index(np.zeros((3, 2), np.float32), "hnsw")
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        approximate_index.load_index(gallery_copy)
    real = search.importlib.util.find_spec
    monkeypatch.setattr(search.importlib.util, "find_spec",
                        lambda name, *rest: None if name == "faiss" else real(name, *rest))
    with pytest.raises(ValueError, match="has an approximate index .*needs faiss: pip install faiss-cpu, or pass "
                                         "--exact"):
        search.main(["query", setup["model"], gallery_copy, setup["queries"][0]])
    with pytest.raises(ValueError, match="--ann needs faiss, which is not installed: pip install faiss-cpu"):
        search.main(["index", setup["model"], setup["folder"], "--out", gallery_copy, "--ann", "hnsw"])
    assert search.main(["query", setup["model"], gallery_copy, setup["queries"][0], "--exact"]) == 0


# ---------------------------------------------------------------- recall of a gallery's index

def test_evaluate_recall_against_exact_search(setup, gallery_copy):  # noqa: F811
    approximate_index.build_index(gallery_copy, "ivf", ivf_lists=3, progress=False)
    result = search.evaluate_recall(setup["model"], gallery_copy, k=4, n_queries=5, seed=2,
                                    ann_options={"nprobe": 3})
    assert {key: result[key] for key in ("kind", "parameter", "value", "k", "n_queries", "n_items", "seed",
                                         "recall_at_k")} == \
        {"kind": "ivf", "parameter": "nprobe", "value": 3, "k": 4, "n_queries": 5, "n_items": 12, "seed": 2,
         "recall_at_k": 1.0}
    default = search.evaluate_recall(setup["model"], gallery_copy)
    assert default["n_queries"] == 12 and default["k"] == 10 and default["value"] == 3  # the index's own nprobe
    one_list = search.evaluate_recall(setup["model"], gallery_copy, k=2, ann_options={"nprobe": 1})
    embeddings = search.load_gallery(gallery_copy)["embeddings"]
    loaded = approximate_index.load_index(gallery_copy)
    expected = approximate_index.recall_at_k(approximate_index.search_index(loaded.index, embeddings, 2, nprobe=1)[1],
                                             ref_nearest_neighbours(embeddings, embeddings, 2)[1])
    assert one_list["recall_at_k"] == pytest.approx(expected)


@pytest.mark.parametrize("arguments, error, match", [
    ({"n_queries": 13}, ValueError, "n_queries=13 is more than the gallery's 12 items; pass n_queries <= 12"),
    ({"k": 13}, ValueError, r"k=13 is larger than the gallery .* \(12 images\); pass k <= 12"),
    ({"ann_options": {"exact": True}}, ValueError, "compares the approximate index with exact search; leave out"),
    ({"seed": -3}, ValueError, "seed must be >= 0"),
    ({"ann_options": {"ef_search": 4}}, ValueError, "ef_search does not apply to an ivf index"),
])
def test_evaluate_recall_errors(setup, gallery_copy, arguments, error, match):  # noqa: F811
    approximate_index.build_index(gallery_copy, "ivf", ivf_lists=2, progress=False)
    with pytest.raises(error, match=match):
        search.evaluate_recall(setup["model"], gallery_copy, **arguments)


def test_evaluate_recall_without_an_index_says_how_to_build_one(setup, gallery_copy):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="no approximate index at .*; build one with"):
        search.evaluate_recall(setup["model"], gallery_copy)


# ---------------------------------------------------------------- the command line

def test_cli_index_ann_then_query_classify_evaluate(setup, tmp_path):  # noqa: F811
    out = str(tmp_path / "cli.npz")
    status, stdout, stderr = _run("index", setup["model"], setup["folder"], "--out", out, "--no-progress",
                                  "--ann", "ivf", "--ivf-lists", 3)
    assert status == 0, stderr
    assert stdout.splitlines()[-1] == f"built the ivf approximate index {out}.ann"
    status, stdout, stderr = _run("query", setup["model"], out, *setup["queries"], "--k", 4, "--json", "--nprobe", 3)
    assert status == 0, stderr
    _assert_same_answers(json.loads(stdout), search.query(setup["model"], setup["gallery"], setup["queries"], k=4))
    assert stderr.strip() == f"(approximate search through {out}.ann; --exact searches exactly)"
    status, stdout, stderr = _run("evaluate", setup["model"], out, "--recall", 3, "--queries", 6)
    assert status == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == "| index | parameter | value | gallery | queries | k | recall@k | approximate s | exact s |"
    expected = search.evaluate_recall(setup["model"], out, k=3, n_queries=6)
    assert lines[2].startswith(f"| ivf | nprobe | 3 | 12 | 6 | 3 | {expected['recall_at_k']:.4f} |")


def _main(capsys, *arguments):
    status = cli.run(search.main, "search.py", [str(argument) for argument in arguments])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_classify_and_exact_in_process(setup, gallery_copy, capsys):  # noqa: F811
    approximate_index.build_index(gallery_copy, "hnsw", progress=False)
    status, approximate, note = _main(capsys, "classify", setup["model"], gallery_copy, *setup["queries"], "--k", 3,
                                      "--ef-search", 12)
    assert status == 0 and note.startswith("(approximate search through")
    status, exact, note = _main(capsys, "classify", setup["model"], gallery_copy, *setup["queries"], "--k", 3,
                                "--exact")
    assert status == 0 and note == "" and exact == approximate
    status, _, note = _main(capsys, "query", setup["model"], gallery_copy, setup["queries"][0], "--faiss")
    assert status == 0 and note == ""  # --faiss searches exactly


INDEX = ("index", "{model}", "{folder}", "--out", "{gallery}", "--no-progress")
QUERY = ("query", "{model}", "{gallery}", "{query}")


@pytest.mark.parametrize("arguments, match", [
    (INDEX + ("--ann", "ivf", "--hnsw-m", 8), "--hnsw-m applies to --ann hnsw"),
    (INDEX + ("--ivf-lists", 8), "--ivf-lists applies to --ann ivf"),
    (INDEX + ("--ann", "lsh"), "argument --ann: invalid choice: 'lsh'"),
    (INDEX + ("--ann", "hnsw", "--hnsw-m", 1), "hnsw_m must be >= 2"),
    (INDEX + ("--ann", "ivf", "--ivf-lists", 13), r"ivf_lists=13 is larger than the gallery \(12 items\)"),
    (QUERY + ("--nprobe", 2), "nprobe does not apply to an hnsw index"),
    (QUERY + ("--ef-search", 0), "ef_search must be >= 1"),
    (QUERY + ("--exact", "--ef-search", 9), "exact search was asked for"),
    (QUERY + ("--faiss", "--ef-search", 9), "use_faiss searches exactly"),
    (("evaluate", "{model}", "{gallery}", "--queries", 3), "--queries applies with --recall"),
    (("evaluate", "{model}", "{gallery}", "--recall", 0), "k must be >= 1"),
    (("evaluate", "{model}", "{gallery}", "--nprobe", 3), "--nprobe applies with --recall"),
])
def test_cli_mistakes_are_one_line(setup, gallery_copy, capsys, arguments, match):  # noqa: F811
    approximate_index.build_index(gallery_copy, "hnsw", progress=False)
    names = {"model": setup["model"], "folder": setup["folder"], "gallery": gallery_copy, "query": setup["queries"][0]}
    status, _, error = _main(capsys, *[str(argument).format(**names) for argument in arguments])
    assert status == 2 and error.startswith("search.py: error: ") and len(error.splitlines()) == 1
    assert re.search(match, error), error


def test_cli_parameter_without_an_index(setup, gallery_copy, capsys):  # noqa: F811
    status, _, error = _main(capsys, "query", setup["model"], gallery_copy, setup["queries"][0], "--nprobe", 2)
    assert status == 2 and "the gallery has no approximate index; build one with" in error
