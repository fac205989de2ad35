"""Networks: the classic architecture layer by layer, shapes, wrappers and argument errors, the architecture
registry (NETWORKS, build_network), ResNetEmbedding and its pretrained weights, the autoencoders and VAEs."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from losses import ContrastiveLoss, PairwiseAutoencoderLoss, kl_to_standard_normal
from model_file import load_model, save_model
from networks import (LOG_VAR_RANGE, NETWORKS, VAE, Autoencoder, AutoencoderOutput, ClassificationNet, ConvDecoder,
                      ConvEncoder, EmbeddingNet, EmbeddingNetL2, MLPDecoder, MLPEncoder, ResNetEmbedding,
                      ShiftAveragedEmbedding, SiameseAutoencoder, SiameseNet, SiameseNetwork, TripletAutoencoder,
                      TripletNet, build_network, make_autoencoder)
from utils import AllPositivePairSelector

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n, channels, size, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _resnet18_file(tmp_path, name="resnet18.pth"):
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path, state


def test_embedding_net_is_the_classic_architecture():
    net = EmbeddingNet()
    conv = [type(m) for m in net.convnet]
    assert conv == [nn.Conv2d, nn.PReLU, nn.MaxPool2d, nn.Conv2d, nn.PReLU, nn.MaxPool2d]
    assert (net.convnet[0].in_channels, net.convnet[0].out_channels, net.convnet[0].kernel_size) == (1, 32, (5, 5))
    assert (net.convnet[3].in_channels, net.convnet[3].out_channels, net.convnet[3].kernel_size) == (32, 64, (5, 5))
    assert [net.convnet[i].kernel_size for i in (2, 5)] == [2, 2]
    dense = [(m.in_features, m.out_features) for m in net.fc if isinstance(m, nn.Linear)]
    assert dense == [(64 * 4 * 4, 256), (256, 256), (256, 2)]
    assert [type(m) for m in net.fc] == [nn.Linear, nn.PReLU, nn.Linear, nn.PReLU, nn.Linear]
    # The classic parameter count: a script's saved state_dict must load.
    assert sum(p.numel() for p in net.parameters()) == 832 + 1 + 51264 + 1 + 262400 + 1 + 65792 + 1 + 514


@pytest.mark.parametrize("embedding_dim, in_channels, image_size, flat", [
    (2, 1, 28, 64 * 4 * 4), (64, 3, 32, 64 * 5 * 5), (16, 1, 16, 64), (8, 1, 105, 64 * 23 * 23)])
def test_embedding_net_shapes(embedding_dim, in_channels, image_size, flat):
    net = EmbeddingNet(embedding_dim, in_channels, image_size)
    assert net.fc[0].in_features == flat
    x = torch.randn(3, in_channels, image_size, image_size)
    assert net(x).shape == (3, embedding_dim)
    assert torch.equal(net.get_embedding(x), net(x))


def test_embedding_net_errors():
    with pytest.raises(ValueError, match="image_size must be >= 16"):
        EmbeddingNet(image_size=15)
    with pytest.raises(ValueError, match="embedding_dim must be >= 1"):
        EmbeddingNet(embedding_dim=0)
    with pytest.raises(TypeError, match="in_channels must be an int"):
        EmbeddingNet(in_channels=1.0)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 28, 28\)"):
        EmbeddingNet()(torch.randn(2, 3, 28, 28))


def test_l2_net_gives_unit_norm_out_of_place_with_finite_gradient_at_zero():
    torch.manual_seed(0)
    net = EmbeddingNetL2(embedding_dim=8)
    x = torch.randn(5, 1, 28, 28, requires_grad=True)
    out = net(x)
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-6)
    out.sum().backward()  # an in-place division on a tensor autograd needs would raise here
    assert x.grad.isfinite().all()
    # A zero embedding: force the last layer to output exactly 0.
    nn.init.zeros_(net.fc[-1].weight)
    nn.init.zeros_(net.fc[-1].bias)
    x.grad = None
    out = net(x)
    assert torch.equal(out, torch.zeros_like(out))
    out.pow(2).sum().backward()
    assert all(p.grad.isfinite().all() for p in net.parameters() if p.grad is not None)
    assert x.grad.isfinite().all()


def test_classification_net_any_embedding_size_and_lazy_inference():
    net = ClassificationNet(EmbeddingNet(embedding_dim=64), n_classes=10)
    x = torch.randn(4, 1, 28, 28)
    scores = net(x)
    assert scores.shape == (4, 10)
    assert torch.allclose(scores.exp().sum(1), torch.ones(4), atol=1e-5)  # log-probabilities
    assert net.get_embedding(x).shape == (4, 64)
    nn.NLLLoss()(scores, torch.tensor([0, 1, 2, 3])).backward()

    # An embedding net without an ``embedding_dim`` attribute: the size is inferred on first call.
    plain = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 5))
    lazy = ClassificationNet(plain, n_classes=3)
    assert lazy(x).shape == (4, 3)
    assert lazy.fc1.in_features == 5


def test_classification_net_errors():
    with pytest.raises(ValueError, match="n_classes must be >= 1"):
        ClassificationNet(EmbeddingNet(), 0)


def test_siamese_and_triplet_nets_share_one_embedding_net():
    torch.manual_seed(0)
    embedding_net = EmbeddingNet()
    x1, x2, x3 = (torch.randn(2, 1, 28, 28) for _ in range(3))
    e1, e2 = SiameseNet(embedding_net)(x1, x2)
    assert torch.equal(e1, embedding_net(x1)) and torch.equal(e2, embedding_net(x2))
    t1, t2, t3 = TripletNet(embedding_net)(x1, x2, x3)
    assert torch.equal(t3, embedding_net(x3))
    assert torch.equal(SiameseNet(embedding_net).get_embedding(x1), embedding_net(x1))
    assert torch.equal(TripletNet(embedding_net).get_embedding(x1), embedding_net(x1))
    assert len(list(SiameseNet(embedding_net).parameters())) == len(list(embedding_net.parameters()))



@pytest.mark.parametrize("wrapper, n_inputs", [(SiameseNet, 2), (TripletNet, 3)])
def test_shared_wrappers_keep_their_state_dict_keys_and_count_their_inputs(wrapper, n_inputs):
    embedding_net = EmbeddingNet()
    model = wrapper(embedding_net)
    assert model.embedding_net is embedding_net
    assert list(model.state_dict()) == [f"embedding_net.{key}" for key in embedding_net.state_dict()]
    with pytest.raises(TypeError, match=f"takes {n_inputs} inputs"):
        model(*[torch.randn(1, 1, 28, 28)] * (n_inputs + 1))
    autoencoder = make_autoencoder((6,), 2)
    wrapped = {2: SiameseAutoencoder, 3: TripletAutoencoder}[n_inputs](autoencoder)
    assert list(wrapped.state_dict()) == [f"autoencoder.{key}" for key in autoencoder.state_dict()]
    assert len(wrapped(*[torch.randn(4, 6)] * n_inputs)) == n_inputs


def test_similarity_has_a_finite_gradient_at_zero_distance_and_passes_nan_on():
    embeddings = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0], [5.0, -1.0, 3.0]], requires_grad=True)
    others = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, -1.0, 3.0]])
    scores = SiameseNetwork.embedding_similarity(embeddings, others)
    assert scores.tolist() == [1.0, 0.25, 1.0]
    (gradient,) = torch.autograd.grad(scores.sum(), embeddings)
    assert torch.isfinite(gradient).all() and torch.equal(gradient[[0, 2]], torch.zeros(2, 3))
    # d/de 1 / (1 + |e|) = -e / (|e| (1 + |e|)^2) at e = (1, 2, 2), |e| = 3
    assert torch.allclose(gradient[1], -torch.tensor([1.0, 2.0, 2.0]) / 48)
    broken = embeddings.detach().clone()
    broken[1, 0] = float("nan")
    assert torch.isnan(SiameseNetwork.embedding_similarity(broken, others)[1])


def shifted_by_index(images, dy, dx):
    """images moved down dy and right dx pixels, wrapping around, by explicit index arithmetic."""
    height, width = images.shape[-2:]
    rows = [(i - dy) % height for i in range(height)]
    columns = [(j - dx) % width for j in range(width)]
    return images[:, :, rows][:, :, :, columns]


@pytest.mark.parametrize("shift", [0, 1, 2, 5])
def test_shift_averaged_embedding_is_the_mean_over_the_shifted_views(shift):
    torch.manual_seed(shift)
    model = EmbeddingNet(3).eval()
    images = torch.randn(4, 1, 28, 28)
    wrapped = ShiftAveragedEmbedding(model, shift=shift)
    offsets = sorted({-shift, 0, shift})
    expected = torch.stack([model.get_embedding(shifted_by_index(images, dy, dx))
                            for dy in offsets for dx in offsets]).mean(0)
    with torch.no_grad():
        assert torch.allclose(wrapped(images), expected, atol=1e-5)
        assert wrapped.get_embedding(images).shape == (4, 3)
    if shift == 0:
        assert torch.equal(wrapped(images), model(images))


def test_shift_averaged_embedding_wraps_modes_and_checks_arguments():
    model = EmbeddingNet(2)
    wrapped = ShiftAveragedEmbedding(model).eval()
    assert not model.training and list(wrapped.parameters()) == list(model.parameters())
    with pytest.raises(TypeError, match="get_embedding"):
        ShiftAveragedEmbedding(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="shift must be"):
        ShiftAveragedEmbedding(model, shift=-1)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        wrapped(torch.randn(28, 28))


def test_embedding_net_with_batch_norm_cannot_collapse_in_training_and_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    net = EmbeddingNet(3, batch_norm=True)
    images = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        before = net.fc[:5](net.convnet(images).flatten(1))  # the classic network's output, before the BatchNorm
        embeddings = net(images)
    assert float(before.var(0).max()) < 0.05  # an untrained network maps everything close together
    torch.testing.assert_close(embeddings.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    variances = embeddings.var(0, unbiased=False)  # var / (var + eps): 1 but for BatchNorm's eps of 1e-5
    assert bool(((variances > 0.9) & (variances <= 1 + 1e-5)).all()), variances
    assert net.config() == {"embedding_dim": 3, "in_channels": 1, "image_size": 28, "batch_norm": True}
    assert "batch_norm" not in EmbeddingNet(3).config()  # the classic network's config is unchanged
    net.eval()
    path = save_model(tmp_path / "bn.pt", net, "embedding-net", None, image_size=28, channels=1)
    loaded, info = load_model(path)
    assert info["arguments"]["batch_norm"] is True
    torch.testing.assert_close(loaded.get_embedding(images), net.get_embedding(images))  # running statistics too
    with pytest.raises(TypeError, match="batch_norm"):
        EmbeddingNet(3, batch_norm="yes")


def test_embedding_net_with_normalize_gives_unit_norms_after_its_batch_norm_and_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    images = torch.randn(16, 1, 28, 28)
    for batch_norm in (False, True):
        net = EmbeddingNet(5, batch_norm=batch_norm, normalize=True)
        plain = EmbeddingNet(5, batch_norm=batch_norm)
        plain.load_state_dict(net.state_dict())  # the same layers: normalize adds no weights
        out = net(images)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(16))
        torch.testing.assert_close(out, torch.nn.functional.normalize(plain(images), dim=1))
        assert net.config() == {"embedding_dim": 5, "in_channels": 1, "image_size": 28, "normalize": True,
                                **({"batch_norm": True} if batch_norm else {})}
        net.eval()
        loaded, info = load_model(save_model(tmp_path / f"l2_{batch_norm}.pt", net, "embedding-net", None,
                                             image_size=28, channels=1))
        assert info["arguments"]["normalize"] is True
        torch.testing.assert_close(loaded.get_embedding(images), net.get_embedding(images))
    assert "normalize" not in EmbeddingNet(3).config()  # the classic network's config is unchanged
    l2 = EmbeddingNetL2(5)
    assert l2.normalize and l2.config()["normalize"] is True
    with pytest.raises(TypeError, match="normalize"):
        EmbeddingNet(3, normalize=1)


def test_build_network_and_its_errors():
    assert set(NETWORKS) == {"embedding-net", "resnet18", "siamese-network"}
    assert isinstance(build_network("embedding-net", embedding_dim=3), EmbeddingNet)
    assert build_network("siamese-network", image_size=28, channels=4).config()["channels"] == 4
    with pytest.raises(ValueError, match="unknown architecture 'vgg'; choose one of embedding-net, resnet18"):
        build_network("vgg")
    with pytest.raises(TypeError, match=r"arguments \['size'\] do not fit architecture 'embedding-net'"):
        build_network("embedding-net", size=3)


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
    code = "import sys, networks; print('model_file' in sys.modules)"  # the imports go model_file -> networks
    result = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------
# Autoencoders and VAEs (the siamese / triplet autoencoder experiment is autoencoders.py's)

AUTOENCODER_SHAPES = [(20,), (1, 28, 28), (3, 32, 32)]


def batch(shape, n=8, seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def test_encoder_and_decoder_shapes():
    assert MLPEncoder(20, (16, 8))(torch.rand(5, 20)).shape == (5, 8)
    assert MLPDecoder(3, 20, (8, 16))(torch.rand(5, 3)).shape == (5, 20)
    assert ConvEncoder(1, 28)(torch.rand(5, 1, 28, 28)).shape == (5, 256)
    assert ConvEncoder(3, 32, output_dim=64)(torch.rand(5, 3, 32, 32)).shape == (5, 64)
    assert ConvDecoder(4, 1, 28)(torch.rand(5, 4)).shape == (5, 1, 28, 28)
    assert ConvDecoder(4, 3, 32)(torch.rand(5, 4)).shape == (5, 3, 32, 32)


@pytest.mark.parametrize("shape", AUTOENCODER_SHAPES)
@pytest.mark.parametrize("variational", [False, True])
def test_autoencoder_output_shapes_and_embedding(shape, variational):
    torch.manual_seed(0)
    model = make_autoencoder(shape, 3, variational, hidden_dims=(16, 8))
    assert isinstance(model, VAE if variational else Autoencoder)
    x = batch(shape, n=6)
    output = model(x)
    assert isinstance(output, AutoencoderOutput)
    assert output.latent.shape == output.mean.shape == (6, 3)
    assert output.reconstruction.shape == x.shape
    if variational:
        assert output.log_var.shape == (6, 3)
        assert not torch.equal(output.latent, output.mean)  # a sample in training mode
        model.eval()
        evaluated = model(x)
        assert torch.equal(evaluated.latent, evaluated.mean)  # eval decodes the mean
        assert torch.equal(model.get_embedding(x), evaluated.mean)
        assert torch.equal(model.get_embedding(x), model.get_embedding(x))
    else:
        assert output.log_var is None and output.latent is output.mean
        model.eval()
        assert torch.equal(model.get_embedding(x), model(x).mean)


def test_vae_log_variance_is_bounded_and_stops_drifting_past_the_bound():
    torch.manual_seed(0)
    model = make_autoencoder((4,), 2, variational=True, hidden_dims=(8,), dropout=0.0)
    with torch.no_grad():
        model.to_log_var.bias.copy_(torch.tensor([-500.0, 500.0]))  # as if it had drifted far each way
    x = torch.randn(5, 4, requires_grad=True)
    output = model(x)
    assert (output.log_var[:, 0] == LOG_VAR_RANGE[0]).all() and (output.log_var[:, 1] == LOG_VAR_RANGE[1]).all()
    assert torch.isfinite(output.latent).all() and torch.isfinite(kl_to_standard_normal(output.mean, output.log_var)).all()
    kl_to_standard_normal(output.mean, output.log_var).sum().backward()
    assert torch.equal(model.to_log_var.weight.grad, torch.zeros_like(model.to_log_var.weight))  # no more drift
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("shape", AUTOENCODER_SHAPES)
@pytest.mark.parametrize("variational", [False, True])
def test_every_parameter_gets_a_gradient(shape, variational):
    torch.manual_seed(0)
    model = make_autoencoder(shape, 2, variational, hidden_dims=(16, 8), dropout=0.0)
    x = batch(shape)
    loss = PairwiseAutoencoderLoss(0.5, pair_selector=AllPositivePairSelector(balance=False))(model(x), x, torch.arange(8) % 3)
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_vae_reparameterisation_is_differentiable_and_distributed_right():
    torch.manual_seed(0)
    mean = torch.full((20000, 2), 3.0, requires_grad=True)
    log_var = torch.full((20000, 2), np.log(0.25), requires_grad=True)
    sample = VAE.reparameterize(mean, log_var)
    assert abs(sample.mean().item() - 3.0) < 0.02 and abs(sample.std().item() - 0.5) < 0.02
    sample.sum().backward()
    assert torch.equal(mean.grad, torch.ones_like(mean)) and log_var.grad.abs().sum() > 0


@pytest.mark.parametrize("variational", [False, True])
def test_siamese_and_triplet_wrappers_share_one_model(variational):
    torch.manual_seed(0)
    model = make_autoencoder((1, 28, 28), 2, variational).eval()
    x1, x2, x3 = (batch((1, 28, 28), n=4, seed=seed) for seed in range(3))
    siamese, triplet = SiameseAutoencoder(model), TripletAutoencoder(model)
    assert list(siamese.parameters()) == list(model.parameters()) == list(triplet.parameters())
    for wrapper, inputs in ((siamese, (x1, x2)), (triplet, (x1, x2, x3))):
        outputs = wrapper(*inputs)
        assert len(outputs) == len(inputs)
        for output, x in zip(outputs, inputs):
            expected = model(x)
            assert torch.equal(output.mean, expected.mean)
            assert torch.equal(output.reconstruction, expected.reconstruction)
        assert torch.equal(wrapper.get_embedding(x1), model.get_embedding(x1))
    # both branches train the same weights: the gradient is the sum of the two branches' gradients
    first = model.to_mean if variational else model.to_latent
    output1, output2 = siamese(x1, x2)
    (output1.mean.sum() + output2.mean.sum()).backward()
    both = first.weight.grad.clone()
    model.zero_grad()
    model(x1).mean.sum().backward()
    model(x2).mean.sum().backward()
    assert torch.allclose(both, first.weight.grad)


def test_network_arguments_are_checked():
    with pytest.raises(ValueError, match=r"\(B, 20\)"):
        MLPEncoder(20)(torch.rand(3, 21))
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        ConvEncoder(1, 28)(torch.rand(3, 1, 32, 32))
    with pytest.raises(ValueError, match="multiple of 4"):
        ConvEncoder(1, 30)
    with pytest.raises(ValueError, match="dropout"):
        MLPEncoder(20, dropout=1.0)
    with pytest.raises(TypeError, match="hidden_dims"):
        MLPEncoder(20, hidden_dims=())
    with pytest.raises(ValueError, match="latent_dim"):
        Autoencoder(MLPEncoder(20), MLPDecoder(3, 20), latent_dim=2)
    with pytest.raises(TypeError, match="output_dim"):
        VAE(torch.nn.Linear(20, 8), MLPDecoder(2, 20), latent_dim=2)
    with pytest.raises(ValueError, match="input_shape"):
        make_autoencoder((1, 28, 32), 2)


# ------------------------------------------------------------------------------- SiameseNetwork

@pytest.mark.parametrize("image_size, flat", [(28, 64), (56, 64 * 3 * 3), (105, 64 * 6 * 6)])
def test_siamese_network_shapes(image_size, flat):
    net = SiameseNetwork(image_size=image_size, embedding_dim=32)
    assert net.encoder[-1].in_features == flat and net.encoder[-1].out_features == 32
    x1, x2 = torch.randn(3, 1, image_size, image_size), torch.randn(3, 1, image_size, image_size)
    output1, output2 = net(x1, x2)
    assert output1.shape == output2.shape == (3, 32)
    net.eval()
    assert torch.allclose(net(x1, x2)[0], net.forward_one(x1), atol=1e-5)
    assert torch.allclose(net.get_embedding(x2), net.forward_one(x2))
    parameters = sum(p.numel() for p in net.parameters())
    assert parameters < 500_000  # a few MB at most once saved


def test_siamese_network_shares_one_encoder():
    net = SiameseNetwork(image_size=28).eval()
    x = torch.randn(4, 1, 28, 28)
    output1, output2 = net(x, x)
    assert torch.equal(output1, output2)
    convolutions = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convolutions) == 4  # one encoder, not one per input
    with torch.no_grad():
        net.encoder[0].weight.add_(1)
    changed1, changed2 = net(x, x)
    assert torch.equal(changed1, changed2) and not torch.equal(changed1, output1)


def test_similarity_is_in_0_1_and_decreases_with_distance():
    net = SiameseNetwork(image_size=28).eval()
    x1, x2 = torch.randn(6, 1, 28, 28), torch.randn(6, 1, 28, 28)
    scores = net.similarity(x1, x2)
    assert scores.shape == (6,) and torch.all(scores > 0) and torch.all(scores <= 1)
    assert torch.allclose(net.similarity(x1, x1), torch.ones(6))
    distances = (net.forward_one(x1) - net.forward_one(x2)).norm(dim=1)
    assert torch.allclose(scores, 1 / (1 + distances))
    origin = torch.zeros(5, 3)
    points = torch.tensor([0.0, 0.5, 1.0, 10.0, 1e4])[:, None] * torch.tensor([[1.0, 2.0, 2.0]])
    values = SiameseNetwork.embedding_similarity(origin, points)
    assert values[0] == 1 and torch.all(values[1:] < values[:-1]) and values[-1] > 0
    assert values[2] == pytest.approx(1 / 4)  # distance 3


def test_similarity_gradient_is_finite_for_identical_embeddings():
    embeddings = torch.zeros(2, 3, requires_grad=True)
    SiameseNetwork.embedding_similarity(embeddings, torch.zeros(2, 3)).sum().backward()
    assert torch.isfinite(embeddings.grad).all()


def test_verify_thresholds_the_similarity():
    net = SiameseNetwork(image_size=28).eval()
    x1, x2 = torch.randn(8, 1, 28, 28), torch.randn(8, 1, 28, 28)
    scores = net.similarity(x1, x2).detach()
    threshold = float(scores.median())
    decisions = net.verify(x1, x2, threshold)
    assert decisions.dtype == torch.bool and torch.equal(decisions, scores >= threshold)
    assert torch.all(net.verify(x1, x1, 1.0))
    with pytest.raises(TypeError, match="threshold"):
        net.verify(x1, x2, "0.5")


def test_contrastive_loss_trains_the_siamese_network():
    torch.manual_seed(0)
    net = SiameseNetwork(image_size=16, embedding_dim=8, channels=8)
    x1, x2 = torch.randn(6, 1, 16, 16), torch.randn(6, 1, 16, 16)
    label = torch.tensor([1, 0, 1, 0, 1, 0])
    loss = ContrastiveLoss(margin=2.0)(*net(x1, x2), label)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in net.parameters())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = ContrastiveLoss(margin=2.0)(*net(x1, x2), label)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_siamese_network_options_and_config():
    net = SiameseNetwork(image_size=56, embedding_dim=16, channels=8, n_blocks=3, normalize=True).eval()
    embeddings = net.forward_one(torch.randn(4, 1, 56, 56))
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(4))
    rebuilt = SiameseNetwork(**net.config())
    rebuilt.load_state_dict(net.state_dict())
    rebuilt.eval()
    x = torch.randn(2, 1, 56, 56)
    assert torch.equal(rebuilt.forward_one(x), net.forward_one(x))


def test_siamese_network_errors():
    with pytest.raises(ValueError, match="image_size must be >= 16"):
        SiameseNetwork(image_size=15)
    with pytest.raises(TypeError, match="embedding_dim must be an int"):
        SiameseNetwork(embedding_dim=2.0)
    net = SiameseNetwork(image_size=28)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 28, 28\)"):
        net.forward_one(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="one shape"):
        net.similarity(torch.randn(2, 1, 28, 28), torch.randn(3, 1, 28, 28))
