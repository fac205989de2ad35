"""Lets the tests import the flat modules at the repository root (utils, losses, ...)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
