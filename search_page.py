"""The search page: a local web page that searches a gallery with its model file (``search.py serve``).

Drop or pick an image on the page and it shows the k nearest gallery images with labels and distances,
the open-set answer when the gallery is calibrated (``open_set``), and a 2-D map of the gallery (PCA,
t-SNE, or UMAP when umap-learn is installed; ``projections``) with the query placed on it. The model and
gallery are loaded once (``SearchPage``); each map is computed on the first request for it, on a seeded
subset of at most ``MAP_POINTS`` gallery items, and kept in memory for the server's life (its gallery
never changes while it runs).

The server is the standard library's ``http.server`` (``ThreadingHTTPServer``) with one static page,
``search_page.html`` (HTML, CSS and JavaScript, no external script), rather than Gradio or a web framework:
no extra dependency, it works offline, the whole page is one small file tested in a real browser, and the
HTTP surface is the handful of endpoints below, each checked here. It binds 127.0.0.1 unless told
otherwise. Endpoints (errors are JSON ``{"error": message}`` with status 400, 404, 411 or 413):

- ``GET /``: the page; ``GET /info``: the gallery's size, classes, k, calibration and projections;
- ``POST /query``: the image file as the body (at most ``MAX_UPLOAD_BYTES``; its name URL-encoded in the
  ``X-Filename`` header), decoded by ``image_folders.read_image`` from a temporary file as the command
  line decodes images: its neighbours, open-set answer and embedding;
- ``GET /map?projection=pca``: the map's points, their gallery indices and labels;
- ``POST /place``: ``{"projection", "embedding"}`` -> the query's position on that map;
- ``GET /thumbnail/<index>``: the gallery image at that index as a PNG (by index only, never by path).

The k-NN search over the gallery is handed in (``find_neighbours``, e.g. ``search.gallery_search``'s: through
the gallery's approximate index when it has one, as the command line's query does), so that search.py, which
owns searching, starts this page without this module importing it.
"""

import json
import os
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import torch
from PIL import Image

from gallery import embed_files, neighbour_items
from image_folders import read_image
from open_set import calibrated_thresholds, open_set_labels
from projections import PROJECTION_NAMES, available_projections, pca_axes, project_2d, subsample
from utils import check_int

PAGE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "search_page.html")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_PORT = 65535
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_JSON_BYTES = 1024 * 1024  # a /place request: one embedding
# an oversized upload is read and dropped up to this size, so that the browser receives the 413 answer
# (a connection closed before the body is read reaches the page as a network error); beyond it, closed
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
MAP_POINTS = 3000
MAP_SEED = 0
PLACEMENT_NEIGHBOURS = 5
THUMBNAIL_PIXELS = 96


class RequestError(ValueError):
    """A request the page cannot answer: ``status`` (HTTP) and a message saying what to do."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class SearchPage:
    """What the page answers from: a model (with its model file's ``info``), its gallery dict
    (``gallery.load_gallery``) and the k-NN search over that gallery ``find_neighbours(queries (Q, D), k,
    rows=None, exact=False) -> (distances (Q, k), indices (Q, k))`` (``rows``: increasing gallery ids to search
    among, the indices then positions into them; ``exact``: search exactly; ``search.gallery_search`` gives
    one); ``k`` neighbours per query (1 <= k <= G); maps on at most ``map_points`` gallery items. Raises
    ValueError naming k or map_points when out of range."""

    def __init__(self, model, info, gallery, find_neighbours, k=5, map_points=MAP_POINTS):
        self.model, self.info, self.gallery, self.find_neighbours = model, info, gallery, find_neighbours
        n_items = len(gallery["embeddings"])
        self.k = check_int(k, "k", 1)
        if self.k > n_items:
            raise ValueError(f"k={k} is larger than the gallery ({n_items} images); pass --k {n_items} or less")
        self.map_indices = subsample(n_items, check_int(map_points, "map_points", 1), MAP_SEED).numpy()
        self.thresholds = calibrated_thresholds(gallery)
        self._maps, self._map_locks = {}, {name: threading.Lock() for name in available_projections()}
        self._model_lock = threading.Lock()  # one forward pass at a time through the one model

    def describe(self):
        """``/info``: a dict of the gallery's size, embedding width, class names, k, the calibrated precisions
        (ascending), the projections available ({name: display name}) and the map's size."""
        return {"n_images": len(self.gallery["embeddings"]), "embedding_dim": int(self.gallery["embedding_dim"]),
                "class_names": [str(name) for name in self.gallery["class_names"]], "k": self.k,
                "precisions": sorted(self.thresholds),
                "projections": {name: PROJECTION_NAMES[name] for name in available_projections()},
                "map_points": len(self.map_indices), "max_upload_bytes": MAX_UPLOAD_BYTES}

    def query(self, data, name):
        """``/query``: the upload ``data`` (bytes of an image file called ``name``) decoded and searched.
        Returns ``{"name", "neighbours": k dicts (gallery.neighbour_items), "open_set": one dict {"precision",
        "threshold", "label"} per calibrated precision (empty when uncalibrated or the nearest item is
        unlabelled), "embedding": D floats}``. Raises RequestError (400) for an empty or unreadable file."""
        if not data:
            raise RequestError(400, f"the upload {name!r} is empty; pick an image file")
        embedding = self._embed_upload(data, name)
        distances, indices = self.find_neighbours(embedding, self.k)
        neighbours = neighbour_items(self.gallery, distances, indices)[0]
        nearest = neighbours[0]
        open_set = [] if nearest["label"] is None else [
            {"precision": precision, "threshold": threshold,
             "label": open_set_labels([nearest["distance"]], [nearest["label"]], threshold)[0]}
            for precision, threshold in sorted(self.thresholds.items())]
        return {"name": name, "neighbours": neighbours, "open_set": open_set, "embedding": embedding[0].tolist()}

    def _embed_upload(self, data, name):
        """(1, D) float32 embedding of an uploaded file, read from a temporary file as the command line reads."""
        with tempfile.TemporaryDirectory(prefix="search-page-") as folder:
            path = os.path.join(folder, "upload")
            with open(path, "wb") as file:
                file.write(data)
            try:
                with self._model_lock:
                    embedding, _ = embed_files(self.model, self.info, [path])
            except ValueError as error:
                # the decoder's own reason, with the temporary file's path replaced by the upload's name
                reason = str(error.__cause__ or error).replace(path, name)
                raise RequestError(400, f"{name!r} is not an image that can be read ({reason}); pick a PNG, "
                                        "JPEG, BMP, WebP, GIF or TIFF image") from None
        return embedding

    def projected_map(self, projection):
        """``/map``: the gallery's map by ``projection``, computed on the first call and kept. Returns
        ``{"projection", "name", "points": n [x, y] pairs, "indices": n gallery indices, "labels": n label ids
        (-1 unlabelled), "n_images", "seconds"}``. Raises RequestError (400) for a projection not offered."""
        return {key: value for key, value in self._map(projection).items() if key not in ("mean", "axes")}

    def _map(self, projection):
        if projection not in self._map_locks:
            raise RequestError(400, f"projection must be one of {', '.join(self._map_locks)}, got {projection!r}")
        with self._map_locks[projection]:  # the first request computes; the others wait for it
            if projection not in self._maps:
                self._maps[projection] = self._compute_map(projection)
        return self._maps[projection]

    def _compute_map(self, projection):
        embeddings = self.gallery["embeddings"][self.map_indices]
        name = PROJECTION_NAMES[projection]
        print(f"computing the {name} map of {len(embeddings)} gallery images...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        points = project_2d(embeddings, projection, seed=MAP_SEED)
        seconds = time.perf_counter() - start
        print(f"the {name} map took {seconds:.1f} s", file=sys.stderr, flush=True)
        mean, axes = pca_axes(embeddings) if projection == "pca" else (None, None)
        return {"projection": projection, "name": name, "points": points.tolist(),
                "indices": self.map_indices.tolist(), "labels": self.gallery["labels"][self.map_indices].tolist(),
                "n_images": len(self.gallery["embeddings"]), "seconds": seconds, "mean": mean, "axes": axes}

    def place(self, projection, embedding):
        """``/place``: where a query's ``embedding`` (D floats) sits on the ``projection`` map. PCA projects it
        on the map's axes; t-SNE and UMAP cannot place a new point, so it goes to the mean of its
        ``PLACEMENT_NEIGHBOURS`` nearest map points' positions weighted by 1 / distance. Returns
        ``{"x", "y", "how": a sentence saying which}``. Raises RequestError (400) for a bad embedding."""
        chosen = self._map(projection)
        try:
            vector = np.asarray(embedding, dtype=np.float32).reshape(1, -1)
        except (TypeError, ValueError):
            vector = np.empty((0, 0), dtype=np.float32)
        if vector.shape[1] != self.gallery["embedding_dim"] or not np.isfinite(vector).all():
            raise RequestError(400, f"embedding must be a list of {self.gallery['embedding_dim']} finite numbers, "
                                    "as /query returns it")
        if chosen["mean"] is not None:
            x, y = ((torch.from_numpy(vector).double() - chosen["mean"]) @ chosen["axes"])[0].tolist()
            return {"x": x, "y": y, "how": "projected onto the map's principal axes"}
        k = min(PLACEMENT_NEIGHBOURS, len(self.map_indices))
        # among the map's few items exactly: an approximate index filtered down to them may find fewer than k
        distances, rows = self.find_neighbours(vector, k, rows=self.map_indices, exact=True)
        weights = 1.0 / np.maximum(np.asarray(distances, dtype=np.float64)[0], 1e-12)
        x, y = (weights @ np.asarray(chosen["points"])[np.asarray(rows)[0]]) / weights.sum()
        return {"x": float(x), "y": float(y),
                "how": f"{chosen['name']} cannot place a new point: the query is drawn at the mean of its {k} "
                       "nearest map points' positions, weighted by 1 / distance"}

    def thumbnail(self, index_text):
        """``/thumbnail/<index>``: PNG bytes of the gallery image at ``index_text`` (decimal digits),
        ``THUMBNAIL_PIXELS`` square. Raises RequestError (404) for an index outside the gallery or an image
        that can no longer be read."""
        n_items = len(self.gallery["embeddings"])
        if not index_text.isdigit() or int(index_text) >= n_items:
            raise RequestError(404, f"no gallery image {index_text!r}: the gallery holds images 0 to {n_items - 1}")
        path = str(self.gallery["paths"][int(index_text)])
        try:
            pixels = read_image(path, THUMBNAIL_PIXELS, 3)
        except ValueError as error:
            raise RequestError(404, f"gallery image {index_text} ({path}) can no longer be read ({error.__cause__})")
        buffer = BytesIO()
        Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), "RGB").save(buffer, "PNG")
        return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    """One request: routes it to the server's ``SearchPage``; every error is a JSON answer, never a crash."""

    server_version = "siamese-triplet-search"

    def do_GET(self):  # noqa: N802 (http.server's name)
        self._answer(self._get)

    def do_POST(self):  # noqa: N802
        self._answer(self._post)

    def _get(self, page, path, parameters):
        if path == "/":
            with open(PAGE_FILE, "rb") as file:
                return 200, "text/html; charset=utf-8", file.read()
        if path == "/info":
            return self._json(page.describe())
        if path == "/map":
            return self._json(page.projected_map(parameters.get("projection", ["pca"])[0]))
        if path.startswith("/thumbnail/"):
            return 200, "image/png", page.thumbnail(path[len("/thumbnail/"):])
        raise RequestError(404, f"no page {path}; open / instead")

    def _post(self, page, path, parameters):
        if path == "/query":
            name = unquote(self.headers.get("X-Filename", "")) or "upload"
            return self._json(page.query(self._body(MAX_UPLOAD_BYTES, f"the image {name!r}"), name))
        if path == "/place":
            try:
                request = json.loads(self._body(MAX_JSON_BYTES, "the placement request"))
                projection, embedding = request["projection"], request["embedding"]
            except (ValueError, KeyError, TypeError):
                raise RequestError(400, 'send {"projection": name, "embedding": [numbers]} as JSON') from None
            return self._json(page.place(projection, embedding))
        raise RequestError(404, f"nothing to POST at {path}; POST an image to /query")

    def _body(self, limit, what):
        """The request's body, at most ``limit`` bytes; RequestError (411, 413) otherwise."""
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise RequestError(411, f"{what} came without a Content-Length; send it as a plain request body")
        length = int(length)
        if length > limit:
            if length <= DRAIN_LIMIT_BYTES:
                for start in range(0, length, 1 << 16):
                    self.rfile.read(min(1 << 16, length - start))
            else:
                self.close_connection = True
            raise RequestError(413, f"{what} is {length:,} bytes, over the limit of {limit:,} bytes "
                                    f"({limit / 2**20:g} MB); pick a smaller file")
        return self.rfile.read(length)

    @staticmethod
    def _json(value):
        return 200, "application/json", json.dumps(value).encode()

    def _answer(self, route):
        url = urlsplit(self.path)
        try:
            status, content_type, body = route(self.server.page, url.path, parse_qs(url.query))
        except RequestError as error:
            status, content_type, body = error.status, "application/json", json.dumps({"error": str(error)}).encode()
        except Exception as error:  # a bug: reported to the page and logged; the server keeps serving
            traceback.print_exc()
            message = f"internal error ({type(error).__name__}: {error}); see the server's log"
            status, content_type, body = 500, "application/json", json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        if isinstance(code, int) and code >= 400:  # the successful requests are the page working: not logged
            super().log_request(code, size)


def make_server(page, host=DEFAULT_HOST, port=DEFAULT_PORT):
    """A ``ThreadingHTTPServer`` answering the page's endpoints from ``page`` (a ``SearchPage``) on host:port
    (port 0: any free port; ``server.server_address`` says which), not yet serving. Raises OSError saying
    which address could not be bound, ValueError for a port outside 0 to 65535."""
    if check_int(port, "port", 0) > MAX_PORT:
        raise ValueError(f"port must be between 0 and {MAX_PORT} (0: any free port), got {port}")
    try:
        server = ThreadingHTTPServer((host, port), _Handler)
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port} ({error.strerror or error}); pass another --port or --host")
    server.daemon_threads = True
    server.page = page
    return server


def serve(server):
    """Serve ``server`` (``make_server``'s) until Ctrl-C, printing its address; closes it and returns None."""
    page = server.page
    host, port = server.server_address[:2]
    if host not in ("127.0.0.1", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this machine can use the page and see the "
              "gallery's images", file=sys.stderr)
    print(f"serving {len(page.gallery['embeddings'])} gallery images at http://{host}:{port}/ (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
