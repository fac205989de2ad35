"""Benchmark of search.py: indexing throughput and k-NN query latency, exact chunked search next to faiss.

Run from the repository root:

    python benchmarks/bench_search.py            # about 2 minutes on 2 CPU cores
    python benchmarks/bench_search.py --quick    # 500 images, galleries of 10^4 and 10^5 only
    OMP_NUM_THREADS=1 python benchmarks/bench_search.py --ann   # approximate indexes at 10^6 (about 10 minutes)

Indexing: a generated folder of small PNGs (10 class folders, 28 px grey) indexed by ``index_folder`` with a
small EmbeddingNet model file; printed as images/s next to the two parts it is made of, measured in the same
run: decoding alone (``read_image`` of every file) and embedding alone (``embed_images`` of the decoded
tensor), with each part's share of the indexing time.

Query latency: galleries of 10^4, 10^5 and 10^6 random 64-D float32 vectors, a batch of 100 queries, k = 10.
For each gallery: the exact chunked search (``nearest_neighbours``), the same call with ``use_faiss=True``
(which builds the faiss IndexFlatL2 on every call) and faiss's search alone on a prebuilt index; the median
time per query batch after one warm-up call (fewer repeats for larger galleries), the ratios, and whether
the exact and faiss neighbours agree. Without faiss installed its columns are left empty.

Approximate search (``--ann``, needs faiss): a clustered synthetic 64-D gallery of ``--ann-size`` vectors
(default 10^6): ANN_CLUSTERS_PER_MILLION x (size / 10^6) cluster centres drawn from N(0, I), each point a centre
plus ANN_SPREAD x N(0, I), the same number of points per cluster; a batch of ANN_QUERIES queries drawn from the
same law (a random centre plus the same noise). The exact search (``search.nearest_neighbours``) and each
index (``approximate_index.new_index``: HNSW and IVF at their defaults) answer the same batch with k = 10:
queries per second (median of 3 timed calls after a warm-up; the exact search 1 timed call), the speed-up over
exact search, and recall@10 against it, over a few efSearch / nprobe values; each index's build time and
size in bytes (faiss's serialised index, as saved beside a gallery), and the same for 10^7 vectors computed
from them (bytes per vector and vectors built per second: a linear extrapolation, not a measurement).
"""

import argparse
import os
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import approximate_index  # noqa: E402
import search  # noqa: E402
from bench_selectors import median_ms  # noqa: E402
from image_folders import read_image  # noqa: E402
from model_file import embed_images, load_model, save_model  # noqa: E402
from networks import EmbeddingNet  # noqa: E402

IMAGE_SIZE = 28
N_CLASSES = 10
EMBEDDING_DIM = 64
QUERY_BATCH = 100
K = 10
# (gallery size, timed repeats): fewer repeats where one call takes longer
GALLERIES = [(10_000, 20), (100_000, 5), (1_000_000, 2)]


def median_time(function, repeats):
    """Median wall time in seconds of ``repeats`` calls of function(), after one untimed warm-up call
    (bench_selectors' timer)."""
    return median_ms(function, repeats) / 1000


def write_images(folder, n_images, seed=0):
    """n_images grey 28 px PNGs in N_CLASSES class folders: a bright bar per class over noise."""
    rng = np.random.default_rng(seed)
    for number in range(n_images):
        label = number % N_CLASSES
        pixels = rng.integers(0, 60, size=(IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        pixels[2 + 2 * label:5 + 2 * label, 3:25] = 255
        class_folder = os.path.join(folder, f"class{label}")
        os.makedirs(class_folder, exist_ok=True)
        Image.fromarray(pixels, "L").save(os.path.join(class_folder, f"{number:05d}.png"))


def bench_indexing(n_images, workdir):
    folder = os.path.join(workdir, "images")
    write_images(folder, n_images)
    torch.manual_seed(0)
    model = EmbeddingNet(embedding_dim=EMBEDDING_DIM, in_channels=1, image_size=IMAGE_SIZE)
    model_path = save_model(os.path.join(workdir, "model.pt"), model, "embedding-net",
                            {"embedding_dim": EMBEDDING_DIM, "in_channels": 1, "image_size": IMAGE_SIZE},
                            image_size=IMAGE_SIZE, channels=1, normalization={"mean": [0.2], "std": [0.3]})
    out = os.path.join(workdir, "gallery.npz")
    index_time = median_time(lambda: search.index_folder(model_path, folder, out, progress=False), 2)
    paths = search.load_gallery(out)["paths"].tolist()
    decode_time = median_time(lambda: [read_image(path, IMAGE_SIZE, 1) for path in paths], 2)
    images = torch.stack([read_image(path, IMAGE_SIZE, 1) for path in paths])
    loaded, info = load_model(model_path)
    embed_time = median_time(lambda: embed_images(loaded, images, normalization=info["normalization"]), 2)
    print(f"## Indexing {n_images} PNGs of {IMAGE_SIZE} px (EmbeddingNet, {EMBEDDING_DIM}-D, batch 256)\n")
    print("| step | seconds | images/s | share of index time |")
    print("|---|---|---|---|")
    for name, seconds in (("index_folder (all)", index_time), ("decode only (read_image)", decode_time),
                          ("embed only (embed_images)", embed_time)):
        print(f"| {name} | {seconds:.3f} | {n_images / seconds:,.0f} | {seconds / index_time:.2f} |")
    print()


def bench_queries(galleries):
    try:
        import faiss
    except ImportError:
        faiss = None
        print("faiss is not installed (pip install faiss-cpu): its columns are empty\n")
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(QUERY_BATCH, EMBEDDING_DIM, generator=generator)
    print(f"## Query latency: {QUERY_BATCH} queries, k = {K}, {EMBEDDING_DIM}-D float32, ms per query batch "
          f"(torch threads: {torch.get_num_threads()}"
          + (f", faiss threads: {faiss.omp_get_max_threads()})\n" if faiss else ")\n"))
    print("| gallery | exact chunked | faiss (index built per call) | faiss search only | "
          "exact / faiss per call | exact / faiss search | same neighbours |")
    print("|---|---|---|---|---|---|---|")
    for n_gallery, repeats in galleries:
        gallery = torch.randn(n_gallery, EMBEDDING_DIM, generator=generator)
        exact = median_time(lambda: search.nearest_neighbours(queries, gallery, K), repeats)
        row = f"| {n_gallery:,} | {exact * 1e3:.1f} |"
        if faiss is None:
            print(row + " | | | | | |")
            continue
        per_call = median_time(lambda: search.nearest_neighbours(queries, gallery, K, use_faiss=True), repeats)
        index = faiss.IndexFlatL2(EMBEDDING_DIM)
        index.add(gallery.numpy())
        query_array = queries.numpy()
        search_only = median_time(lambda: index.search(query_array, K), repeats)
        _, exact_indices = search.nearest_neighbours(queries, gallery, K)
        _, faiss_indices = search.nearest_neighbours(queries, gallery, K, use_faiss=True)
        same = (exact_indices == faiss_indices).all(dim=1).float().mean().item()
        print(row + f" {per_call * 1e3:.1f} | {search_only * 1e3:.1f} | {exact / per_call:.2f} | "
              f"{exact / search_only:.2f} | {same:.0%} of queries |")
        del gallery, index
    print()


ANN_CLUSTERS_PER_MILLION = 10_000
ANN_SPREAD = 0.5  # noise per coordinate around a centre; centres are N(0, I), so clusters overlap little
ANN_QUERIES = 1000
ANN_SETTINGS = {"hnsw": ("ef_search", (16, 32, 64, 96, 128)), "ivf": ("nprobe", (4, 8, 16, 32, 64))}


def clustered_vectors(n_items, n_queries, seed=0):
    """(gallery (n_items, 64) float32, queries (n_queries, 64) float32) from the clustered law described above."""
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n_items * ANN_CLUSTERS_PER_MILLION // 1_000_000)
    centres = rng.standard_normal((n_clusters, EMBEDDING_DIM), dtype=np.float32)
    gallery = np.repeat(centres, -(-n_items // n_clusters), axis=0)[:n_items]
    gallery += ANN_SPREAD * rng.standard_normal(gallery.shape, dtype=np.float32)
    queries = centres[rng.integers(0, n_clusters, n_queries)]
    queries += ANN_SPREAD * rng.standard_normal(queries.shape, dtype=np.float32)
    return gallery, queries


def bench_approximate(n_items):
    import faiss

    gallery, queries = clustered_vectors(n_items, ANN_QUERIES)
    n_clusters = max(1, n_items * ANN_CLUSTERS_PER_MILLION // 1_000_000)
    print(f"## Approximate search: {n_items:,} clustered 64-D vectors ({n_clusters:,} Gaussian clusters, centres "
          f"N(0, I), spread {ANN_SPREAD}), {ANN_QUERIES} queries from the same law, k = {K} "
          f"(torch threads: {torch.get_num_threads()}, faiss threads: {faiss.omp_get_max_threads()})\n")
    exact_seconds = median_time(lambda: search.nearest_neighbours(queries, gallery, K), 1)
    _, exact = search.nearest_neighbours(queries, gallery, K)
    rows = [f"| exact (search.nearest_neighbours) | | {ANN_QUERIES / exact_seconds:,.0f} | 1.0 | 1.0000 |"]
    builds = []
    for kind, (parameter, values) in ANN_SETTINGS.items():
        start = time.perf_counter()
        index = approximate_index.new_index(gallery, kind)
        build_seconds = time.perf_counter() - start
        size = faiss.serialize_index(index).nbytes
        builds.append((kind, build_seconds, size))
        for value in values:
            seconds = median_time(lambda: approximate_index.search_index(index, queries, K, **{parameter: value}), 3)
            _, found = approximate_index.search_index(index, queries, K, **{parameter: value})
            rows.append(f"| {kind} | {parameter} {value} | {ANN_QUERIES / seconds:,.0f} | "
                        f"{exact_seconds / seconds:.1f} | {approximate_index.recall_at_k(found, exact):.4f} |")
        del index
    print("| search | parameter | queries/s | speed-up over exact | recall@10 |")
    print("|---|---|---|---|---|")
    print("\n".join(rows) + "\n")
    print(f"| index | build s ({n_items:,}) | bytes ({n_items:,}) | bytes per vector | build s (10^7, computed) | "
          "bytes (10^7, computed) |")
    print("|---|---|---|---|---|---|")
    for kind, build_seconds, size in builds:
        print(f"| {kind} | {build_seconds:.1f} | {size:,} | {size / n_items:.0f} | "
              f"{build_seconds * 1e7 / n_items:,.0f} | {size * 1e7 / n_items:,.0f} |")
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 images, galleries of 10^4 and 10^5 only")
    parser.add_argument("--ann", action="store_true", help="only the approximate indexes against exact search")
    parser.add_argument("--ann-size", type=int, default=1_000_000, help="gallery size for --ann (default 10^6)")
    arguments = parser.parse_args()
    start = time.perf_counter()
    if arguments.ann:
        bench_approximate(arguments.ann_size)
        print(f"total {time.perf_counter() - start:.0f} s")
        return
    with tempfile.TemporaryDirectory() as workdir:
        bench_indexing(500 if arguments.quick else 2000, workdir)
    bench_queries(GALLERIES[:2] if arguments.quick else GALLERIES)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
