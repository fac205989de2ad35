"""The model file (networks.save_model / load_model / embed_images), the architecture registry, ResNetEmbedding
and its pretrained weights, and the Omniglot weights that moved to the model file."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import omniglot
from networks import (MODEL_KEYS, NETWORKS, EmbeddingNet, ResNetEmbedding, SiameseNetwork, build_network,
                      embed_images, load_model, model_fingerprint, save_model)

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_A_MODEL_FILE = "is not a model file written by save_model"


def _images(n, channels, size, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _trained_batchnorm(model, channels, size):
    """Moves BatchNorm's running statistics off their defaults, so that the round trip must carry buffers too."""
    model.train()
    with torch.no_grad():
        model.get_embedding(_images(4, channels, size, seed=1))
    return model.eval()


def _resnet18_file(tmp_path, name="resnet18.pth"):
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("architecture, arguments, channels, size", [
    ("embedding-net", {"embedding_dim": 4, "in_channels": 1, "image_size": 28}, 1, 28),
    ("embedding-net", {"embedding_dim": 8, "in_channels": 3, "image_size": 40}, 3, 40),
    ("siamese-network", SiameseNetwork(28, 8, channels=8).config(), 1, 28),
    ("resnet18", {"embedding_dim": 8, "in_channels": 3, "pretrained": None}, 3, 32),
    ("resnet18", {"embedding_dim": 8, "in_channels": 1, "pretrained": None}, 1, 32),
])
def test_round_trip_gives_identical_embeddings_and_information(tmp_path, architecture, arguments, channels, size):
    torch.manual_seed(0)
    model = _trained_batchnorm(build_network(architecture, **arguments), channels, size)
    normalization = {"mean": [0.5] * channels, "std": [0.25] * channels}
    path = save_model(tmp_path / "new" / "folder" / "model.pt", model, architecture, arguments, image_size=size,
                      channels=channels, normalization=normalization, class_names=["a", "b", 7], threshold=0.25,
                      command="python train.py", metrics={"accuracy": np.float64(0.5), "n": np.int64(3)},
                      recipe={"epochs": 2, "scale": (0.9, 1.1)}, notes=None)
    assert os.listdir(tmp_path / "new" / "folder") == ["model.pt"]  # no temporary file left behind
    loaded, info = load_model(path)
    assert type(loaded) is type(model) and not loaded.training and loaded.config() == model.config()
    images = _images(2, channels, size)
    with torch.no_grad():
        assert torch.equal(loaded.get_embedding(images), model.get_embedding(images))
    assert info == {"format": "siamese-triplet-model", "version": 1, "architecture": architecture,
                    "arguments": arguments, "image_size": size, "channels": channels,
                    "normalization": normalization, "class_names": ["a", "b", 7], "embedding_dim": arguments["embedding_dim"],
                    "threshold": 0.25, "command": "python train.py", "metrics": {"accuracy": 0.5, "n": 3},
                    "fingerprint": model_fingerprint(model.state_dict()),
                    "recipe": {"epochs": 2, "scale": (0.9, 1.1)}, "notes": None}
    assert type(info["metrics"]["accuracy"]) is float and type(info["metrics"]["n"]) is int
    # One file of plain data: readable with weights_only=True, the state dict on the CPU.
    saved = torch.load(path, weights_only=True)
    assert set(saved) == set(MODEL_KEYS) | {"recipe", "notes"}
    assert all(value.device.type == "cpu" for value in saved["state_dict"].values())


def test_save_model_defaults_and_arguments_from_config(tmp_path):
    model = EmbeddingNet(2).eval()
    path = save_model(str(tmp_path / "model.pt"), model, "embedding-net", None, image_size=28, channels=1)
    assert path == str(tmp_path / "model.pt")
    _, info = load_model(path)
    assert info["arguments"] == model.config() == {"embedding_dim": 2, "in_channels": 1, "image_size": 28}
    assert (info["normalization"], info["class_names"], info["threshold"], info["command"], info["metrics"]) == \
           (None, None, None, None, {})
    save_model(path, EmbeddingNet(3).eval(), "embedding-net", None, image_size=28, channels=1)  # replaces it
    assert load_model(path)[1]["embedding_dim"] == 3


def test_fingerprint_changes_with_the_weights_only():
    model = EmbeddingNet(2)
    state = model.state_dict()
    fingerprint = model_fingerprint(state)
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    assert model_fingerprint({key: value.clone() for key, value in state.items()}) == fingerprint
    assert model_fingerprint(EmbeddingNet(2).state_dict()) != fingerprint  # other random weights
    changed = {key: value.clone() for key, value in state.items()}
    changed["fc.4.bias"][0] += 1e-6
    assert model_fingerprint(changed) != fingerprint
    assert model_fingerprint(dict(reversed(list(state.items())))) != fingerprint  # the order is part of it
    assert model_fingerprint(state) == fingerprint
    with pytest.raises(TypeError, match="entry 'x' is a int, not a tensor"):
        model_fingerprint({"x": 1})


class _Executed(Exception):
    pass


def _run_on_load():
    raise _Executed("pickled code ran")


class _Payload:
    def __reduce__(self):
        return (_run_on_load, ())


def test_load_errors(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="no model file at .*missing.pt"):
        load_model(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all" * 10)
    with pytest.raises(ValueError, match=f"garbage.pt {NOT_A_MODEL_FILE}"):
        load_model(garbage)
    good = save_model(tmp_path / "good.pt", EmbeddingNet(2), "embedding-net", None, image_size=28, channels=1)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(good, "rb").read()[:5000])
    with pytest.raises(ValueError, match=f"truncated.pt {NOT_A_MODEL_FILE}"):
        load_model(truncated)
    for name, other in (("tensor.pt", torch.zeros(3)), ("state.pt", EmbeddingNet(2).state_dict()),
                        ("dict.pt", {"format": "something else"})):
        torch.save(other, tmp_path / name)
        with pytest.raises(ValueError, match=f"{name} {NOT_A_MODEL_FILE}"):
            load_model(tmp_path / name)


def test_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "payload.pt"
    torch.save({"format": "siamese-triplet-model", "payload": _Payload()}, path)
    with pytest.raises(_Executed):  # what an unrestricted load would do
        torch.load(path, weights_only=False)
    with pytest.raises(ValueError, match=f"payload.pt {NOT_A_MODEL_FILE}"):
        load_model(path)  # refused before anything runs: no _Executed


def _rewrite(path, **changes):
    saved = torch.load(path, weights_only=True)
    saved.update(changes)
    for key in [key for key, value in changes.items() if value is KeyError]:
        del saved[key]
    torch.save(saved, path)


def test_load_errors_of_altered_model_files(tmp_path):
    model = EmbeddingNet(2)
    path = str(tmp_path / "model.pt")

    def fresh():
        return save_model(path, model, "embedding-net", None, image_size=28, channels=1)

    state = {key: value.clone() for key, value in model.state_dict().items()}
    state["fc.4.bias"] += 1
    _rewrite(fresh(), state_dict=state)
    with pytest.raises(ValueError, match="do not match the fingerprint"):
        load_model(path)
    _rewrite(fresh(), version=2)
    with pytest.raises(ValueError, match="version 2; this library reads version 1"):
        load_model(path)
    _rewrite(fresh(), threshold=KeyError)
    with pytest.raises(ValueError, match=r"keys \['threshold'\] are missing"):
        load_model(path)
    _rewrite(fresh(), state_dict=[1, 2])
    with pytest.raises(ValueError, match="state_dict or arguments is not a dict"):
        load_model(path)
    _rewrite(fresh(), arguments={"embedding_dim": 3, "in_channels": 1, "image_size": 28})
    with pytest.raises(ValueError, match="weights do not load into architecture 'embedding-net'"):
        load_model(path)
    _rewrite(fresh(), architecture="vgg")
    with pytest.raises(ValueError, match="weights do not load into architecture 'vgg'.*unknown architecture"):
        load_model(path)


def test_build_network_and_its_errors():
    assert set(NETWORKS) == {"embedding-net", "resnet18", "siamese-network"}
    assert isinstance(build_network("embedding-net", embedding_dim=3), EmbeddingNet)
    assert build_network("siamese-network", image_size=28, channels=4).config()["channels"] == 4
    with pytest.raises(ValueError, match="unknown architecture 'vgg'; choose one of embedding-net, resnet18"):
        build_network("vgg")
    with pytest.raises(TypeError, match=r"arguments \['size'\] do not fit architecture 'embedding-net'"):
        build_network("embedding-net", size=3)


def test_save_model_errors(tmp_path):
    model = EmbeddingNet(2)
    path = tmp_path / "model.pt"

    def save(*, model=model, architecture="embedding-net", arguments=None, **options):
        return save_model(path, model, architecture, arguments, **{"image_size": 28, "channels": 1, **options})

    cases = [
        (dict(model=object()), TypeError, "model must be an nn.Module"),
        (dict(architecture="vgg"), ValueError, "unknown architecture 'vgg'"),
        (dict(arguments=[2, 1, 28]), TypeError, "arguments must be the dict"),
        (dict(arguments={"embedding_dim": 5}), ValueError, "weights do not fit architecture 'embedding-net'"),
        (dict(arguments={"embedding_dim": 2, "size": 1}), TypeError, "do not fit architecture"),
        (dict(image_size=32), ValueError, "image_size is 32 but the model takes 28"),
        (dict(channels=3), ValueError, "channels is 3 but the model takes 1"),
        (dict(image_size=0), ValueError, "image_size must be >= 1"),
        (dict(normalization=(0.5, 0.5)), TypeError, "normalization must be None or a dict"),
        (dict(normalization={"mean": [0.5, 0.5], "std": [1.0]}), ValueError, r"normalization\['mean'\] must hold 1"),
        (dict(normalization={"mean": [0.5], "std": [0.0]}), ValueError, r"normalization\['std'\] must be > 0"),
        (dict(normalization={"mean": [float("nan")], "std": [1.0]}), ValueError, "finite"),
        (dict(threshold=1.5), ValueError, "threshold must be a similarity"),
        (dict(threshold="high"), TypeError, "threshold must be None or a similarity"),
        (dict(class_names=[None]), TypeError, "class_names must be a list of str"),
        (dict(command=["python"]), TypeError, "command must be None or a str"),
        (dict(metrics=[0.5]), TypeError, "metrics must be None or a dict"),
        (dict(metrics={"loss": object()}), TypeError, r"metrics\['loss'\] must be plain data"),
        (dict(fingerprint="mine"), ValueError, r"extra keys \['fingerprint'\] are the model file's own"),
        (dict(notes={1, 2}), TypeError, "notes must be plain data"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            save(**options)
    assert os.listdir(tmp_path) == []  # nothing written, not even a temporary file


def test_embed_images_applies_the_normalization_in_eval_mode():
    torch.manual_seed(0)
    model = _trained_batchnorm(SiameseNetwork(28, 8, in_channels=3, channels=4), 3, 28).train()
    images = _images(7, 3, 28)
    normalization = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 2.0]}
    embeddings = embed_images(model, images, batch_size=3, normalization=normalization)
    assert model.training  # its mode is restored
    model.eval()
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.get_embedding((images - mean) / std)
        assert embeddings.shape == (7, 8) and not embeddings.requires_grad
        torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(embed_images(model, images), model.get_embedding(images))  # no normalisation
    assert not torch.allclose(embeddings, embed_images(model, images, batch_size=3))


def test_embed_images_errors():
    model = EmbeddingNet(2)
    with pytest.raises(TypeError, match="model must be an nn.Module with a get_embedding method"):
        embed_images(torch.nn.Linear(2, 2), torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match=r"images must be a tensor \(N, C, H, W\), got \(28, 28\)"):
        embed_images(model, torch.zeros(28, 28))
    with pytest.raises(ValueError, match="got list"):
        embed_images(model, [[0.0]])
    with pytest.raises(TypeError, match="images must be floats, got torch.uint8"):
        embed_images(model, torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images is empty"):
        embed_images(model, torch.zeros(0, 1, 28, 28))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        embed_images(model, torch.zeros(1, 1, 28, 28), batch_size=0)
    with pytest.raises(ValueError, match=r"normalization\['mean'\] must hold 1"):
        embed_images(model, torch.zeros(1, 1, 28, 28), normalization={"mean": [0, 0], "std": [1, 1]})


def test_resnet_embedding_shapes_config_and_errors():
    model = ResNetEmbedding(16, in_channels=1).eval()
    assert model.config() == {"embedding_dim": 16, "in_channels": 1, "pretrained": None}
    assert model.backbone.conv1.in_channels == 1 and model.backbone.fc.out_features == 16
    with torch.no_grad():
        assert model(torch.rand(2, 1, 32, 48)).shape == (2, 16)
        x = torch.rand(2, 1, 40, 40)
        assert torch.equal(model.get_embedding(x), model(x))
    assert ResNetEmbedding().config() == {"embedding_dim": 64, "in_channels": 3, "pretrained": None}
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, H, W\) with H, W >= 32"):
        model(torch.rand(2, 1, 31, 40))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="in_channels must be 1 .grey. or 3 .RGB."):
        ResNetEmbedding(in_channels=2)
    with pytest.raises(ValueError, match="embedding_dim must be >= 1"):
        ResNetEmbedding(0)
    with pytest.raises(TypeError, match="pretrained must be None, 'imagenet' or the path"):
        ResNetEmbedding(pretrained=True)


def _backbone_equals(model, state, skip=("fc.",)):
    own = model.backbone.state_dict()
    return all(torch.equal(own[key], value) for key, value in state.items() if not key.startswith(skip))


def test_resnet_embedding_pretrained_from_a_file(tmp_path):
    path, state = _resnet18_file(tmp_path)
    rgb = ResNetEmbedding(8, 3, pretrained=path)
    assert rgb.config()["pretrained"] == str(path) and _backbone_equals(rgb, state)
    grey = ResNetEmbedding(8, 1, pretrained=str(path))
    assert _backbone_equals(grey, state, skip=("fc.", "conv1."))
    assert torch.equal(grey.backbone.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    assert not _backbone_equals(ResNetEmbedding(8, 3), state)  # random initialisation otherwise
    # A model file does not need the pretrained file again: its weights come from the state dict.
    saved = save_model(tmp_path / "model.pt", grey.eval(), "resnet18", grey.config(), image_size=32, channels=1)
    os.remove(path)
    loaded, info = load_model(saved)
    assert loaded.config() == grey.config() and info["arguments"]["pretrained"] == str(path)
    images = _images(2, 1, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), grey(images))


def test_resnet_embedding_pretrained_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained weights file .*nowhere.pth does not exist"):
        ResNetEmbedding(pretrained=str(tmp_path / "nowhere.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="garbage.pth could not be read as a torch file"):
        ResNetEmbedding(pretrained=garbage)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth does not hold a state dict"):
        ResNetEmbedding(pretrained=tmp_path / "list.pth")
    torch.save(EmbeddingNet().state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth is not a resnet18 state dict .missing: conv1.weight, "
                                         "bn1.weight, bn1.bias, ...; unexpected: convnet.0.weight"):
        ResNetEmbedding(pretrained=tmp_path / "other.pth")
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"][:, :1]
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape.pth is not a resnet18 state dict \(wrong shape: layer1.0.conv1.weight\)"):
        ResNetEmbedding(pretrained=tmp_path / "shape.pth")


def test_resnet_embedding_imagenet_weights_come_from_the_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torch.hub.get_dir() == str(tmp_path / "hub")
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(FileNotFoundError) as raised:
        ResNetEmbedding(pretrained="imagenet")
    message = str(raised.value)
    assert str(expected) in message and "download https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "or pass its path as pretrained" in message
    assert not expected.exists()  # nothing was downloaded
    _, state = _resnet18_file(tmp_path / "hub" / "checkpoints", "resnet18-f37072fd.pth")
    model = ResNetEmbedding(8, pretrained="imagenet")
    assert _backbone_equals(model, state) and model.config()["pretrained"] == "imagenet"


def test_importing_networks_does_not_import_torchvision():
    code = "import sys, networks; print(sorted(name for name in sys.modules if name.startswith('torchvision')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_an_old_omniglot_file_still_loads(tmp_path):
    torch.manual_seed(0)
    model = _trained_batchnorm(SiameseNetwork(28, 8, channels=8), 1, 28)
    path = tmp_path / "old.pt"
    information = {"command": "python experiments.py --dataset omniglot", "recipe": {"quarter_turns": (0, 1)},
                   "evaluation": {"verification": {"threshold": 0.4}}}
    torch.save({"config": model.config(), "state_dict": model.state_dict(), **information}, path)
    loaded, info = load_model(path)
    images = _images(3, 1, 28)
    with torch.no_grad():
        assert torch.equal(loaded.get_embedding(images), model.get_embedding(images))
        assert torch.equal(omniglot.load_omniglot_model(str(path)).get_embedding(images), model.get_embedding(images))
    assert info == {"format": "siamese-triplet-model", "version": 0, "architecture": "siamese-network",
                    "arguments": model.config(), "image_size": 28, "channels": 1, "normalization": None,
                    "class_names": None, "embedding_dim": 8, "threshold": 0.4,
                    "command": "python experiments.py --dataset omniglot", "metrics": {},
                    "fingerprint": model_fingerprint(model.state_dict()), "recipe": {"quarter_turns": (0, 1)},
                    "evaluation": {"verification": {"threshold": 0.4}}}
    torch.save({"config": model.config(), "state_dict": model.state_dict()}, path)
    assert load_model(path)[1]["threshold"] is None


def test_save_omniglot_model_writes_a_model_file(tmp_path):
    model = SiameseNetwork(28, 8, channels=8).eval()
    evaluation = {"verification": {"threshold": np.float32(0.5)}, "episodes": []}
    path = omniglot.save_omniglot_model(model, str(tmp_path / "model.pt"), command="test", evaluation=evaluation,
                                        seconds=1.5)
    _, info = load_model(path)
    assert (info["version"], info["architecture"], info["arguments"], info["threshold"]) == \
           (1, "siamese-network", model.config(), 0.5)
    assert (info["command"], info["evaluation"], info["seconds"]) == \
           ("test", {"verification": {"threshold": 0.5}, "episodes": []}, 1.5)
    assert omniglot.save_omniglot_model(model, str(tmp_path / "bare.pt")) and \
           load_model(tmp_path / "bare.pt")[1]["threshold"] is None
    resnet = tmp_path / "resnet.pt"
    save_model(resnet, ResNetEmbedding(8), "resnet18", None, image_size=32, channels=3)
    with pytest.raises(ValueError, match="resnet.pt holds a 'resnet18' model, not the Omniglot SiameseNetwork"):
        omniglot.load_omniglot_model(str(resnet))


def test_the_committed_omniglot_weights_are_a_model_file():
    model, info = load_model(os.path.join(REPOSITORY, "weights", "omniglot_siamese.pt"))
    assert isinstance(model, SiameseNetwork) and (info["format"], info["version"]) == ("siamese-triplet-model", 1)
    assert info["threshold"] == info["evaluation"]["verification"]["threshold"]
    assert (info["image_size"], info["channels"], info["embedding_dim"]) == (40, 1, 64)
    assert info["command"] == "python experiments.py --dataset omniglot" and "recipe" in info
