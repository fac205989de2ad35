"""2-D maps of embeddings, in one place: principal axes (PCA), t-SNE and UMAP, and the seeded subset a map
is drawn on.

The study's figures (``results.plot_embeddings``: PCA), the autoencoder sweep's latent plots
(``autoencoders.latent_points``: t-SNE) and the search page's gallery map (``search_page``: any of them)
all project here. Embeddings of 2 dimensions or fewer are their own map (one dimension is padded with a
zero column), whatever the method. PCA is exact (an SVD, each axis' sign fixed so that its largest
coordinate is positive): the same embeddings always give the same map, and it places new points
(``pca_axes``). t-SNE and UMAP have no such mapping for a point they were not fitted on.
"""

import importlib.util

import numpy as np
import torch

PROJECTIONS = ("pca", "tsne", "umap")
PROJECTION_NAMES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}


def available_projections():
    """The names of ``PROJECTIONS`` that can run here: UMAP only when umap-learn is installed (t-SNE needs
    scikit-learn, a requirement of the library). Returns a tuple of str."""
    return tuple(name for name in PROJECTIONS if name != "umap" or importlib.util.find_spec("umap") is not None)


def subsample(n_items, max_points, seed=0):
    """A seeded random subset of ``range(n_items)``: all of it when n_items <= max_points, else max_points
    positions drawn without replacement by ``torch.randperm`` with a generator seeded by ``seed``. Returns
    the positions (n,) int64 tensor in ascending order."""
    if n_items <= max_points:
        return torch.arange(n_items)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_items, generator=generator)[:max_points].sort().values


def pca_axes(embeddings):
    """The principal plane of ``embeddings (N, D)`` (tensor or array): (mean (D,), axes (D, 2)) float64 tensors,
    so that ``(x - mean) @ axes`` places any point x (D,) on the map. For D <= 2 the mean is zero and the
    axes are the identity (padded with a zero column for D = 1): the embeddings are their own map."""
    embeddings = torch.as_tensor(np.asarray(embeddings), dtype=torch.float64)
    width = embeddings.shape[1]
    if width <= 2:
        return torch.zeros(width, dtype=torch.float64), torch.eye(width, 2, dtype=torch.float64)
    mean = embeddings.mean(dim=0)
    _, _, right = torch.linalg.svd(embeddings - mean, full_matrices=False)
    axes = right[:2].T.clone()
    # an SVD's axes have arbitrary signs: fix them so that the same data always gives the same picture
    largest = axes.abs().argmax(dim=0)
    axes *= torch.sign(axes[largest, torch.arange(2)])[None, :]
    return mean, axes


def project_2d(embeddings, method="pca", seed=0):
    """The 2-D map of ``embeddings (N, D)`` (tensor or array) by ``method`` ("pca", "tsne" or "umap"; see
    ``PROJECTIONS``). Returns points (N, 2) float64 numpy array. t-SNE (scikit-learn, PCA initialisation,
    perplexity min(30, (N - 1) / 3)) and UMAP (umap-learn) draw from ``random_state=seed``. Raises ValueError
    for an unknown method and ImportError naming the package when UMAP is asked for and not installed."""
    if method not in PROJECTIONS:
        raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}, got {method!r}")
    points = np.asarray(torch.as_tensor(np.asarray(embeddings)).double())
    if points.shape[1] <= 2 or method == "pca":
        mean, axes = pca_axes(points)
        return ((torch.from_numpy(points) - mean) @ axes).numpy()
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, max((len(points) - 1) / 3, 1.0))
        return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(points)
    if method not in available_projections():
        raise ImportError("the UMAP projection needs umap-learn, which is not installed: pip install umap-learn")
    import umap

    return np.asarray(umap.UMAP(n_components=2, random_state=seed).fit_transform(points), dtype=np.float64)
