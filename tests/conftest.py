import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from zoo import ZOO


@pytest.fixture(params=sorted(ZOO), ids=sorted(ZOO))
def zoo_entry(request):
    """Every zoo model, one at a time."""
    return ZOO[request.param]
