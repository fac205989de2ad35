"""Networks: the embedding CNN and the heads and wrappers that train it.

``EmbeddingNet`` maps images ``(B, C, H, W)`` to embeddings ``(B, D)``; ``EmbeddingNetL2`` puts
them on the unit sphere; ``ClassificationNet`` adds a softmax classifier (the baseline);
``SiameseNet`` and ``TripletNet`` run one shared embedding net on two or three inputs. Every model
has ``get_embedding(x)`` returning ``(B, D)``.
"""

import torch.nn as nn
import torch.nn.functional as F


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class EmbeddingNet(nn.Module):
    """The classic embedding CNN.

    conv 5x5 (32) -> PReLU -> max-pool 2 -> conv 5x5 (64) -> PReLU -> max-pool 2 -> dense 256 ->
    PReLU -> dense 256 -> PReLU -> dense ``embedding_dim``.

    Takes images ``(B, in_channels, image_size, image_size)``; returns ``(B, embedding_dim)``.
    ``image_size`` must be at least 16 (28 for MNIST, 32 for CIFAR-10).
    """

    def __init__(self, embedding_dim=2, in_channels=1, image_size=28):
        super().__init__()
        self.embedding_dim = _positive_int(embedding_dim, "embedding_dim")
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.image_size = _positive_int(image_size, "image_size")
        feature_size = ((image_size - 4) // 2 - 4) // 2
        if feature_size < 1:
            raise ValueError(f"image_size must be >= 16 for two 5x5 convolutions and two 2x2 "
                             f"poolings, got {image_size}")
        self.convnet = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5), nn.PReLU(), nn.MaxPool2d(2, stride=2),
            nn.Conv2d(32, 64, 5), nn.PReLU(), nn.MaxPool2d(2, stride=2),
        )
        self.fc = nn.Sequential(
            nn.Linear(64 * feature_size * feature_size, 256), nn.PReLU(),
            nn.Linear(256, 256), nn.PReLU(),
            nn.Linear(256, embedding_dim),
        )

    def forward(self, x):
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"expected images of shape (B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got {tuple(x.shape)}")
        return self.fc(self.convnet(x).flatten(1))

    def get_embedding(self, x):
        return self.forward(x)


class EmbeddingNetL2(EmbeddingNet):
    """``EmbeddingNet`` whose embeddings ``(B, embedding_dim)`` have unit L2 norm. Normalises out of
    place (the classic divided in place, which breaks autograd) and keeps a finite gradient at a
    zero embedding."""

    def forward(self, x):
        return F.normalize(super().forward(x), p=2.0, dim=1, eps=1e-12)


class ClassificationNet(nn.Module):
    """Softmax classifier on top of an embedding net: embedding -> PReLU -> linear ``n_classes``.

    ``forward(x)`` returns log-probabilities ``(B, n_classes)`` (train with ``nn.NLLLoss``);
    ``get_embedding(x)`` returns the activated embedding ``(B, D)``. Works for any embedding size:
    it is read from ``embedding_net.embedding_dim``, or inferred on the first call when the net has
    no such attribute (the classic code assumed 2).
    """

    def __init__(self, embedding_net, n_classes):
        super().__init__()
        self.embedding_net = embedding_net
        self.n_classes = _positive_int(n_classes, "n_classes")
        self.nonlinear = nn.PReLU()
        embedding_dim = getattr(embedding_net, "embedding_dim", None)
        self.fc1 = nn.Linear(embedding_dim, n_classes) if embedding_dim else nn.LazyLinear(n_classes)

    def forward(self, x):
        return F.log_softmax(self.fc1(self.get_embedding(x)), dim=-1)

    def get_embedding(self, x):
        return self.nonlinear(self.embedding_net(x))


class SiameseNet(nn.Module):
    """One embedding net applied to both inputs: ``forward(x1, x2) -> (e1 (B, D), e2 (B, D))``."""

    def __init__(self, embedding_net):
        super().__init__()
        self.embedding_net = embedding_net

    def forward(self, x1, x2):
        return self.embedding_net(x1), self.embedding_net(x2)

    def get_embedding(self, x):
        return self.embedding_net(x)


class TripletNet(nn.Module):
    """One embedding net applied to anchor, positive and negative:
    ``forward(x1, x2, x3) -> (e1, e2, e3)``, each ``(B, D)``."""

    def __init__(self, embedding_net):
        super().__init__()
        self.embedding_net = embedding_net

    def forward(self, x1, x2, x3):
        return self.embedding_net(x1), self.embedding_net(x2), self.embedding_net(x3)

    def get_embedding(self, x):
        return self.embedding_net(x)
