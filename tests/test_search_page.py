"""Tests of search_page.py (``search.py serve``): every endpoint over HTTP against a server on a free port in a
thread, compared with search.query, read_image and brute-force references; every error answer (bad upload,
too large, empty, no length, bad index, bad projection, bad embedding) with the server still serving after
it; the command line; and the page itself in a real browser (headless Chromium with Selenium), skipped with
the missing piece named where no browser is installed.

``SEARCH_PAGE_SCREENSHOT=images/search_page.png python -m pytest tests/test_search_page.py -k browser``
also saves the README's screenshot of the page."""

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image

import search
import search_page
from gallery import embed_files, load_gallery, model_and_gallery
from image_folders import read_image
from open_set import UNKNOWN, calibrated_thresholds, open_set_labels
from projections import available_projections, project_2d, subsample
from test_search import CLASSES, DIM, REPO_ROOT, _draw, _save_model

PER_CLASS = 8
K = 3
MAP_POINTS = 20  # under the gallery's 24 images, so the map is a subset
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A gallery of 3 classes x 8 drawn shapes, calibrated at precisions 0.8 (a threshold that accepts the first
    query) and 0.99 (one that rejects it); a server on a free port answering from it, in a thread."""
    root = tmp_path_factory.mktemp("page")
    rng = np.random.default_rng(1)
    for shape in CLASSES:
        os.makedirs(root / "shapes" / shape)
        for number in range(PER_CLASS):
            _draw(shape, rng).save(root / "shapes" / shape / f"{number}.png")
    queries = []
    for shape in CLASSES:
        queries.append(str(root / f"query_{shape}.png"))
        _draw(shape, rng).save(queries[-1])
    model_path = _save_model(str(root / "model.pt"), seed=0)
    plain = search.index_folder(model_path, str(root / "shapes"), str(root / "plain.npz"), progress=False)
    nearest = search.query(model_path, plain, queries[:1], k=1)[0]["neighbours"][0]["distance"]
    thresholds = {0.8: 2 * nearest, 0.99: nearest / 2}
    calibrated = str(root / "calibrated.npz")
    with np.load(plain, allow_pickle=False) as file:
        arrays = dict(file)
    np.savez(calibrated, **arrays, calibration_precisions=np.array(list(thresholds)),
             calibration_thresholds=np.array(list(thresholds.values())),
             calibration_curve=np.array([[nearest, 1.0, 0.5]]))
    model, info, gallery = model_and_gallery(model_path, calibrated)
    page = search_page.SearchPage(model, info, gallery, search.gallery_search(calibrated, gallery), k=K,
                                  map_points=MAP_POINTS)
    server = search_page.make_server(page, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"root": root, "queries": queries, "model": model_path, "plain": plain, "calibrated": calibrated,
           "thresholds": thresholds, "page": page, "gallery": gallery, "info": info,
           "url": f"http://127.0.0.1:{server.server_address[1]}"}
    server.shutdown()
    server.server_close()


def _request(setup, path, data=None, headers=None):
    """(status, body bytes) of a GET (or a POST with ``data``) to the test server."""
    request = urllib.request.Request(setup["url"] + path, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _json(setup, path, data=None, headers=None):
    status, body = _request(setup, path, data, headers)
    return status, json.loads(body)


def _upload(setup, path):
    with open(path, "rb") as file:
        return _json(setup, "/query", file.read(), {"X-Filename": os.path.basename(path)})


def _still_serving(setup):
    assert _json(setup, "/info")[0] == 200


# ---------------------------------------------------------------- the endpoints

def test_the_page_and_its_info(setup):
    status, body = _request(setup, "/")
    assert status == 200 and b'<canvas id="map"' in body and b"<script src" not in body  # no external script
    status, info = _json(setup, "/info")
    assert status == 200
    assert info["n_images"] == 3 * PER_CLASS and info["embedding_dim"] == DIM and info["k"] == K
    assert info["class_names"] == list(CLASSES) and info["precisions"] == [0.8, 0.99]
    assert list(info["projections"]) == list(available_projections()) and info["map_points"] == MAP_POINTS


def test_query_answers_as_search_query_with_the_open_set_answer(setup):
    for path in setup["queries"]:
        status, result = _upload(setup, path)
        assert status == 200 and result["name"] == os.path.basename(path)
        expected = search.query(setup["model"], setup["calibrated"], [path], k=K)[0]["neighbours"]
        assert [(item["index"], item["path"], item["label"]) for item in result["neighbours"]] == \
            [(item["index"], item["path"], item["label"]) for item in expected]
        np.testing.assert_allclose([item["distance"] for item in result["neighbours"]],
                                   [item["distance"] for item in expected], rtol=1e-6)
        nearest = expected[0]
        assert result["open_set"] == [
            {"precision": precision, "threshold": threshold,
             "label": nearest["label"] if nearest["distance"] <= threshold else UNKNOWN}
            for precision, threshold in sorted(setup["thresholds"].items())]
        embedding = embed_files(*model_and_gallery(setup["model"], setup["plain"])[:2], [path])[0]
        np.testing.assert_allclose(result["embedding"], embedding[0], rtol=1e-6)
    # the thresholds were set around the first query: accepted at 0.8, unknown at 0.99
    first = _upload(setup, setup["queries"][0])[1]
    assert [item["label"] for item in first["open_set"]] == [first["neighbours"][0]["label"], UNKNOWN]


def test_an_uncalibrated_gallery_gives_no_open_set_answer(setup):
    loaded = model_and_gallery(setup["model"], setup["plain"])
    page = search_page.SearchPage(*loaded, search.gallery_search(setup["plain"], loaded[2]), k=2)
    with open(setup["queries"][1], "rb") as file:
        result = page.query(file.read(), "q.png")
    assert result["open_set"] == [] and len(result["neighbours"]) == 2 and page.describe()["precisions"] == []


def test_thumbnails_by_index(setup):
    gallery = setup["gallery"]
    for index in (0, len(gallery["paths"]) - 1):
        status, body = _request(setup, f"/thumbnail/{index}")
        assert status == 200
        pixels = np.asarray(Image.open(BytesIO(body)).convert("RGB"), dtype=np.float32) / 255
        expected = read_image(str(gallery["paths"][index]), search_page.THUMBNAIL_PIXELS, 3).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(pixels, expected, atol=0.5 / 255 + 1e-6)


@pytest.mark.parametrize("index", ["24", "1000", "-1", "abc", "1.5", "..%2F..%2Fplain.npz", "%2Fetc%2Fpasswd", ""])
def test_a_bad_thumbnail_index_is_404_naming_the_range(setup, index):
    status, answer = _json(setup, f"/thumbnail/{index}")
    assert status == 404 and "the gallery holds images 0 to 23" in answer["error"]
    _still_serving(setup)


def test_a_gallery_image_that_is_gone_is_404_naming_it(setup):
    gallery = dict(setup["gallery"], paths=np.array([str(setup["root"] / "gone.png")] * 24))
    page = search_page.SearchPage(setup["page"].model, setup["info"], gallery,
                                  search.gallery_search(setup["calibrated"], gallery))
    with pytest.raises(search_page.RequestError, match="gone.png.*can no longer be read") as caught:
        page.thumbnail("3")
    assert caught.value.status == 404


@pytest.mark.parametrize("content, message", [
    (b"", "is empty; pick an image file"),
    (b"this is text, not an image", "'bad.png' is not an image that can be read"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "'bad.png' is not an image that can be read"),
])
def test_a_bad_upload_is_an_error_message_and_the_server_keeps_serving(setup, content, message):
    status, answer = _json(setup, "/query", content, {"X-Filename": "bad.png"})
    assert status == 400 and message in answer["error"]
    assert "search-page-" not in answer["error"]  # names the upload, not the temporary file
    _still_serving(setup)


def test_a_truncated_image_is_refused(setup):
    with open(setup["queries"][0], "rb") as file:
        data = file.read()
    status, answer = _json(setup, "/query", data[:len(data) // 2], {"X-Filename": "half.png"})
    assert status == 400 and "'half.png' is not an image that can be read" in answer["error"]


def test_a_too_large_upload_is_413_and_the_server_keeps_serving(setup):
    limit = search_page.MAX_UPLOAD_BYTES
    status, answer = _json(setup, "/query", b"\0" * (limit + 1), {"X-Filename": "big.png"})
    assert status == 413 and f"{limit + 1:,} bytes, over the limit of {limit:,} bytes (10 MB)" in answer["error"]
    _still_serving(setup)


def test_an_upload_without_a_length_is_411(setup):
    connection = http.client.HTTPConnection("127.0.0.1", int(setup["url"].rsplit(":", 1)[1]), timeout=30)
    connection.putrequest("POST", "/query")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411 and "without a Content-Length" in json.loads(response.read())["error"]
    connection.close()


def test_unknown_paths_are_404(setup):
    assert _json(setup, "/etc/passwd")[0] == 404
    status, answer = _json(setup, "/elsewhere", b"x")
    assert status == 404 and "POST an image to /query" in answer["error"]


def test_each_map_is_computed_once_on_the_seeded_subset(setup, monkeypatch):
    calls = []
    monkeypatch.setattr(search_page, "project_2d", lambda *a, **k: calls.append(a[1]) or project_2d(*a, **k))
    page, gallery = setup["page"], setup["gallery"]
    page._maps.clear()
    chosen = subsample(len(gallery["embeddings"]), MAP_POINTS, search_page.MAP_SEED).numpy()
    for projection in available_projections():
        first = _json(setup, f"/map?projection={projection}")[1]
        assert _json(setup, f"/map?projection={projection}")[1] == first
        assert first["indices"] == chosen.tolist() and first["labels"] == gallery["labels"][chosen].tolist()
        assert first["n_images"] == 24 and np.isfinite(first["points"]).all()
        np.testing.assert_allclose(first["points"], project_2d(gallery["embeddings"][chosen], projection))
    assert calls == list(available_projections())


def test_a_projection_not_offered_is_400(setup, monkeypatch):
    for projection in ("nope", "umap" if "umap" not in available_projections() else "UMAP"):
        status, answer = _json(setup, f"/map?projection={projection}")
        assert status == 400 and "projection must be one of pca, tsne" in answer["error"]


def test_the_query_is_placed_on_each_map(setup):
    gallery = setup["gallery"]
    chosen = subsample(len(gallery["embeddings"]), MAP_POINTS, search_page.MAP_SEED).numpy()
    embedding = _upload(setup, setup["queries"][2])[1]["embedding"]
    mapped = torch.from_numpy(gallery["embeddings"][chosen]).double()
    status, placed = _json(setup, "/place", json.dumps({"projection": "pca", "embedding": embedding}).encode())
    # brute force: the query's coordinates on the top two principal axes (up to each axis' sign)
    centred = mapped - mapped.mean(0)
    axes = torch.linalg.eigh(centred.T @ centred).eigenvectors[:, [-1, -2]]
    expected = (torch.tensor(embedding, dtype=torch.float64) - mapped.mean(0)) @ axes
    points = np.asarray(_json(setup, "/map?projection=pca")[1]["points"])
    signs = np.sign(np.sum(points * (centred @ axes).numpy(), axis=0))
    np.testing.assert_allclose([placed["x"], placed["y"]], expected.numpy() * signs, atol=1e-4)
    assert "principal axes" in placed["how"]
    status, placed = _json(setup, "/place", json.dumps({"projection": "tsne", "embedding": embedding}).encode())
    distances = torch.cdist(torch.tensor([embedding], dtype=torch.float64), mapped)[0]
    nearest = distances.argsort()[:search_page.PLACEMENT_NEIGHBOURS]
    weights = 1 / distances[nearest]
    tsne = torch.tensor(_json(setup, "/map?projection=tsne")[1]["points"], dtype=torch.float64)
    np.testing.assert_allclose([placed["x"], placed["y"]], (weights @ tsne[nearest] / weights.sum()).numpy(),
                               rtol=1e-4)
    assert "t-SNE cannot place a new point" in placed["how"]


@pytest.mark.parametrize("body", [b"not json", b'{"projection": "pca"}', b'{"projection": "pca", "embedding": [1]}',
                                  b'{"projection": "pca", "embedding": "abc"}',
                                  b'{"projection": "pca", "embedding": [NaN, 0, 0, 0, 0, 0, 0, 0]}',
                                  b'{"projection": "nope", "embedding": [0, 0, 0, 0, 0, 0, 0, 0]}'])
def test_a_bad_placement_request_is_400(setup, body):
    status, answer = _json(setup, "/place", body)
    assert status == 400 and answer["error"]
    _still_serving(setup)


def test_a_bug_is_a_500_answer_and_the_server_keeps_serving(setup, monkeypatch, capsys):
    monkeypatch.setattr(setup["page"], "describe", lambda: 1 / 0)
    status, answer = _json(setup, "/info")
    assert status == 500 and "internal error (ZeroDivisionError" in answer["error"]
    monkeypatch.undo()
    _still_serving(setup)


def test_the_page_searches_through_the_galleries_approximate_index_as_query_does(setup, tmp_path, monkeypatch):
    """A gallery with an approximate index: the page's neighbours are query's (through the index), its map
    placement searches the map's items through it too, and --exact / --faiss search exactly."""
    pytest.importorskip("faiss")
    import approximate_index
    indexed = str(tmp_path / "indexed.npz")
    shutil.copy(setup["plain"], indexed)
    approximate_index.build_index(indexed, "hnsw", progress=False)
    loaded = model_and_gallery(setup["model"], indexed)
    expected = search.query(setup["model"], indexed, setup["queries"][2:], k=K, ann_options={
        "exact": False, "ef_search": 8, "nprobe": None})[0]["neighbours"]
    exactly = search.query(setup["model"], setup["plain"], setup["queries"][2:], k=K)[0]["neighbours"]
    searched = []
    original = search.search_index
    monkeypatch.setattr(search, "search_index", lambda *args, **kwargs: searched.append(kwargs.get("subset"))
                        or original(*args, **kwargs))
    page = search_page.SearchPage(*loaded, search.gallery_search(indexed, loaded[2], ann_options={
        "exact": False, "ef_search": 8, "nprobe": None}), k=K, map_points=MAP_POINTS)
    searched.clear()  # building it checked the options with a search of no queries
    with open(setup["queries"][2], "rb") as file:
        answer = page.query(file.read(), "q.png")
    assert [item["index"] for item in answer["neighbours"]] == [item["index"] for item in expected]
    assert len(searched) == 1 and searched[0] is None  # the whole gallery, through the index
    if "tsne" in available_projections():  # placed among the map's items, exactly: no search of the index
        placed = page.place("tsne", answer["embedding"])
        assert len(searched) == 1 and placed == search_page.SearchPage(*loaded, search.gallery_search(
            setup["plain"], loaded[2]), k=K, map_points=MAP_POINTS).place("tsne", answer["embedding"])
    searched.clear()
    for exact in (search.gallery_search(indexed, loaded[2], ann_options={"exact": True, "ef_search": None,
                                                                          "nprobe": None}),
                  search.gallery_search(indexed, loaded[2], use_faiss=True)):
        with open(setup["queries"][2], "rb") as file:
            exact_answer = search_page.SearchPage(*loaded, exact, k=K).query(file.read(), "q.png")
        assert searched == [] and [item["index"] for item in exact_answer["neighbours"]] == [
            item["index"] for item in exactly]
    with pytest.raises(ValueError, match="use_faiss searches exactly"):
        search.gallery_search(indexed, loaded[2], use_faiss=True, ann_options={"exact": False, "ef_search": 8,
                                                                               "nprobe": None})
    with pytest.raises(ValueError, match="nprobe"):  # checked when the page is built, not at the first query
        search.gallery_search(indexed, loaded[2], ann_options={"exact": False, "ef_search": None, "nprobe": 4})
    served = []
    monkeypatch.setattr(search, "serve", lambda server: served.append(server) or server.server_close())
    with pytest.raises(ValueError, match="nprobe does not apply to an hnsw index"):
        search.main(["serve", setup["model"], indexed, "--nprobe", "4", "--port", "0"])
    assert served == []  # refused before listening
    assert search.main(["serve", setup["model"], indexed, "--ef-search", "8", "--port", "0"]) == 0
    assert search.main(["serve", setup["model"], indexed, "--exact", "--port", "0"]) == 0 and len(served) == 2


# ---------------------------------------------------------------- arguments and the command line

def test_bad_arguments_are_named(setup):
    loaded = model_and_gallery(setup["model"], setup["plain"])
    find = search.gallery_search(setup["plain"], loaded[2])
    with pytest.raises(ValueError, match="k=25 is larger than the gallery .24 images.; pass --k 24"):
        search_page.SearchPage(*loaded, find, k=25)
    with pytest.raises(ValueError, match="k"):
        search_page.SearchPage(*loaded, find, k=0)
    with pytest.raises(ValueError, match="map_points"):
        search_page.SearchPage(*loaded, find, map_points=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} .*; pass another --port"):
            search.main(["serve", setup["model"], setup["plain"], "--port", str(port)])
    with pytest.raises(ValueError, match="port must be >= 0, got -1"):
        search.main(["serve", setup["model"], setup["plain"], "--port", "-1"])
    with pytest.raises(ValueError, match="port must be between 0 and 65535 .0: any free port., got 70000"):
        search.main(["serve", setup["model"], setup["plain"], "--port", "70000"])


def test_the_command_serves_the_page(setup):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "search.py", "serve", setup["model"], setup["plain"], "--port", "0",
                                "--k", "2"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment)
    try:
        line = process.stdout.readline()
        assert line.startswith("serving 24 gallery images at http://127.0.0.1:"), process.stderr.read()
        url = line.split(" at ")[1].split()[0].rstrip("/")
        with open(setup["queries"][0], "rb") as file:
            request = urllib.request.Request(url + "/query", data=file.read())
        with urllib.request.urlopen(request, timeout=60) as response:
            assert len(json.loads(response.read())["neighbours"]) == 2
    finally:
        process.terminate()
        process.communicate(timeout=30)


# ---------------------------------------------------------------- open_set, as the page uses it

def test_open_set_answers_and_thresholds(setup):
    assert open_set_labels(torch.tensor([0.5, 0.5000001, 0.1]), ["a", "b", "c"], 0.5) == ["a", UNKNOWN, "c"]
    assert calibrated_thresholds(load_gallery(setup["plain"])) == {}
    assert calibrated_thresholds(load_gallery(setup["calibrated"])) == pytest.approx(setup["thresholds"])
    with pytest.raises(ValueError, match="nearest_labels"):
        open_set_labels(np.zeros(2), ["a"], 1.0)
    with pytest.raises(ValueError, match="calibration_thresholds"):
        calibrated_thresholds({"calibration_precisions": np.zeros(2), "calibration_thresholds": np.zeros(3)})


# ---------------------------------------------------------------- the page in a browser

def _browser():
    """A headless Chromium driven by Selenium, or pytest.skip naming what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium): the page's browser test needs it")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.path.exists(path) and shutil.which(os.path.basename(path)) is None:
            pytest.skip(f"{path} is missing (apt-get install {package}): the page's browser test needs it")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1300,900"):
        options.add_argument(argument)
    driver_path = CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else shutil.which("chromedriver")
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_the_page_in_a_browser(setup, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser = _browser()
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(setup["url"] + "/")
        canvas = browser.find_element(By.ID, "map")
        wait.until(lambda _: canvas.get_attribute("data-projection") == "pca")
        browser.find_element(By.ID, "file").send_keys(setup["queries"][0])
        wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#neighbours .neighbour")) == K)
        nearest = search.query(setup["model"], setup["calibrated"], setup["queries"][:1], k=K)[0]["neighbours"]
        cards = [card.text for card in browser.find_elements(By.CSS_SELECTOR, "#neighbours .neighbour")]
        assert cards == [f"{rank}. {item['label']}\nd = {item['distance']:.3f}" for rank, item in enumerate(nearest, 1)]
        answer = browser.find_element(By.ID, "answer").text.splitlines()
        assert answer[0].startswith("at precision 0.8 ") and answer[0].endswith(nearest[0]["label"])
        assert answer[1].startswith("at precision 0.99 ") and answer[1].endswith(UNKNOWN)
        wait.until(lambda _: canvas.get_attribute("data-query") == "placed")
        Select(browser.find_element(By.ID, "projection")).select_by_value("tsne")
        wait.until(lambda _: canvas.get_attribute("data-projection") == "tsne")
        wait.until(lambda _: "t-SNE cannot place" in browser.find_element(By.ID, "placement-note").text)
        x, y = browser.execute_script("return mapPixel(0)")
        ActionChains(browser).move_to_element_with_offset(canvas, x - canvas.size["width"] / 2,
                                                          y - canvas.size["height"] / 2).perform()
        tooltip = browser.find_element(By.ID, "tooltip")
        wait.until(lambda _: tooltip.is_displayed() and browser.execute_script(
            "const image = document.querySelector('#tooltip img'); return image && image.naturalWidth > 0"))
        chosen = subsample(24, MAP_POINTS, search_page.MAP_SEED)[0].item()
        assert f"(#{chosen})" in tooltip.text
        screenshot = os.environ.get("SEARCH_PAGE_SCREENSHOT")
        if screenshot:
            browser.save_screenshot(screenshot)
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        error = browser.find_element(By.ID, "error")
        wait.until(lambda _: error.is_displayed())
        assert "'notes.png' is not an image that can be read" in error.text
        _still_serving(setup)
    finally:
        browser.quit()
