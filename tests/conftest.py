import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from zoo import ZOO


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist each worker takes its share of the cores, and so do the processes it
    starts (examples, torchrun): tiny models gain nothing from several threads, and threads
    that outnumber the cores spin on them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


_share_the_cores_between_workers()


@pytest.fixture(params=sorted(ZOO), ids=sorted(ZOO))
def zoo_entry(request):
    """Every zoo model, one at a time."""
    return ZOO[request.param]


LONG_FIRST = (
    "test_examples.py",
    "test_distributed.py",
    "test_train.py",
    "test_export.py",
    "test_memory.py",
)
"""Files of long tests: those that run other processes (the examples, torchrun), train for many
steps or export to ONNX (measured with --durations: each test of theirs takes seconds)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long tests first: pytest-xdist hands tests out in order, and a long one handed out last
    keeps one worker busy after the others have run out of work."""
    items.sort(key=lambda item: item.path.name not in LONG_FIRST)
