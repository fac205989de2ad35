"""Lets the tests import the flat modules at the repository root (utils, losses, ...), and makes every
hypothesis test derandomised by default, so that the suite draws the same examples on every run.
``pytest --hypothesis-profile=explore --hypothesis-seed=N`` draws fresh examples instead (a search for
flaky tests, not what CI runs)."""

import os
import sys

from hypothesis import settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile("default")
