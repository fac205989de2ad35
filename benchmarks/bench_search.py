"""Benchmark of search.py: indexing throughput and k-NN query latency, exact chunked search next to faiss.

Run from the repository root:

    python benchmarks/bench_search.py            # about 2 minutes on 2 CPU cores
    python benchmarks/bench_search.py --quick    # 500 images, galleries of 10^4 and 10^5 only

Indexing: a generated folder of small PNGs (10 class folders, 28 px grey) indexed by ``index_folder`` with a
small EmbeddingNet model file; printed as images/s next to the two parts it is made of, measured in the same
run: decoding alone (``read_image`` of every file) and embedding alone (``embed_images`` of the decoded
tensor), with each part's share of the indexing time.

Query latency: galleries of 10^4, 10^5 and 10^6 random 64-D float32 vectors, a batch of 100 queries, k = 10.
For each gallery: the exact chunked search (``nearest_neighbours``), the same call with ``use_faiss=True``
(which builds the faiss IndexFlatL2 on every call) and faiss's search alone on a prebuilt index; the median
time per query batch after one warm-up call (fewer repeats for larger galleries), the ratios, and whether
the exact and faiss neighbours agree. Without faiss installed its columns are left empty.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 images, galleries of 10^4 and 10^5 only")
    arguments = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        bench_indexing(500 if arguments.quick else 2000, workdir)
    bench_queries(GALLERIES[:2] if arguments.quick else GALLERIES)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
