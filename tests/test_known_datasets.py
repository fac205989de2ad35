"""Tests for known_datasets.py, the datasets known by name: read_idx, IDXImageDataset, load_dataset,
CIFAR-10's reader and load_image_splits.

Every test builds tiny IDX files (20 train / 10 test images of 28 x 28, four classes) or CIFAR-10
pickles in tmp_path, so nothing depends on the data installed on the machine; SYSTEM_DATA_DIRS is
pointed at empty temporary folders for every test. The download tests run torchvision's real download code against
an HTTP server on 127.0.0.1 that serves the gzipped fixtures.
"""

import functools
import gzip
import hashlib
import http.server
import os
import pickle
import shutil
import struct
import threading

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import known_datasets
import datasets
from datasets import InMemoryDataset, SiameseMNIST, TripletMNIST
from fixtures import write_idx_fixture
from known_datasets import (CLASS_NAMES, NORMALIZATION, IDXImageDataset, canonical_dataset_name, dataset_search_paths,
                            load_dataset, read_idx)

FILE_NAMES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
TYPE_BYTES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
              np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def idx_bytes(array):
    """The IDX encoding of a numpy array, written independently of the reader under test."""
    array = np.asarray(array)
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, TYPE_BYTES[big_endian.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + big_endian.tobytes()


def write_file(path, content, gz):
    path = str(path) + (".gz" if gz else "")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as file:
        file.write(gzip.compress(content) if gz else content)
    return path


def make_split(n_items, seed):
    """(images (N, 28, 28) uint8, labels (N,) uint8): random pixels, every one of 4 classes used at least twice."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n_items, 28, 28), dtype=np.uint8)
    labels = rng.permutation(np.arange(n_items) % 4).astype(np.uint8)
    return images, labels


def write_dataset(folder, gz=True, seed=0, splits=(True, False)):
    """Write the IDX files of the given splits (True = train, 20 items; False = test, 10 items) in
    `folder`; returns {train: (images, labels)}. The seed makes datasets in different places differ."""
    written = {}
    for train in splits:
        images, labels = make_split(20 if train else 10, seed + (0 if train else 1000))
        images_name, labels_name = FILE_NAMES[train]
        write_file(os.path.join(folder, images_name), idx_bytes(images), gz)
        write_file(os.path.join(folder, labels_name), idx_bytes(labels), gz)
        written[train] = (images, labels)
    return written


def assert_holds(dataset, images, labels):
    assert dataset.data.dtype == torch.uint8 and dataset.data.shape == (len(images), 28, 28)
    assert dataset.targets.dtype == torch.long
    assert torch.equal(dataset.data, torch.from_numpy(images))
    assert torch.equal(dataset.targets, torch.from_numpy(labels).long())
    assert len(dataset) == len(images)


@pytest.fixture(autouse=True)
def empty_system_dirs(tmp_path, monkeypatch):
    """Point SYSTEM_DATA_DIRS at (not yet existing) temporary folders, so the machine's own data never counts."""
    system_dirs = {"mnist": [str(tmp_path / "system" / "mnist")],
                   "fashion-mnist": [str(tmp_path / "system" / "fashion-mnist")]}
    monkeypatch.setattr(known_datasets, "SYSTEM_DATA_DIRS", system_dirs)
    return system_dirs


# ------------------------------------------------------------------------------------------- read_idx

@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_round_trips_every_type(tmp_path, dtype, gz):
    rng = np.random.default_rng(1)
    values = (rng.standard_normal((3, 4, 5)) * 100).astype(np.dtype(dtype).newbyteorder("="))
    path = write_file(tmp_path / "values-idx3", idx_bytes(values), gz)
    loaded = read_idx(path)
    assert loaded.shape == (3, 4, 5)
    np.testing.assert_array_equal(loaded.numpy(), values)
    assert loaded.numpy().dtype == np.dtype(dtype).newbyteorder("=")


def test_read_idx_reads_labels_and_accepts_path_objects(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(idx_bytes(labels))
    loaded = read_idx(path)
    assert loaded.dtype == torch.uint8 and torch.equal(loaded, torch.from_numpy(labels))


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    images, _ = make_split(3, 0)
    path = tmp_path / "images-without-suffix"
    path.write_bytes(gzip.compress(idx_bytes(images)))
    assert torch.equal(read_idx(path), torch.from_numpy(images))


def good_idx():
    return idx_bytes(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize("content, message", [
    (b"", "truncated"),
    (b"\x00\x00\x08", "truncated"),
    (b"\x00\x01\x08\x03" + good_idx()[4:], "not an IDX file"),
    (b"\x00\x00\x07\x03" + good_idx()[4:], "not an IDX file"),
    (b"\x00\x00\x08\x00", "not an IDX file"),
    (b"PK\x03\x04 a zip file, not IDX", "not an IDX file"),
    (good_idx()[:10], "truncated"),  # header announces 3 dimensions, ends inside the second
    (good_idx()[:-1], "truncated"),  # one data byte missing
    (good_idx() + b"\x00", "bytes after"),
    (gzip.compress(good_idx())[:-12], "damaged gzip"),  # gzip stream cut short
], ids=["empty", "short magic", "bad zero bytes", "unknown type", "no dimensions", "zip file", "short header",
        "short data", "extra data", "cut gzip"])
def test_read_idx_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "broken"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as raised:
        read_idx(path)
    assert str(path) in str(raised.value)


def test_read_idx_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nothing-here")


# ------------------------------------------------------------------------------------------- IDXImageDataset

def test_idx_dataset_matches_torchvision_mnist_on_the_same_files(tmp_path):
    written = write_dataset(tmp_path / "MNIST" / "raw", gz=False)
    for train in (True, False):
        ours = IDXImageDataset(tmp_path / "MNIST" / "raw", train=train, transform=torchvision.transforms.ToTensor(),
                               target_transform=lambda t: t * 10)
        theirs = torchvision.datasets.MNIST(tmp_path, train=train, transform=torchvision.transforms.ToTensor(),
                                            target_transform=lambda t: t * 10)
        assert_holds(ours, *written[train])
        assert torch.equal(ours.data, theirs.data) and torch.equal(ours.targets, theirs.targets)
        assert ours.train is train and ours.root == str(tmp_path / "MNIST" / "raw")
        for index in (0, len(ours) - 1):
            (our_image, our_target), (their_image, their_target) = ours[index], theirs[index]
            assert torch.equal(our_image, their_image) and our_target == their_target


def test_idx_dataset_items_are_pil_l_images_without_transform(tmp_path):
    images, labels = write_dataset(tmp_path)[True]
    dataset = IDXImageDataset(tmp_path)
    image, target = dataset[3]
    assert isinstance(image, Image.Image) and image.mode == "L" and image.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(image), images[3])
    assert type(target) is int and target == labels[3]
    assert dataset.classes == ["0", "1", "2", "3"]  # default names up to the largest label
    assert dataset.class_to_idx == {"0": 0, "1": 1, "2": 2, "3": 3}
    assert dataset.images_file == str(tmp_path / "train-images-idx3-ubyte.gz")


def test_idx_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        IDXImageDataset(tmp_path, train=False)
    images, labels = make_split(5, 0)
    write_file(tmp_path / "count" / "train-images-idx3-ubyte", idx_bytes(images), gz=False)
    write_file(tmp_path / "count" / "train-labels-idx1-ubyte", idx_bytes(labels[:4]), gz=False)
    with pytest.raises(ValueError, match="5 images but .* 4 labels"):
        IDXImageDataset(tmp_path / "count")
    write_file(tmp_path / "swapped" / "train-images-idx3-ubyte", idx_bytes(labels), gz=False)
    write_file(tmp_path / "swapped" / "train-labels-idx1-ubyte", idx_bytes(images), gz=False)
    with pytest.raises(ValueError, match="expected uint8 images"):
        IDXImageDataset(tmp_path / "swapped")
    write_file(tmp_path / "swapped" / "train-images-idx3-ubyte", idx_bytes(images), gz=False)
    with pytest.raises(ValueError, match="expected uint8 labels"):
        IDXImageDataset(tmp_path / "swapped")
    write_file(tmp_path / "wide" / "train-images-idx3-ubyte", idx_bytes(images.astype(np.int16)), gz=False)
    write_file(tmp_path / "wide" / "train-labels-idx1-ubyte", idx_bytes(labels), gz=False)
    with pytest.raises(ValueError, match="expected uint8 images"):
        IDXImageDataset(tmp_path / "wide")
    write_dataset(tmp_path / "ok")  # labels 0 to 3
    with pytest.raises(ValueError, match="label 3 but only 2 class names"):
        IDXImageDataset(tmp_path / "ok", classes=["a", "b"])


# ------------------------------------------------------------------------------------------- load_dataset: layouts

def layout_folder(root, name, layout):
    return {"torchvision": root / TORCHVISION_FOLDER[name] / "raw", "flat": root, "named": root / name}[layout]


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("layout", ["torchvision", "flat", "named"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_load_dataset_reads_every_layout(tmp_path, name, layout, gz):
    root = tmp_path / "data"
    written = write_dataset(layout_folder(root, name, layout), gz=gz)
    for train in (True, False):
        dataset = load_dataset(name, root=root, train=train)
        assert isinstance(dataset, IDXImageDataset)
        assert_holds(dataset, *written[train])
        assert dataset.train is train
        assert dataset.classes == CLASS_NAMES[name]
        assert dataset.root == str(layout_folder(root, name, layout))


def test_class_names_and_normalization_constants():
    assert CLASS_NAMES["mnist"] == ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
    assert CLASS_NAMES["fashion-mnist"] == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                            "Sneaker", "Bag", "Ankle boot"]
    assert NORMALIZATION == {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}


@pytest.mark.parametrize("spelling, name", [("mnist", "mnist"), ("MNIST", "mnist"), ("fashion-mnist", "fashion-mnist"),
                                            ("fashion_mnist", "fashion-mnist"), ("FashionMNIST", "fashion-mnist"),
                                            ("Fashion-MNIST", "fashion-mnist")])
def test_name_spellings(tmp_path, spelling, name):
    assert canonical_dataset_name(spelling) == name
    written = write_dataset(tmp_path / name)
    assert_holds(load_dataset(spelling, root=str(tmp_path)), *written[True])


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="'mnist' and 'fashion-mnist'"):
        load_dataset("cifar10", root=tmp_path)
    with pytest.raises(TypeError, match="name must be a string"):
        load_dataset(None, root=tmp_path)


# ------------------------------------------------------------------------------------------- transforms, in_memory

@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_default_transform_is_to_tensor_and_normalize(tmp_path, name):
    images, labels = write_dataset(tmp_path)[False]
    dataset = load_dataset(name, root=tmp_path, train=False)
    mean, std = NORMALIZATION[name]
    for index in range(len(images)):
        image, target = dataset[index]
        assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
        expected = (torch.from_numpy(images[index]).float() / 255 - mean) / std
        torch.testing.assert_close(image[0], expected)
        assert type(target) is int and target == labels[index]


def test_custom_transform_and_target_transform(tmp_path):
    images, labels = write_dataset(tmp_path)[True]
    dataset = load_dataset("mnist", root=tmp_path, transform=lambda image: image, target_transform=lambda t: -t)
    image, target = dataset[5]
    assert isinstance(image, Image.Image) and image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), images[5])
    assert target == -int(labels[5])


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("train", [True, False])
def test_in_memory_equals_the_pil_path(tmp_path, name, train):
    write_dataset(tmp_path / TORCHVISION_FOLDER[name] / "raw")
    pil = load_dataset(name, root=tmp_path, train=train)
    memory = load_dataset(name, root=tmp_path, train=train, in_memory=True)
    assert isinstance(memory, InMemoryDataset)
    assert memory.data.shape == (len(pil), 1, 28, 28)
    torch.testing.assert_close(memory.data, torch.stack([pil[i][0] for i in range(len(pil))]))
    assert torch.equal(memory.targets, pil.targets)
    assert memory.classes == CLASS_NAMES[name] and memory.train is train
    torch.testing.assert_close(torch.tensor(memory.mean + memory.std), torch.tensor(NORMALIZATION[name]))


def test_in_memory_applies_transforms_to_tensors(tmp_path):
    _, labels = write_dataset(tmp_path)[True]
    plain = load_dataset("mnist", root=tmp_path, in_memory=True)
    shifted = load_dataset("mnist", root=tmp_path, in_memory=True, transform=lambda image: image + 1,
                           target_transform=lambda t: t + 10)
    image, target = shifted[2]
    torch.testing.assert_close(image, plain.data[2] + 1)
    assert target == int(labels[2]) + 10


# ------------------------------------------------------------------------------------------- search order

def test_search_order_inside_root(tmp_path):
    root = tmp_path / "data"
    in_torchvision = write_dataset(root / "FashionMNIST" / "raw", seed=1)
    in_root = write_dataset(root, seed=2)
    in_named = write_dataset(root / "fashion-mnist", seed=3)
    assert_holds(load_dataset("fashion-mnist", root=root), *in_torchvision[True])
    shutil.rmtree(root / "FashionMNIST")
    assert_holds(load_dataset("fashion-mnist", root=root), *in_root[True])
    for name in FILE_NAMES[True]:
        os.remove(root / (name + ".gz"))
    assert_holds(load_dataset("fashion-mnist", root=root), *in_named[True])
    assert dataset_search_paths("fashion-mnist", root) == [
        str(root / "FashionMNIST" / "raw"), str(root), str(root / "fashion-mnist"),
        str(tmp_path / "system" / "fashion-mnist")]


def test_plain_file_wins_over_gz_in_one_folder(tmp_path):
    gzipped = write_dataset(tmp_path, gz=True, seed=1)
    plain = write_dataset(tmp_path, gz=False, seed=2)
    dataset = load_dataset("mnist", root=tmp_path)
    assert_holds(dataset, *plain[True])
    assert not torch.equal(dataset.data, torch.from_numpy(gzipped[True][0]))


def test_root_wins_over_system_dir(tmp_path, empty_system_dirs):
    in_system = write_dataset(empty_system_dirs["fashion-mnist"][0], seed=1)
    in_root = write_dataset(tmp_path / "data", seed=2)
    assert_holds(load_dataset("fashion-mnist", root=tmp_path / "data"), *in_root[True])
    shutil.rmtree(tmp_path / "data")
    dataset = load_dataset("fashion-mnist", root=tmp_path / "data")
    assert_holds(dataset, *in_system[True])
    assert dataset.root == empty_system_dirs["fashion-mnist"][0]


def test_system_dirs_are_searched_in_order(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    in_second = write_dataset(second, seed=2)
    monkeypatch.setitem(known_datasets.SYSTEM_DATA_DIRS, "mnist", [str(first), str(second)])
    assert_holds(load_dataset("mnist", root=tmp_path / "empty"), *in_second[True])
    in_first = write_dataset(first, seed=1)
    assert_holds(load_dataset("mnist", root=tmp_path / "empty"), *in_first[True])


def test_a_folder_counts_only_with_both_files_of_the_split(tmp_path, empty_system_dirs):
    written = write_dataset(tmp_path / "data", splits=(True,))  # train files only
    os.remove(tmp_path / "data" / "train-labels-idx1-ubyte.gz")
    in_system = write_dataset(empty_system_dirs["mnist"][0], seed=5)
    dataset = load_dataset("mnist", root=tmp_path / "data")
    assert_holds(dataset, *in_system[True])
    assert not torch.equal(dataset.data, torch.from_numpy(written[True][0]))


def test_a_malformed_file_in_root_is_reported_not_skipped(tmp_path, empty_system_dirs):
    write_dataset(empty_system_dirs["mnist"][0])
    write_dataset(tmp_path / "data")
    path = tmp_path / "data" / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("mnist", root=tmp_path / "data")


# ------------------------------------------------------------------------------------------- not found

@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("train", [True, False])
def test_not_found_message_names_every_place_tried(tmp_path, monkeypatch, name, train):
    root = tmp_path / "data"
    system_dirs = [str(tmp_path / "sys-a"), str(tmp_path / "sys-b")]
    monkeypatch.setitem(known_datasets.SYSTEM_DATA_DIRS, name, system_dirs)
    write_dataset(root, splits=(not train,))  # only the other split: must not count
    with pytest.raises(FileNotFoundError) as raised:
        load_dataset(name, root=root, train=train)
    message = str(raised.value)
    tried = [root / TORCHVISION_FOLDER[name] / "raw", root, root / name, *system_dirs]
    for path in tried:
        assert f"  {path}\n" in message
    assert dataset_search_paths(name, root) == [str(path) for path in tried]
    for file_name in FILE_NAMES[train]:
        assert file_name in message
    assert "download=True" in message and "internet" in message
    assert "put the four IDX files" in message
    assert ("apt-get install dataset-fashion-mnist" in message) == (name == "fashion-mnist")
    assert not (root / TORCHVISION_FOLDER[name]).exists()  # without download=True nothing is created


# ------------------------------------------------------------------------------------------- download

class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files from `directory`, recording each request path instead of logging to stderr."""

    def __init__(self, *args, requests, **kwargs):
        self.requests = requests
        super().__init__(*args, **kwargs)

    def log_message(self, format, *args):
        self.requests.append(self.path)


@pytest.fixture
def file_server(tmp_path, monkeypatch):
    """(url, served folder, list of requested paths) of an HTTP server on 127.0.0.1 run in a thread."""
    # a proxy set in the environment must not intercept requests to the local server
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    served = tmp_path / "served"
    served.mkdir()
    requests = []
    handler = functools.partial(RecordingHandler, directory=str(served), requests=requests)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/mirror/", served / "mirror", requests
    server.shutdown()
    server.server_close()
    thread.join()


def serve_fixtures(served_folder, monkeypatch, torchvision_class, seed=0):
    """Write gzipped fixtures into the served folder and point torchvision_class's mirrors and md5 sums at them."""
    written = write_dataset(served_folder, gz=True, seed=seed)
    resources = []
    for train in (True, False):
        for file_name in FILE_NAMES[train]:
            content = (served_folder / (file_name + ".gz")).read_bytes()
            resources.append((file_name + ".gz", hashlib.md5(content).hexdigest()))
    monkeypatch.setattr(torchvision_class, "resources", resources)
    return written


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_download_with_torchvision_from_a_local_mirror(tmp_path, monkeypatch, file_server, name):
    url, served_folder, requests = file_server
    torchvision_class = getattr(torchvision.datasets, TORCHVISION_FOLDER[name])
    written = serve_fixtures(served_folder, monkeypatch, torchvision_class)
    monkeypatch.setattr(torchvision_class, "mirrors", [url])
    root = tmp_path / "data"

    dataset = load_dataset(name, root=root, train=False, download=True)

    raw = root / TORCHVISION_FOLDER[name] / "raw"
    for file_name in FILE_NAMES[True] + FILE_NAMES[False]:
        assert (raw / (file_name + ".gz")).is_file() and (raw / file_name).is_file()
        assert f"/mirror/{file_name}.gz" in requests
    assert_holds(dataset, *written[False])
    assert dataset.root == str(raw) and dataset.classes == CLASS_NAMES[name]

    # the files are now in root: later calls read them and never download again
    n_requests = len(requests)
    assert_holds(load_dataset(name, root=root, train=True, download=True), *written[True])
    memory = load_dataset(name, root=root, train=True, in_memory=True)
    assert torch.equal(memory.targets, torch.from_numpy(written[True][1]).long())
    assert len(requests) == n_requests


def test_download_is_not_attempted_when_a_system_dir_has_the_data(tmp_path, monkeypatch, file_server,
                                                                    empty_system_dirs):
    url, served_folder, requests = file_server
    serve_fixtures(served_folder, monkeypatch, torchvision.datasets.FashionMNIST)
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", [url])
    in_system = write_dataset(empty_system_dirs["fashion-mnist"][0], seed=7)
    assert_holds(load_dataset("fashion-mnist", root=tmp_path / "data", download=True), *in_system[True])
    assert requests == [] and not (tmp_path / "data").exists()


def test_failed_download_reports_the_error_and_the_places_tried(tmp_path, monkeypatch, file_server):
    url, served_folder, requests = file_server  # the served folder stays empty: every file is a 404
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [url])
    root = tmp_path / "data"
    with pytest.raises(FileNotFoundError) as raised:
        load_dataset("mnist", root=root, download=True)
    message = str(raised.value)
    assert "downloading with torchvision.datasets.MNIST" in message
    assert url in message and "404" in message
    for path in dataset_search_paths("mnist", root):
        assert f"  {path}\n" in message
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert "/mirror/train-images-idx3-ubyte.gz" in requests  # torchvision asked the local mirror


def test_download_with_a_wrong_checksum_is_reported(tmp_path, monkeypatch, file_server):
    url, served_folder, _ = file_server
    serve_fixtures(served_folder, monkeypatch, torchvision.datasets.MNIST)
    tampered = [(file_name, "0" * 32) for file_name, _ in torchvision.datasets.MNIST.resources]
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", tampered)
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [url])
    with pytest.raises(FileNotFoundError, match="downloading with torchvision.datasets.MNIST .* failed"):
        load_dataset("mnist", root=tmp_path / "data", download=True)


# ------------------------------------------------------------------------------------------- pair and triplet wrappers

@pytest.mark.parametrize("in_memory", [False, True])
def test_siamese_and_triplet_wrappers_on_a_loaded_dataset(tmp_path, in_memory):
    write_dataset(tmp_path / "FashionMNIST" / "raw")
    dataset = load_dataset("fashion-mnist", root=tmp_path, train=False, in_memory=in_memory)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])  # (N, 1, 28, 28) normalised
    labels = dataset.targets

    siamese = SiameseMNIST(dataset)
    assert not siamese.train  # taken from the dataset's split
    for index in range(len(siamese)):
        (first, second), target = siamese[index]
        _, partner, expected_target = siamese.test_pairs[index].tolist()
        torch.testing.assert_close(first, images[index])
        torch.testing.assert_close(second, images[partner])
        assert partner != index and target == expected_target == int(labels[index] == labels[partner])

    triplets = TripletMNIST(dataset)
    for index in range(len(triplets)):
        (anchor, positive, negative), empty = triplets[index]
        _, positive_index, negative_index = triplets.test_triplets[index].tolist()
        torch.testing.assert_close(anchor, images[index])
        torch.testing.assert_close(positive, images[positive_index])
        torch.testing.assert_close(negative, images[negative_index])
        assert labels[positive_index] == labels[index] != labels[negative_index] and empty == []

    torch.manual_seed(0)
    train_pairs = SiameseMNIST(load_dataset("fashion-mnist", root=tmp_path, train=True, in_memory=in_memory))
    batch = next(iter(torch.utils.data.DataLoader(train_pairs, batch_size=8)))
    (first, second), targets = batch
    assert first.shape == second.shape == (8, 1, 28, 28) and targets.shape == (8,)


# ------------------------------------------------------------------------ CIFAR-10, load_image_splits

def write_cifar_fixture(root, per_class=3, seed=0):
    """CIFAR-10's python version in miniature: five train batches and a test batch of random images,
    each class ``per_class`` times per batch, and batches.meta."""
    folder = root / known_datasets.KNOWN_DATASETS["cifar10"].files[0]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).tolist()
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as file:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{i}.png" for i in range(len(labels))]}, file)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": known_datasets.KNOWN_DATASETS["cifar10"].classes,
                     "num_cases_per_batch": 10 * per_class, "num_vis": 3072}, file)
    return written


def test_cifar10_is_read_from_the_python_pickles(tmp_path):
    written = write_cifar_fixture(tmp_path)
    train, test = known_datasets.load_image_splits("cifar10", tmp_path, download=False)
    assert isinstance(train, datasets.InMemoryDataset) and train.train and not test.train
    assert train.data.shape == (150, 3, 32, 32) and test.data.shape == (30, 3, 32, 32)
    data, labels = written["data_batch_2"]
    first = torch.from_numpy(data[0].reshape(3, 32, 32).copy()).float() / 255
    assert torch.equal(train.data[30], first) and train.targets[30] == labels[0]
    assert test.targets.tolist() == written["test_batch"][1]
    assert train.classes == known_datasets.KNOWN_DATASETS["cifar10"].classes
    with pytest.raises(FileNotFoundError, match="download=True"):
        known_datasets.load_cifar10(tmp_path / "elsewhere", download=False)


def test_mnist_like_splits_are_raw_pixels_in_memory(tmp_path):
    written = write_idx_fixture(tmp_path / "data")
    train, test = known_datasets.load_image_splits("mnist", tmp_path / "data", download=False)
    images, labels = written["train"]
    assert torch.equal(train.data, torch.from_numpy(images).float().div(255).unsqueeze(1))
    assert torch.equal(train.targets, torch.from_numpy(labels).long()) and len(test) == len(written["test"][1])
    generator = torch.Generator().manual_seed(0)
    subset = datasets.random_subset(train, 7, generator)
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:7].sort().values
    assert torch.equal(subset.data, train.data[chosen]) and subset.classes == train.classes
    assert datasets.random_subset(train, None, generator) is train
