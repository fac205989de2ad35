"""Networks: the classic architecture layer by layer, shapes, wrappers and argument errors."""

import pytest
import torch
import torch.nn as nn

from networks import (ClassificationNet, EmbeddingNet, EmbeddingNetL2, ShiftAveragedEmbedding, SiameseAutoencoder,
                      SiameseNet, SiameseNetwork, TripletAutoencoder, TripletNet, make_autoencoder)


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
    from networks import load_model, save_model
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
