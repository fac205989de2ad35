"""Tests of projections.py: the seeded subset, the exact principal plane (against an eigen-decomposition),
embeddings of 2 dimensions or fewer as their own map, t-SNE's shape, and the errors."""

import importlib.util

import numpy as np
import pytest
import torch

import projections
from projections import available_projections, pca_axes, project_2d, subsample


def test_subsample_is_seeded_sorted_and_whole_when_small():
    assert torch.equal(subsample(5, 5), torch.arange(5))
    chosen = subsample(100, 10, seed=3)
    assert torch.equal(chosen, subsample(100, 10, seed=3)) and not torch.equal(chosen, subsample(100, 10, seed=4))
    assert len(chosen.unique()) == 10 and torch.equal(chosen, chosen.sort().values)
    expected = torch.randperm(100, generator=torch.Generator().manual_seed(3))[:10].sort().values
    assert torch.equal(chosen, expected)


def test_pca_axes_span_the_principal_plane_with_fixed_signs():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(200, 6, generator=generator, dtype=torch.float64) * torch.tensor([5, 3, 1, 1, .5, .2])
    embeddings = embeddings @ torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))[0]
    mean, axes = pca_axes(embeddings.numpy())
    centred = embeddings - embeddings.mean(0)
    reference = torch.linalg.eigh(centred.T @ centred).eigenvectors[:, [-1, -2]]  # brute force: the top two
    torch.testing.assert_close(mean, embeddings.mean(0))
    torch.testing.assert_close(axes.abs(), reference.abs())
    torch.testing.assert_close((axes * reference).sum(0).abs(), torch.ones(2, dtype=torch.float64))
    assert (axes[axes.abs().argmax(0), torch.arange(2)] > 0).all()  # each axis' largest coordinate is positive
    torch.testing.assert_close(torch.from_numpy(project_2d(embeddings)), centred @ axes)


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_two_dimensions_or_fewer_are_their_own_map(method):
    points = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.testing.assert_array_equal(project_2d(points, method), points)
    np.testing.assert_array_equal(project_2d(points[:, :1], method), np.c_[points[:, 0], np.zeros(6)])


def test_tsne_maps_every_point_and_is_seeded():
    embeddings = torch.randn(30, 5, generator=torch.Generator().manual_seed(1))
    points = project_2d(embeddings, "tsne", seed=0)
    assert points.shape == (30, 2) and np.isfinite(points).all()
    np.testing.assert_array_equal(points, project_2d(embeddings, "tsne", seed=0))


def test_unknown_or_missing_projections_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="projection must be one of pca, tsne, umap, got 'mds'"):
        project_2d(np.zeros((4, 3)), "mds")
    monkeypatch.setattr(projections.importlib.util, "find_spec",
                        lambda name, *rest: None if name == "umap" else importlib.util.find_spec(name, *rest))
    assert available_projections() == ("pca", "tsne")
    with pytest.raises(ImportError, match="pip install umap-learn"):
        project_2d(np.zeros((4, 3)), "umap")
