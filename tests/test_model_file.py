"""model_file.py: save_model / load_model / embed_images, the fingerprint, the format's version and its one
upgrade function (an older Omniglot file, and a model file written by the previous code, committed under
tests/old_formats/model_file/), the Omniglot weights that moved to the model file, and the old import paths
(networks.save_model, ...)."""

import os

import numpy as np
import pytest
import torch

import omniglot
from model_file import (MODEL_FORMAT, MODEL_KEYS, MODEL_VERSION, embed_images, load_model, model_fingerprint,
                        save_model, upgrade_model_file)
from networks import EmbeddingNet, ResNetEmbedding, SiameseNetwork, build_network

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
    assert info == {"format": "siamese-triplet-model", "version": 2, "architecture": architecture,
                    "arguments": arguments, "image_size": size, "channels": channels,
                    "normalization": normalization, "invert": False, "class_names": ["a", "b", 7], "embedding_dim": arguments["embedding_dim"],
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
    _rewrite(fresh(), version=3)
    with pytest.raises(ValueError, match="version 3; this library reads version 2"):
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
                    "invert": True, "class_names": None, "embedding_dim": 8, "threshold": 0.4,
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
    assert (info["version"], info["architecture"], info["arguments"], info["threshold"], info["invert"]) == \
           (2, "siamese-network", model.config(), 0.5, True)  # OmniglotAlphabets' inverted images
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
    assert isinstance(model, SiameseNetwork) and (info["format"], info["version"]) == ("siamese-triplet-model", 2)
    assert info["invert"] is True  # OmniglotAlphabets' inverted images, as save_omniglot_model records
    assert info["threshold"] == info["evaluation"]["verification"]["threshold"]
    assert (info["image_size"], info["channels"], info["embedding_dim"]) == (40, 1, 64)
    assert info["command"] == "python omniglot.py" and info["recipe"] == {**omniglot.OMNIGLOT_RECIPE, "seed": 0}


OLD_FORMATS = os.path.join(REPOSITORY, "tests", "old_formats", "model_file")


def test_a_model_file_written_by_the_previous_code_loads_with_its_weights_information_and_embeddings():
    """tests/old_formats/model_file/ was written by the code before the model file had its own module
    (tests/old_formats/write_model_file.py): the same weights, information and embeddings come back."""
    path = os.path.join(OLD_FORMATS, "siamese_network.pt")
    expected = torch.load(os.path.join(OLD_FORMATS, "expected.pt"), weights_only=True)
    model, info = load_model(path)
    assert isinstance(model, SiameseNetwork) and not model.training
    assert info == {**expected["info"], "invert": True}  # version 1 had no polarity: a siamese-network's is inverted
    assert (info["version"], info["architecture"], info["image_size"], info["class_names"], info["recipe"]) == \
           (1, "siamese-network", 16, ["a", "b", "c"], {"epochs": 2, "scale": (0.9, 1.1)})
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert list(model.state_dict()) == list(saved)
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    assert model_fingerprint(model.state_dict()) == expected["fingerprint"] == info["fingerprint"]
    embeddings = embed_images(model, expected["inputs"], normalization=info["normalization"])
    torch.testing.assert_close(embeddings, expected["embeddings"], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model.get_embedding(expected["inputs"]), expected["raw_embeddings"], rtol=1e-5,
                                   atol=1e-6)
    assert not torch.allclose(embeddings, expected["raw_embeddings"])  # the normalisation is applied


def test_upgrade_model_file_turns_every_older_layout_into_the_current_one(tmp_path):
    model = SiameseNetwork(16, 4, channels=4, n_blocks=2)
    state = model.state_dict()
    old = {"config": model.config(), "state_dict": state, "evaluation": {"verification": {"threshold": 0.3}}}
    upgraded = upgrade_model_file(old, "old.pt")
    assert set(upgraded) == set(MODEL_KEYS) | {"evaluation"} and "config" in old  # the input is left as it was
    assert (upgraded["format"], upgraded["version"], upgraded["architecture"]) == (MODEL_FORMAT, 0, "siamese-network")
    assert (upgraded["threshold"], upgraded["fingerprint"]) == (0.3, model_fingerprint(state))
    path = save_model(tmp_path / "model.pt", model, "siamese-network", None, image_size=16, channels=1)
    current = torch.load(path, weights_only=True)
    assert upgrade_model_file(current, path) == current and current["version"] == MODEL_VERSION == 2
    version_1 = {key: value for key, value in current.items() if key != "invert"}
    assert upgrade_model_file({**version_1, "version": 1}, path)["invert"] is True  # Omniglot's architecture
    assert upgrade_model_file({**version_1, "version": 1, "architecture": "embedding-net"}, path)["invert"] is False
    with pytest.raises(ValueError, match=f"new.pt is a model file of version 3; this library reads version "
                                         f"{MODEL_VERSION}"):
        upgrade_model_file({**current, "version": 3}, "new.pt")
    for contents in ({**current, "version": None}, {**current, "version": -1}, {**current, "version": "1"}):
        with pytest.raises(ValueError, match="model.pt is a model file of version"):
            upgrade_model_file(contents, "model.pt")
    for contents in (torch.zeros(3), state, {"format": "other"}, {"config": {}}):
        with pytest.raises(ValueError, match=f"x.pt {NOT_A_MODEL_FILE}"):
            upgrade_model_file(contents, "x.pt")


@pytest.mark.parametrize("name", ["save_model", "load_model", "embed_images", "model_fingerprint", "MODEL_KEYS",
                                  "MODEL_FORMAT", "MODEL_VERSION"])
def test_old_networks_paths_warn_and_give_the_model_file_objects(name):
    import model_file
    import networks
    from test_utils import assert_moved_name
    assert_moved_name(networks, name, model_file)


def test_an_inverting_model_file_embeds_one_minus_the_images_before_its_normalisation(tmp_path):
    torch.manual_seed(0)
    model = build_network("embedding-net", embedding_dim=4, in_channels=1, image_size=28).eval()
    images = _images(3, 1, 28)
    normalization = {"mean": [0.25], "std": [0.5]}
    path = save_model(tmp_path / "model.pt", model, "embedding-net", None, image_size=28, channels=1,
                      normalization=normalization, invert=True)
    loaded, info = load_model(path)
    assert info["invert"] is True
    expected = embed_images(model, 1 - images, normalization=normalization)
    assert torch.equal(embed_images(loaded, images, normalization=normalization, invert=True), expected)
    assert not torch.allclose(embed_images(loaded, images, normalization=normalization), expected)
    with pytest.raises(TypeError, match="invert must be True or False, got 1"):
        save_model(tmp_path / "bad.pt", model, "embedding-net", None, image_size=28, channels=1, invert=1)
