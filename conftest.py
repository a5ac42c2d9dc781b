"""Makes the flat top-level modules importable from tests/ (pytest's rootdir conftest)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
