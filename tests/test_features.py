"""features.py: the pixel, HOG and ResNet-50 extractors (checked against scikit-image and a hand-built
ResNet-50 with seeded random weights, never downloaded) and the on-disk cache of what they compute."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from skimage.feature import hog
from torch.utils.data import TensorDataset

import features


def small_images(n=4, shape=(28, 28), seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8))


def test_pixel_features_of_every_kind_of_image():
    grey = small_images()
    assert torch.equal(features.pixel_features(grey), grey.reshape(4, -1).float() / 255)
    colour = small_images(shape=(32, 32, 3))
    expected = colour.permute(0, 3, 1, 2).reshape(4, -1).float() / 255
    assert torch.equal(features.pixel_features(colour), expected)
    assert torch.equal(features.pixel_features(colour.numpy()), expected)
    as_float = colour.permute(0, 3, 1, 2).float() / 255
    assert torch.equal(features.pixel_features(as_float), expected)
    assert torch.equal(features.pixel_features(TensorDataset(as_float, torch.zeros(4))), expected)
    with pytest.raises(ValueError, match="uint8"):
        features.pixel_features(torch.zeros(4, 28, 28, dtype=torch.int64))


def test_hog_features_are_scikit_images():
    grey = small_images()
    result = features.hog_features(grey)
    assert result.shape == (4, 324) and result.dtype == torch.float32
    for image, row in zip(grey.numpy(), result):
        expected = hog(image / 255.0, orientations=9, pixels_per_cell=(7, 7), cells_per_block=(2, 2),
                       block_norm="L2-Hys")
        np.testing.assert_allclose(row.numpy(), expected, rtol=1e-5, atol=1e-6)
    colour = small_images(n=2, shape=(32, 32, 3))
    result = features.extract_features("hog", colour, orientations=6, pixels_per_cell=(16, 16), cells_per_block=1)
    expected = hog(colour[1].numpy() / 255.0, orientations=6, pixels_per_cell=(16, 16), cells_per_block=(1, 1),
                   block_norm="L2-Hys", channel_axis=-1)
    assert result.shape == (2, 24)
    np.testing.assert_allclose(result[1].numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pixels, hog, resnet"):
        features.extract_features("sift", grey)
    with pytest.raises(TypeError, match="orientations"):
        features.extract_features("hog", grey, bins=9)


def test_missing_resnet_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected_file = os.path.join(str(tmp_path / "hub"), "checkpoints",
                                 os.path.basename(torchvision.models.ResNet50_Weights.DEFAULT.url))
    with pytest.raises(FileNotFoundError) as error:
        features.resnet_features(small_images(n=1))
    message = str(error.value)
    assert expected_file in message and "weights=" in message and "never downloaded" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        features.resnet_features(small_images(n=1), weights=tmp_path / "nothing.pth")
    wrong = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), wrong)
    with pytest.raises(ValueError, match="not a state_dict of torchvision.models.resnet50"):
        features.resnet_features(small_images(n=1), weights=wrong)


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    """A ResNet-50 state_dict with seeded random values, saved as torchvision's file would be."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet") / "resnet50-random.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    return path


def test_resnet_features_load_the_given_weights(resnet_weights, tmp_path, monkeypatch):
    images = small_images(n=2, shape=(16, 16, 3))
    result = features.resnet_features(images, weights=resnet_weights, image_size=32)
    assert result.shape == (2, 2048)

    reference = torchvision.models.resnet50()
    reference.load_state_dict(torch.load(resnet_weights, weights_only=True))
    reference.fc = torch.nn.Identity()
    pixels = F.interpolate(images.permute(0, 3, 1, 2).float() / 255, size=(32, 32), mode="bilinear",
                           align_corners=False, antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        expected = reference.eval()((pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    torch.testing.assert_close(result, expected)

    # the same file found in torchvision's cache, and a grey image made RGB
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.symlink(resnet_weights, checkpoints / os.path.basename(torchvision.models.ResNet50_Weights.DEFAULT.url))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    torch.testing.assert_close(features.resnet_features(images, image_size=32), result)
    grey = small_images(n=1, shape=(16, 16))
    coloured = grey.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
    # (equal up to float rounding: the expanded and the copied batch take different kernels)
    torch.testing.assert_close(features.resnet_features(grey, image_size=32),
                               features.resnet_features(coloured, image_size=32), rtol=1e-3, atol=1e-4)


def test_features_are_cached_once_per_split_and_parameters(tmp_path, monkeypatch):
    calls = []
    original = features.extract_features

    def counting(name, images, progress=False, **params):
        calls.append((name, params))
        return original(name, images, progress=progress, **params)

    monkeypatch.setattr(features, "extract_features", counting)
    images = small_images(n=3)
    first = features.cached_features("hog", images, "toy", "train", tmp_path)
    again = features.cached_features("hog", images, "toy", "train", tmp_path)
    assert torch.equal(first, again) and len(calls) == 1
    assert os.listdir(tmp_path / "toy")[0].startswith("train-hog-")
    features.cached_features("hog", images, "toy", "train", tmp_path, orientations=4)
    features.cached_features("hog", small_images(n=3, seed=1), "toy", "train", tmp_path)
    features.cached_features("hog", images, "toy", "test", tmp_path)
    assert len(calls) == 4 and len(os.listdir(tmp_path / "toy")) == 4
