"""surgeon.best: the best evaluation and transformers' early-stopping counter, from a history."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest

from surgeon.best import best_evaluation, evaluations_without_improvement


def test_the_best_is_the_lowest_loss_the_earliest_on_ties_never_nan():
    history = [(1, math.nan), (2, 3.0), (3, 2.0), (4, 2.5), (5, 2.0), (6, math.nan)]
    assert best_evaluation(history) == (3, 2.0)
    assert best_evaluation([]) is None
    assert best_evaluation([(1, math.nan)]) is None


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.3])
def test_the_counter_is_transformers_early_stopping_counter(threshold):
    """Replays histories through EarlyStoppingCallback, with the best metric updated after each
    evaluation's callback as Trainer._determine_best_metric does."""
    from transformers import EarlyStoppingCallback

    rng = random.Random(threshold)
    args = SimpleNamespace(greater_is_better=False)
    for _ in range(50):
        losses = [round(rng.uniform(0, 1), 1) for _ in range(12)]  # ties and small steps
        if rng.random() < 0.3:
            losses[rng.randrange(12)] = math.nan
        callback = EarlyStoppingCallback(early_stopping_threshold=threshold)
        state = SimpleNamespace(best_metric=None)
        for i, loss in enumerate(losses):
            callback.check_metric_value(args, state, None, loss)
            if state.best_metric is None:
                state.best_metric = math.inf
            if loss < state.best_metric:
                state.best_metric = loss
            history = [(step + 1, x) for step, x in enumerate(losses[: i + 1])]
            ours = evaluations_without_improvement(history, threshold)
            assert ours == callback.early_stopping_patience_counter, (losses[: i + 1], threshold)
