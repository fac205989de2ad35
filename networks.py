"""Networks: the embedding CNN and the heads and wrappers that train it.

``EmbeddingNet`` maps images ``(B, C, H, W)`` to embeddings ``(B, D)``; ``EmbeddingNetL2`` puts
them on the unit sphere; ``ClassificationNet`` adds a softmax classifier (the baseline);
``SiameseNet`` and ``TripletNet`` run one shared embedding net on two or three inputs. Every model
has ``get_embedding(x)`` returning ``(B, D)``.

``SiameseNetwork`` is the one-shot model (Koch, Zemel and Salakhutdinov, 2015 style): one
convolutional encoder shared by both inputs, a similarity score in (0, 1] and a verify decision.
``ShiftAveragedEmbedding`` wraps any of them for test-time augmentation (mean over shifted copies).

``Autoencoder`` and ``VAE`` (built from ``MLPEncoder``/``MLPDecoder`` for feature vectors ``(B, D)`` or
``ConvEncoder``/``ConvDecoder`` for images ``(B, C, S, S)``, or by ``make_autoencoder``) return an
``AutoencoderOutput`` (latent, reconstruction, mean, log_var); ``SiameseAutoencoder`` and
``TripletAutoencoder`` share one of them across two or three inputs.

``ResNetEmbedding`` is torchvision's resnet18 as an embedding net (random, a resnet18 state dict file or
the ImageNet weights already in torch's cache: never downloaded). ``NETWORKS`` names the architectures a
model file can hold and ``build_network`` builds one by name; the model file itself (``save_model``,
``load_model``, ``embed_images``) is ``model_file.py``'s, which imports this module (the old names
``networks.save_model``, ... still resolve for one release, with a DeprecationWarning).
"""

import inspect
import numbers
import os
from typing import NamedTuple, Optional
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from distances import paired_squared_distances
from utils import check_choice, check_flag, check_int, moved_attribute


class EmbeddingNet(nn.Module):
    """The classic embedding CNN.

    conv 5x5 (32) -> PReLU -> max-pool 2 -> conv 5x5 (64) -> PReLU -> max-pool 2 -> dense 256 ->
    PReLU -> dense 256 -> PReLU -> dense ``embedding_dim``.

    Takes images ``(B, in_channels, image_size, image_size)``; returns ``(B, embedding_dim)``.
    ``image_size`` must be at least 16 (28 for MNIST, 32 for CIFAR-10). ``batch_norm=True`` ends the
    network with a ``BatchNorm1d`` without learned scale and shift: in training every dimension of a
    batch's embeddings then has mean 0 and variance 1 (as long as the variance before it stays well
    above BatchNorm's eps, 1e-5), so they cannot shrink to a point, what hard triplet mining falls into
    with the classic network, which has no normalisation layer; evaluation uses the running statistics.
    ``normalize=True`` divides each embedding by its L2 norm last (after the BatchNorm, if any), so that
    Euclidean distances between embeddings are a function of their cosine similarity, the geometry that
    ``MultiSimilarityLoss`` trains (``EmbeddingNetL2`` is this network with ``normalize=True``).
    """

    def __init__(self, embedding_dim=2, in_channels=1, image_size=28, batch_norm=False, normalize=False):
        super().__init__()
        self.embedding_dim = check_int(embedding_dim, "embedding_dim", 1)
        self.in_channels = check_int(in_channels, "in_channels", 1)
        self.image_size = check_int(image_size, "image_size", 1)
        self.batch_norm = check_flag(batch_norm, "batch_norm")
        self.normalize = check_flag(normalize, "normalize")
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
            *([nn.BatchNorm1d(embedding_dim, affine=False)] if batch_norm else []),
        )

    def config(self):
        """The constructor arguments, e.g. to save next to the weights and rebuild the network
        (``batch_norm`` and ``normalize`` only when on, so the classic network's config is the classic one)."""
        config = {"embedding_dim": self.embedding_dim, "in_channels": self.in_channels, "image_size": self.image_size}
        return dict(config, **{flag: True for flag in ("batch_norm", "normalize") if getattr(self, flag)})

    def forward(self, x):
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"expected images of shape (B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got {tuple(x.shape)}")
        embeddings = self.fc(self.convnet(x).flatten(1))
        # out of place (the classic divided in place, which breaks autograd); eps keeps a zero embedding finite
        return F.normalize(embeddings, p=2.0, dim=1, eps=1e-12) if self.normalize else embeddings

    def get_embedding(self, x):
        return self.forward(x)


class EmbeddingNetL2(EmbeddingNet):
    """``EmbeddingNet`` whose embeddings ``(B, embedding_dim)`` have unit L2 norm: ``EmbeddingNet(...,
    normalize=True)`` under the classic name."""

    def __init__(self, embedding_dim=2, in_channels=1, image_size=28, batch_norm=False):
        super().__init__(embedding_dim, in_channels, image_size, batch_norm, normalize=True)


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
        self.n_classes = check_int(n_classes, "n_classes", 1)
        self.nonlinear = nn.PReLU()
        embedding_dim = getattr(embedding_net, "embedding_dim", None)
        self.fc1 = nn.Linear(embedding_dim, n_classes) if embedding_dim else nn.LazyLinear(n_classes)

    def forward(self, x):
        return F.log_softmax(self.fc1(self.get_embedding(x)), dim=-1)

    def get_embedding(self, x):
        return self.nonlinear(self.embedding_net(x))


class _SharedAcrossInputs(nn.Module):
    """One module applied to each of ``n_inputs`` inputs: ``forward(x1, ..., xn)`` returns the tuple
    of its outputs, in order. The module is kept under the attribute ``shared_name`` (so state dicts
    keep their keys, e.g. ``embedding_net.*``); ``get_embedding(x)`` is its own ``get_embedding``, or
    its output when it has none."""

    n_inputs = None
    shared_name = None

    def __init__(self, module):
        super().__init__()
        setattr(self, self.shared_name, module)

    def forward(self, *inputs):
        if len(inputs) != self.n_inputs:
            raise TypeError(f"{type(self).__name__} takes {self.n_inputs} inputs, got {len(inputs)}")
        shared = getattr(self, self.shared_name)
        return tuple(shared(x) for x in inputs)

    def get_embedding(self, x):
        shared = getattr(self, self.shared_name)
        return shared.get_embedding(x) if hasattr(shared, "get_embedding") else shared(x)


class SiameseNet(_SharedAcrossInputs):
    """One embedding net applied to both inputs: ``forward(x1, x2) -> (e1 (B, D), e2 (B, D))``;
    ``get_embedding(x) -> (B, D)``."""

    n_inputs, shared_name = 2, "embedding_net"

    def __init__(self, embedding_net):
        super().__init__(embedding_net)


class TripletNet(_SharedAcrossInputs):
    """One embedding net applied to anchor, positive and negative:
    ``forward(x1, x2, x3) -> (e1, e2, e3)``, each ``(B, D)``; ``get_embedding(x) -> (B, D)``."""

    n_inputs, shared_name = 3, "embedding_net"

    def __init__(self, embedding_net):
        super().__init__(embedding_net)


class SiameseNetwork(nn.Module):
    """A siamese network for one-shot learning: one encoder, shared by both inputs.

    The encoder is ``n_blocks`` blocks of conv 3x3 (``channels``) -> BatchNorm -> ReLU -> max-pool 2,
    then a linear layer to ``embedding_dim`` (optionally L2-normalised). It is built for square images
    ``(B, in_channels, image_size, image_size)``: 105 (Omniglot's own size), or resized characters
    such as 28 or 56; ``image_size`` must be at least ``2 ** n_blocks``.

    - ``forward_one(x)`` / ``get_embedding(x)``: images ``(B, C, S, S)`` -> embeddings ``(B, D)``;
    - ``forward(input1, input2) -> (output1, output2)``: both batches through the same encoder (in one
      call, so BatchNorm sees them together), ready for ``ContrastiveLoss(margin)(output1, output2,
      label)`` with label 1 for a same-class pair; ``forward(x)`` alone returns ``forward_one(x)``, so
      the online losses (``OnlineTripletLoss`` on ``BalancedBatchSampler`` batches) train it as well;
    - ``similarity(input1, input2)``: ``(B,)`` scores ``1 / (1 + d)`` in (0, 1], d the Euclidean
      distance of the embeddings: 1 for identical embeddings, decreasing with the distance;
    - ``verify(input1, input2, threshold)``: ``(B,)`` bool, ``similarity >= threshold`` (same class).
    """

    def __init__(self, image_size=105, embedding_dim=64, in_channels=1, channels=64, n_blocks=4,
                 normalize=False):
        super().__init__()
        self.image_size = check_int(image_size, "image_size", 1)
        self.embedding_dim = check_int(embedding_dim, "embedding_dim", 1)
        self.in_channels = check_int(in_channels, "in_channels", 1)
        self.channels = check_int(channels, "channels", 1)
        self.n_blocks = check_int(n_blocks, "n_blocks", 1)
        self.normalize = check_flag(normalize, "normalize")
        feature_size = image_size // 2 ** n_blocks
        if feature_size < 1:
            raise ValueError(f"image_size must be >= {2 ** n_blocks} for {n_blocks} 2x2 poolings, got "
                             f"{image_size}; lower n_blocks or resize the images")
        layers = []
        for block in range(n_blocks):
            layers += [nn.Conv2d(in_channels if block == 0 else channels, channels, 3, padding=1),
                       nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2)]
        self.encoder = nn.Sequential(*layers, nn.Flatten(),
                                     nn.Linear(channels * feature_size * feature_size, embedding_dim))

    def config(self):
        """The constructor arguments, e.g. to save next to the weights and rebuild the network."""
        return {"image_size": self.image_size, "embedding_dim": self.embedding_dim,
                "in_channels": self.in_channels, "channels": self.channels, "n_blocks": self.n_blocks,
                "normalize": self.normalize}

    def forward_one(self, x):
        """Embeddings ``(B, embedding_dim)`` of images ``(B, in_channels, image_size, image_size)``."""
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"expected images of shape (B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got {tuple(x.shape)}; resize them to image_size")
        embeddings = self.encoder(x)
        return F.normalize(embeddings, dim=1) if self.normalize else embeddings

    def forward(self, input1, input2=None):
        if input2 is None:  # one batch: its embeddings, so online (batch-mined) losses train it too
            return self.forward_one(input1)
        embeddings = self.forward_one(torch.cat([input1, input2]))
        return embeddings[:len(input1)], embeddings[len(input1):]

    def get_embedding(self, x):
        return self.forward_one(x)

    @staticmethod
    def embedding_similarity(embeddings1, embeddings2):
        """``1 / (1 + |e1 - e2|)`` row by row, for embeddings ``(B, D)`` each: ``(B,)`` in (0, 1]."""
        if embeddings1.shape != embeddings2.shape or embeddings1.dim() != 2:
            raise ValueError(f"expected two (B, D) embedding batches of one shape, got "
                             f"{tuple(embeddings1.shape)} and {tuple(embeddings2.shape)}")
        squared = paired_squared_distances(embeddings1, embeddings2)
        # sqrt'(0) is infinite and 0 * inf is NaN: rows at zero distance take the root of a stand-in
        # 1 and are then replaced by 0, so their gradient is 0 (as |e1 - e2|'s subgradient) and finite.
        # (Testing == 0, not > 0, lets a NaN distance through to a NaN score.)
        zero = squared == 0
        distances = torch.where(zero, 0.0, torch.where(zero, 1.0, squared).sqrt())
        return 1 / (1 + distances)

    def similarity(self, input1, input2):
        """Scores ``(B,)`` in (0, 1] of image pairs ``(B, C, S, S)`` x 2: high for the same class."""
        if input1.shape != input2.shape:
            raise ValueError(f"input1 and input2 must have one shape, got {tuple(input1.shape)} and "
                             f"{tuple(input2.shape)}")
        return self.embedding_similarity(*self.forward(input1, input2))

    def verify(self, input1, input2, threshold):
        """``(B,)`` bool: True where ``similarity(input1, input2) >= threshold`` (the same class).
        Runs without gradients; call ``eval()`` first for BatchNorm's running statistics."""
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"threshold must be a number in (0, 1], got {type(threshold).__name__}")
        with torch.no_grad():
            return self.similarity(input1, input2) >= threshold


class ShiftAveragedEmbedding(nn.Module):
    """Test-time augmentation for any embedding model: the mean embedding of an image shifted by
    every ``(dy, dx)`` in ``{-shift, 0, shift}^2`` pixels (9 views; ``shift=0`` is the model itself).

    ``get_embedding(x)`` / ``forward(x)``: images ``(B, C, H, W)`` -> ``(B, D)``. Shifts wrap around
    (``torch.roll``), which is harmless for images with a blank border such as Omniglot characters.
    Wrap a trained model for evaluation (``n_way_k_shot_accuracy``, ``one_shot_run_errors``, ...); it
    has no parameters of its own and forwards ``train()``/``eval()`` to the model.
    """

    def __init__(self, embedding_net, shift=2):
        super().__init__()
        if not callable(getattr(embedding_net, "get_embedding", None)):
            raise TypeError(f"embedding_net must have a get_embedding method, got {type(embedding_net).__name__}")
        self.embedding_net = embedding_net
        self.shift = check_int(shift, "shift", 0)

    def get_embedding(self, x):
        if x.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        offsets = (-self.shift, 0, self.shift) if self.shift else (0,)
        views = [self.embedding_net.get_embedding(torch.roll(x, (dy, dx), dims=(2, 3)))
                 for dy in offsets for dx in offsets]  # one view at a time: 9x the batch would not fit
        return torch.stack(views).mean(0)

    def forward(self, x):
        return self.get_embedding(x)


# ---------------------------------------------------------------------------------------------------
# Autoencoders and VAEs for siamese / triplet autoencoding: encoder bodies, decoders, the two models
# and the wrappers that share one model across two or three inputs.


def _check_dropout(dropout):
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"dropout must be a probability in [0, 1), got {type(dropout).__name__}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return float(dropout)


def _check_hidden_dims(hidden_dims):
    if isinstance(hidden_dims, int) and not isinstance(hidden_dims, bool):
        hidden_dims = (hidden_dims,)
    if not isinstance(hidden_dims, (list, tuple)) or not hidden_dims:
        raise TypeError(f"hidden_dims must be a non-empty sequence of layer sizes such as (512, 256), "
                        f"got {hidden_dims!r}")
    return tuple(check_int(size, "every hidden size", 1) for size in hidden_dims)


def _dense_stack(sizes, dropout):
    """linear -> PReLU -> dropout for each step of ``sizes`` (input size first)."""
    layers = []
    for size_in, size_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(size_in, size_out), nn.PReLU(), nn.Dropout(dropout)]
    return layers


def _check_feature_batch(x, width, what):
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"{what} expects feature vectors of shape (B, {width}), got {tuple(x.shape)}")


class MLPEncoder(nn.Module):
    """Encoder body for flat feature vectors: ``(B, input_dim) -> (B, output_dim)``.

    Each size of ``hidden_dims`` is a layer linear -> PReLU -> dropout(``dropout``); ``output_dim`` is
    ``hidden_dims[-1]``. The latent heads (``Autoencoder``'s code, ``VAE``'s mean and log-variance)
    sit on top of it.
    """

    def __init__(self, input_dim, hidden_dims=(512, 256), dropout=0.2):
        super().__init__()
        self.input_dim = check_int(input_dim, "input_dim", 1)
        self.hidden_dims = _check_hidden_dims(hidden_dims)
        self.dropout = _check_dropout(dropout)
        self.output_dim = self.hidden_dims[-1]
        self.layers = nn.Sequential(*_dense_stack((self.input_dim, *self.hidden_dims), self.dropout))

    def forward(self, x):
        _check_feature_batch(x, self.input_dim, type(self).__name__)
        return self.layers(x)


class MLPDecoder(nn.Module):
    """Decoder for flat feature vectors: latent codes ``(B, latent_dim) -> (B, output_dim)``.

    Hidden layers linear -> PReLU -> dropout, one per size of ``hidden_dims`` (the encoder's sizes in
    reverse order mirror it), then a linear output layer without activation: the values themselves
    for an MSE reconstruction, logits for a BCE one.
    """

    def __init__(self, latent_dim, output_dim, hidden_dims=(256, 512), dropout=0.2):
        super().__init__()
        self.latent_dim = check_int(latent_dim, "latent_dim", 1)
        self.output_dim = check_int(output_dim, "output_dim", 1)
        self.hidden_dims = _check_hidden_dims(hidden_dims)
        self.dropout = _check_dropout(dropout)
        self.layers = nn.Sequential(*_dense_stack((self.latent_dim, *self.hidden_dims), self.dropout),
                                    nn.Linear(self.hidden_dims[-1], self.output_dim))

    def forward(self, z):
        _check_feature_batch(z, self.latent_dim, type(self).__name__)
        return self.layers(z)


def _check_image_geometry(in_channels, image_size):
    check_int(in_channels, "in_channels", 1)
    check_int(image_size, "image_size", 1)
    if image_size % 4 or image_size < 8:
        raise ValueError(f"image_size must be a multiple of 4 and at least 8 (two stride-2 layers halve it "
                         f"exactly), got {image_size}; 28 for MNIST, 32 for CIFAR-10")


class ConvEncoder(nn.Module):
    """Encoder body for images: ``(B, in_channels, image_size, image_size) -> (B, output_dim)``.

    conv 4x4 stride 2 (32) -> PReLU -> conv 4x4 stride 2 (64) -> PReLU -> flatten -> linear
    ``output_dim`` -> PReLU -> dropout. Each convolution halves the side, so ``image_size`` must be a
    multiple of 4: 28 x 28 x 1 (MNIST, Fashion-MNIST) and 32 x 32 x 3 (CIFAR-10) both work.
    """

    def __init__(self, in_channels=1, image_size=28, dropout=0.2, output_dim=256):
        super().__init__()
        _check_image_geometry(in_channels, image_size)
        self.in_channels, self.image_size = in_channels, image_size
        self.dropout = _check_dropout(dropout)
        self.output_dim = check_int(output_dim, "output_dim", 1)
        side = image_size // 4
        self.convnet = nn.Sequential(
            nn.Conv2d(in_channels, 32, 4, stride=2, padding=1), nn.PReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.PReLU(),
        )
        self.fc = nn.Sequential(nn.Linear(64 * side * side, self.output_dim), nn.PReLU(), nn.Dropout(self.dropout))

    def forward(self, x):
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"ConvEncoder expects images of shape (B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got {tuple(x.shape)}")
        return self.fc(self.convnet(x).flatten(1))


class ConvDecoder(nn.Module):
    """Decoder for images, the mirror of ``ConvEncoder``: ``(B, latent_dim) -> (B, out_channels,
    image_size, image_size)``.

    linear ``hidden_dim`` -> PReLU -> dropout -> linear 64 x (image_size / 4)^2 -> PReLU -> transposed
    conv 4x4 stride 2 (32) -> PReLU -> transposed conv 4x4 stride 2 (``out_channels``), no output
    activation (values for MSE, logits for BCE).
    """

    def __init__(self, latent_dim, out_channels=1, image_size=28, dropout=0.2, hidden_dim=256):
        super().__init__()
        _check_image_geometry(out_channels, image_size)
        self.latent_dim = check_int(latent_dim, "latent_dim", 1)
        self.out_channels, self.image_size = out_channels, image_size
        self.dropout = _check_dropout(dropout)
        self.side = image_size // 4
        self.fc = nn.Sequential(
            nn.Linear(self.latent_dim, check_int(hidden_dim, "hidden_dim", 1)), nn.PReLU(), nn.Dropout(self.dropout),
            nn.Linear(hidden_dim, 64 * self.side * self.side), nn.PReLU(),
        )
        self.deconvnet = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.PReLU(),
            nn.ConvTranspose2d(32, out_channels, 4, stride=2, padding=1),
        )

    def forward(self, z):
        _check_feature_batch(z, self.latent_dim, type(self).__name__)
        return self.deconvnet(self.fc(z).view(len(z), 64, self.side, self.side))


class AutoencoderOutput(NamedTuple):
    """What ``Autoencoder`` and ``VAE`` return for a batch of ``B`` inputs.

    - ``latent (B, L)``: the code the decoder read (for a VAE in training mode, a sample);
    - ``reconstruction``: the decoder's output, shaped like the input;
    - ``mean (B, L)``: the embedding (the code itself for a plain autoencoder, the posterior mean for
      a VAE); metric losses and ``get_embedding`` use it;
    - ``log_var (B, L)``: the VAE posterior's log-variance; None for a plain autoencoder.
    """

    latent: torch.Tensor
    reconstruction: torch.Tensor
    mean: torch.Tensor
    log_var: Optional[torch.Tensor] = None


def _check_encoder_decoder(encoder, decoder, latent_dim):
    latent_dim = check_int(latent_dim, "latent_dim", 1)
    if not isinstance(encoder, nn.Module) or not isinstance(getattr(encoder, "output_dim", None), int):
        raise TypeError("encoder must be an nn.Module with an int output_dim (its feature size), "
                        "e.g. MLPEncoder or ConvEncoder")
    if not isinstance(decoder, nn.Module):
        raise TypeError("decoder must be an nn.Module, e.g. MLPDecoder or ConvDecoder")
    if getattr(decoder, "latent_dim", latent_dim) != latent_dim:
        raise ValueError(f"decoder reads codes of size {decoder.latent_dim} but latent_dim is {latent_dim}; "
                         "build both with the same latent_dim")
    return latent_dim


class _EncoderDecoder(nn.Module):
    """What Autoencoder and VAE share: the (checked) encoder body and decoder, and one linear head per
    name in ``heads`` from the body's features to codes ``(B, latent_dim)``, created in that order."""

    def __init__(self, encoder, decoder, latent_dim, heads):
        super().__init__()
        self.latent_dim = _check_encoder_decoder(encoder, decoder, latent_dim)
        self.encoder, self.decoder = encoder, decoder
        for head in heads:
            setattr(self, head, nn.Linear(encoder.output_dim, self.latent_dim))


class Autoencoder(_EncoderDecoder):
    """A plain (deterministic) autoencoder: encoder body -> linear code ``(B, latent_dim)`` -> decoder.

    ``forward(x) -> AutoencoderOutput(latent, reconstruction, mean=latent, log_var=None)`` for inputs
    ``(B, D)`` (with ``MLPEncoder``/``MLPDecoder``) or ``(B, C, H, W)`` (``ConvEncoder``/``ConvDecoder``);
    the reconstruction has the input's shape. ``get_embedding(x)`` returns the code ``(B, latent_dim)``.
    """

    variational = False

    def __init__(self, encoder, decoder, latent_dim):
        super().__init__(encoder, decoder, latent_dim, heads=("to_latent",))

    def encode(self, x):
        """Codes ``(B, latent_dim)`` of inputs ``x``."""
        return self.to_latent(self.encoder(x))

    def forward(self, x):
        latent = self.encode(x)
        return AutoencoderOutput(latent, self.decoder(latent), latent, None)

    def get_embedding(self, x):
        return self.encode(x)


# Bounds of a VAE's posterior log-variance: variances from 4.5e-5 to 2.2e4, standard deviations 0.0067 to 148.
LOG_VAR_RANGE = (-10.0, 10.0)


class VAE(_EncoderDecoder):
    """A variational autoencoder with a diagonal Gaussian posterior (Kingma and Welling, 2014).

    The encoder body feeds two linear heads, the posterior mean and log-variance ``(B, latent_dim)``
    each (the log-variance clamped to ``LOG_VAR_RANGE``, so that ``exp`` never overflows).
    ``forward(x) -> AutoencoderOutput(latent, reconstruction, mean, log_var)``: in training mode
    ``latent = mean + exp(log_var / 2) * eps`` with ``eps ~ N(0, I)`` from torch's global RNG (the
    reparameterisation trick, so gradients reach both heads); in eval mode ``latent = mean``, so
    evaluation is deterministic. ``get_embedding(x)`` returns the mean ``(B, latent_dim)`` in both modes.
    """

    variational = True

    def __init__(self, encoder, decoder, latent_dim):
        super().__init__(encoder, decoder, latent_dim, heads=("to_mean", "to_log_var"))

    def encode(self, x):
        """``(mean, log_var)`` of the posterior, ``(B, latent_dim)`` each; log_var clamped to LOG_VAR_RANGE."""
        features = self.encoder(x)
        # Unbounded, the log-variance of a VAE whose KL term is small next to its reconstruction term drifts
        # down for ever (Adam turns the small steady KL gradient into full-size steps): -3000 after 12800
        # iterations in the Fashion-MNIST sweep, until one step overflowed exp(). Clamped, its gradient is
        # zero past the bound and the drift stops.
        return self.to_mean(features), self.to_log_var(features).clamp(*LOG_VAR_RANGE)

    @staticmethod
    def reparameterize(mean, log_var):
        """A sample ``(B, L)`` of ``N(mean, diag(exp(log_var)))`` that is differentiable in both."""
        return mean + (0.5 * log_var).exp() * torch.randn_like(mean)

    def forward(self, x):
        mean, log_var = self.encode(x)
        latent = self.reparameterize(mean, log_var) if self.training else mean
        return AutoencoderOutput(latent, self.decoder(latent), mean, log_var)

    def get_embedding(self, x):
        return self.encode(x)[0]


def make_autoencoder(input_shape, latent_dim, variational=False, hidden_dims=(512, 256), dropout=0.2):
    """An ``Autoencoder`` (or with ``variational=True`` a ``VAE``) for inputs of ``input_shape``.

    ``input_shape`` is one item's shape: ``(D,)`` for feature vectors gives ``MLPEncoder(D, hidden_dims)``
    and the mirrored ``MLPDecoder``; ``(C, S, S)`` for images gives ``ConvEncoder``/``ConvDecoder``
    (``hidden_dims`` unused). ``dropout`` goes after every hidden layer.
    """
    input_shape = tuple(input_shape)
    if len(input_shape) == 1:
        hidden_dims = _check_hidden_dims(hidden_dims)
        encoder = MLPEncoder(input_shape[0], hidden_dims, dropout)
        decoder = MLPDecoder(latent_dim, input_shape[0], hidden_dims[::-1], dropout)
    elif len(input_shape) == 3 and input_shape[1] == input_shape[2]:
        channels, size = input_shape[0], input_shape[1]
        encoder = ConvEncoder(channels, size, dropout)
        decoder = ConvDecoder(latent_dim, channels, size, dropout)
    else:
        raise ValueError(f"input_shape must be (D,) for feature vectors or (C, S, S) for square images, "
                         f"got {input_shape}")
    return (VAE if variational else Autoencoder)(encoder, decoder, latent_dim)


class SiameseAutoencoder(_SharedAcrossInputs):
    """One ``Autoencoder`` or ``VAE`` shared by both inputs of a pair.

    ``forward(x1, x2) -> (output1, output2)``, two ``AutoencoderOutput`` s (latents, reconstructions,
    means, log-variances of each input, ``(B, L)`` and input-shaped); ``get_embedding(x) -> (B, L)``.
    Pair it with ``losses.PairwiseAutoencoderLoss.on_pairs``.
    """

    n_inputs, shared_name = 2, "autoencoder"

    def __init__(self, autoencoder):
        super().__init__(autoencoder)


class TripletAutoencoder(_SharedAcrossInputs):
    """One ``Autoencoder`` or ``VAE`` shared by anchor, positive and negative.

    ``forward(x1, x2, x3) -> (output1, output2, output3)``, three ``AutoencoderOutput`` s;
    ``get_embedding(x) -> (B, L)``. Pair it with ``losses.TripletAutoencoderLoss.on_triplets``.
    """

    n_inputs, shared_name = 3, "autoencoder"

    def __init__(self, autoencoder):
        super().__init__(autoencoder)


# ---------------------------------------------------------------------------------------------------
# A pretrained backbone, and the registry of the architectures a model file (model_file.py) can hold.


def _imagenet_resnet18_file():
    """``(path, url)``: where torchvision caches the ImageNet resnet18 weights, and where they come from."""
    from torchvision.models import ResNet18_Weights  # lazily: importing this module must stay light

    url = ResNet18_Weights.IMAGENET1K_V1.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path)), url


def _read_resnet18_state_dict(path, expected):
    """The state dict of torchvision's resnet18 stored at ``path`` (its ``fc.*`` left out: it is replaced),
    checked against ``expected`` (a resnet18's own state dict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file {path} does not exist; pass the path of a saved "
                                "torchvision resnet18 state_dict, 'imagenet' or None")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"pretrained weights file {path} could not be read as a torch file "
                         f"({type(error).__name__}); pass a saved torchvision resnet18 state_dict") from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"pretrained weights file {path} does not hold a state dict (a dict of tensors); pass "
                         "the file of torch.save(torchvision.models.resnet18(...).state_dict(), path)")
    backbone = {key: value for key, value in expected.items() if not key.startswith("fc.")}
    missing = [key for key in backbone if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshapen = [key for key in backbone if key in state and state[key].shape != backbone[key].shape]
    if missing or unexpected or misshapen:
        problems = [f"{name}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}" for name, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)) if keys]
        raise ValueError(f"pretrained weights file {path} is not a resnet18 state dict ({'; '.join(problems)})")
    return {key: state[key] for key in backbone}


class ResNetEmbedding(nn.Module):
    """torchvision's resnet18 as an embedding net: its final ``fc`` replaced by ``Linear(512, embedding_dim)``.

    Takes images ``(B, in_channels, H, W)`` of any size with H, W >= 32 (the backbone halves the side five
    times, then averages over what is left); returns ``(B, embedding_dim)``. ``in_channels`` is 3 (RGB) or
    1 (grey: ``conv1`` becomes a one-channel convolution whose pretrained kernel is the sum of the RGB
    kernels, so a grey image gives the response the RGB network gives to the same image in colour).

    ``pretrained``:
    - None: random initialisation;
    - a path: a saved ``torchvision.models.resnet18().state_dict()`` (read with weights_only=True);
    - ``"imagenet"``: torchvision's ImageNet weights (ResNet18_Weights.IMAGENET1K_V1) from torch's cache,
      ``torch.hub.get_dir()/checkpoints/``. Nothing is ever downloaded: a missing file is an error.
    The new ``fc`` is always randomly initialised. ``config()`` records ``pretrained`` only as where the
    starting weights came from; a model file's weights come from its state dict (see ``load_model``).
    """

    def __init__(self, embedding_dim=64, in_channels=3, pretrained=None):
        super().__init__()
        from torchvision.models import resnet18  # lazily: importing this module must not import torchvision

        self.embedding_dim = check_int(embedding_dim, "embedding_dim", 1)
        self.in_channels = check_int(in_channels, "in_channels", 1)
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grey) or 3 (RGB) for resnet18, got {in_channels}; convert "
                             "the images to one of them")
        if isinstance(pretrained, os.PathLike):
            pretrained = os.fspath(pretrained)
        if pretrained is not None and not isinstance(pretrained, str):
            raise TypeError(f"pretrained must be None, 'imagenet' or the path of a resnet18 state_dict file, got "
                            f"{type(pretrained).__name__}")
        self.pretrained = pretrained
        backbone = resnet18(weights=None)
        if pretrained is not None:
            path = pretrained
            if pretrained == "imagenet":
                path, url = _imagenet_resnet18_file()
                if not os.path.isfile(path):
                    raise FileNotFoundError(
                        f"pretrained='imagenet' needs torchvision's ImageNet resnet18 weights, looked for {path}; "
                        f"download {url} on a machine with internet (or run torchvision.models.resnet18("
                        f"weights='IMAGENET1K_V1') there) and copy the file to that path, or pass its path as "
                        "pretrained")
            backbone.load_state_dict(_read_resnet18_state_dict(path, backbone.state_dict()), strict=False)
        if self.in_channels == 1:
            rgb = backbone.conv1
            backbone.conv1 = nn.Conv2d(1, rgb.out_channels, rgb.kernel_size, rgb.stride, rgb.padding, bias=False)
            if pretrained is not None:
                with torch.no_grad():
                    backbone.conv1.weight.copy_(rgb.weight.sum(dim=1, keepdim=True))
        backbone.fc = nn.Linear(backbone.fc.in_features, self.embedding_dim)
        self.backbone = backbone

    def config(self):
        """The constructor arguments (``pretrained`` as given: a path is kept as a string)."""
        return {"embedding_dim": self.embedding_dim, "in_channels": self.in_channels, "pretrained": self.pretrained}

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels or min(x.shape[2:]) < 32:
            raise ValueError(f"expected images of shape (B, {self.in_channels}, H, W) with H, W >= 32, got "
                             f"{tuple(x.shape)}; resize smaller images")
        return self.backbone(x)

    def get_embedding(self, x):
        return self.forward(x)


# The architectures a model file can hold, by the name it records.
NETWORKS = {"embedding-net": EmbeddingNet, "resnet18": ResNetEmbedding, "siamese-network": SiameseNetwork}


def build_network(architecture, **arguments):
    """A new ``NETWORKS[architecture](**arguments)``. Raises ValueError for an unknown architecture (listing
    them) and TypeError when ``arguments`` do not fit its constructor (showing its signature)."""
    network = NETWORKS[check_choice(architecture, NETWORKS, "architecture")]
    try:
        inspect.signature(network).bind(**arguments)
    except TypeError as error:
        raise TypeError(f"arguments {sorted(arguments)} do not fit architecture {architecture!r}, "
                        f"{network.__name__}{inspect.signature(network)}: {error}") from None
    return network(**arguments)


def __getattr__(name):
    """Names that moved to another module still resolve here for one release (``utils.MOVED_NAMES``)."""
    return moved_attribute(__name__, name)
