"""Lets the tests import the flat modules at the repository root (utils, losses, ...), and makes every
hypothesis test derandomised by default, so that the suite draws the same examples on every run.
``pytest --hypothesis-profile=explore --hypothesis-seed=N`` draws fresh examples instead (a search for
flaky tests, not what CI runs).

Tests marked ``cuda`` need a CUDA GPU: they are skipped without one, ``make test`` leaves them out
(``-m "not cuda"``) and benchmarks/gpu_check.sh runs them."""

import os
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile("default")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; benchmarks/gpu_check.sh runs them)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; benchmarks/gpu_check.sh runs these on a GPU machine")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(no_gpu)
