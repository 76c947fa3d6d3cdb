"""Training history: trainer_state.json as transformers writes it (checkpoints too, resumed runs
alike), the loss and learning-rate curves, TensorBoard scalars, `report_to` checks."""

from __future__ import annotations

import json
import math
import shutil
import xml.etree.ElementTree as ET

import pytest
import torch
from torch import nn
from zoo import ZOO

import surgeon
from surgeon import history

SVG = "{http://www.w3.org/2000/svg}"
SUMMARY_KEYS = {
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "train_loss",
    "epoch",
    "step",
}
RUNTIME_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second"}
# 16 samples in batches of 2, 2 per step: 4 steps an epoch; logs at 2, 4, 6, evaluations and
# checkpoints at 3 and 6 (a checkpoint between two logs: the resumed log must average across it)
CONFIG = dict(
    learning_rate=3e-2,
    batch_size=2,
    gradient_accumulation_steps=2,
    warmup_steps=2,
    max_steps=6,
    logging_steps=2,
    eval_steps=3,
    save_steps=3,
    max_grad_norm=0.05,  # below the gradients' norm: the logged norm is the one before clipping
    progress=False,
    distributed="none",
)
REPORT_TO = "tensorboard" if history.installed("tensorboard") else "none"


def _mlp() -> surgeon.CompiledModel:
    model = ZOO["mlp"].model()
    model.body[2].p = 0.0
    return surgeon.compile(model, surgeon.LoRA(rank=4, targets=("body.0", "head")))


def _data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def _train(output_dir, resume_from=None) -> surgeon.TrainResult:
    config = surgeon.TrainingConfig(**CONFIG, output_dir=str(output_dir), report_to=REPORT_TO)
    return surgeon.train(
        _mlp(),
        _data(16, 0),
        config,
        eval_data=_data(4, 1),
        resume_from=resume_from,
        loss_fn=nn.functional.cross_entropy,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("history") / "run"
    return out, _train(out)


def _state(path):
    from transformers import TrainerState

    return TrainerState.load_from_json(str(path))


def test_trainer_state_is_transformers_and_logs_as_its_trainer(run):
    out, result = run
    state = _state(out / "trainer_state.json")
    assert result.trainer_state == out / "trainer_state.json"
    assert (state.global_step, state.max_steps, state.epoch) == (6, 6, 1.5)
    assert (state.logging_steps, state.eval_steps, state.save_steps) == (2, 3, 3)
    assert (state.train_batch_size, state.num_train_epochs) == (2, 2)
    assert state.is_world_process_zero
    assert state.log_history == result.log_history
    logs = [e for e in state.log_history if "loss" in e]
    assert [e["step"] for e in logs] == [2, 4, 6]
    assert [e["epoch"] for e in logs] == [0.5, 1.0, 1.5]
    for entry in logs:  # the mean over the steps since the last log
        step = entry["step"]
        assert entry["loss"] == pytest.approx(sum(result.losses[step - 2 : step]) / 2, rel=1e-9)
        assert entry["learning_rate"] == result.learning_rates[step - 1]
        assert entry["grad_norm"] > CONFIG["max_grad_norm"]
    evals = [(e["step"], e["eval_loss"]) for e in state.log_history if "eval_loss" in e]
    assert evals == result.eval_losses and len(evals) == 2
    summary = state.log_history[-1]
    assert set(summary) == SUMMARY_KEYS and summary["step"] == 6
    assert summary["train_loss"] == pytest.approx(sum(result.losses) / 6, rel=1e-9)
    best_step, best_loss = min(result.eval_losses, key=lambda e: e[1])
    assert (state.best_global_step, state.best_metric) == (best_step, best_loss)
    assert state.best_model_checkpoint == str(out / f"checkpoint-{best_step}")


def test_each_checkpoint_holds_the_trainer_state_of_its_step(run):
    out, result = run
    for step, entries in ((3, 2), (6, 5)):  # the history up to the step, no closing entry
        state = _state(out / f"checkpoint-{step}" / "trainer_state.json")
        assert state.global_step == step
        assert state.log_history == result.log_history[:entries]
    assert _state(out / "checkpoint-3" / "trainer_state.json").best_model_checkpoint == str(
        out / "checkpoint-3"
    )


def test_a_resumed_run_ends_with_the_uninterrupted_history(run, tmp_path):
    out, whole = run
    shutil.copytree(out / "checkpoint-3", tmp_path / "checkpoint-3")  # as a crash at 4 leaves it
    resumed = _train(tmp_path, resume_from=True)
    assert resumed.losses == whole.losses
    final = _state(tmp_path / "trainer_state.json").log_history

    def without_runtime(log):
        return [{k: v for k, v in e.items() if k not in RUNTIME_KEYS} for e in log]

    assert without_runtime(final) == without_runtime(whole.log_history)
    again = _state(tmp_path / "checkpoint-6" / "trainer_state.json").log_history
    assert again == _state(out / "checkpoint-6" / "trainer_state.json").log_history


def _series(svg_path) -> dict[str, list[tuple[float, float]]]:
    root = ET.parse(svg_path).getroot()
    assert root.tag == f"{SVG}svg"
    return {
        line.get("data-series"): [
            tuple(map(float, point.split(","))) for point in line.get("points").split()
        ]
        for line in root.iter(f"{SVG}polyline")
    }


def test_the_curves_are_an_svg_with_a_line_per_series_and_a_point_per_log(run):
    out, result = run
    assert result.plots[0] == out / "training_curves.svg"
    lines = _series(out / "training_curves.svg")
    assert sorted(lines) == ["eval loss", "learning rate", "train loss"]
    assert [len(lines[n]) for n in ("train loss", "eval loss", "learning rate")] == [3, 2, 3]
    for points in lines.values():
        xs = [x for x, _ in points]
        assert xs == sorted(xs) and all(math.isfinite(v) for p in points for v in p)
    rates = [e["learning_rate"] for e in result.log_history if "learning_rate" in e]
    heights = [y for _, y in lines["learning rate"]]  # SVG's y grows downwards
    assert sorted(range(3), key=lambda i: rates[i]) == sorted(range(3), key=lambda i: -heights[i])
    texts = {t.text for t in ET.parse(out / "training_curves.svg").getroot().iter(f"{SVG}text")}
    assert {"step", "loss", "learning rate", "0", "6"} <= texts


def test_curves_of_one_log_entry_and_of_none_are_valid(tmp_path):
    one = [history.train_entry(2.0, 0.5, 1e-4, 0.1, 1)]
    (tmp_path / "one.svg").write_text(history.curves_svg(one))
    lines = _series(tmp_path / "one.svg")
    assert [len(lines["train loss"]), len(lines["learning rate"])] == [1, 1]
    assert all(math.isfinite(v) for p in lines["train loss"] for v in p)
    (tmp_path / "none.svg").write_text(history.curves_svg([]))
    assert _series(tmp_path / "none.svg") == {"train loss": [], "learning rate": []}


def test_the_curves_are_also_a_png_with_matplotlib(run, tmp_path):
    pytest.importorskip("matplotlib")
    paths = history.write_curves(tmp_path, run[1].log_history)
    assert paths == [tmp_path / "training_curves.svg", tmp_path / "training_curves.png"]
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_gets_the_logged_scalars(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, result = run
    (log_dir,) = (out / "runs").iterdir()
    events = EventAccumulator(str(log_dir))
    events.Reload()
    for tag, key in (
        ("train/loss", "loss"),
        ("train/learning_rate", "learning_rate"),
        ("train/grad_norm", "grad_norm"),
        ("eval/loss", "eval_loss"),
    ):
        logged = [(e["step"], e[key]) for e in result.log_history if key in e]
        scalars = [(s.step, s.value) for s in events.Scalars(tag)]
        assert [s for s, _ in scalars] == [s for s, _ in logged], tag
        assert [v for _, v in scalars] == pytest.approx([v for _, v in logged], rel=1e-6), tag
    assert "train/train_loss" in events.Tags()["scalars"]


@pytest.mark.parametrize(
    ("report_to", "output_dir", "match"),
    [
        ("wandb", "run", r"report_to='wandb': 'wandb' is not supported"),
        (["tensorboard", "mlflow"], "run", "'mlflow' is not supported"),
        (7, "run", "expected 'none', 'tensorboard' or a list"),
        ("tensorboard", None, "report_to='tensorboard': .*set output_dir"),
    ],
)
def test_report_to_names_what_it_cannot_do(report_to, output_dir, match, monkeypatch):
    monkeypatch.delenv(history.TENSORBOARD_DIR_ENV, raising=False)
    monkeypatch.setattr(history, "installed", lambda package: True)
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.TrainingConfig(report_to=report_to, output_dir=output_dir)


def test_report_to_tensorboard_asks_to_install_it(monkeypatch):
    monkeypatch.setattr(history, "installed", lambda package: False)
    with pytest.raises(
        surgeon.SpecError, match=r"report_to='tensorboard'.*pip install tensorboard"
    ):
        surgeon.TrainingConfig(report_to="tensorboard", output_dir="run")


def test_report_to_takes_transformers_values(monkeypatch):
    monkeypatch.setattr(history, "installed", lambda package: True)
    assert surgeon.TrainingConfig().reporters() == ()
    config = surgeon.TrainingConfig(report_to=["tensorboard"], output_dir="run")
    assert config.report_to == ("tensorboard",) and config.reporters() == ("tensorboard",)
    assert surgeon.TrainingConfig(report_to=["none"]).reporters() == ()
    assert json.loads(json.dumps(config.to_dict()))["report_to"] == ["tensorboard"]


@pytest.mark.slow
def test_surgeon_train_prints_where_the_curves_and_history_are(capsys, tmp_path):
    from zoo import tiny_llama

    from surgeon.cli import main

    model_dir, spec, data, out = (tmp_path / n for n in ("llama", "lora.yaml", "d.jsonl", "run"))
    torch.manual_seed(0)
    tiny_llama().save_pretrained(model_dir)
    spec.write_text("method: lora\nrank: 4\ntargets: [q_proj, v_proj]\n")
    data.write_text("".join(json.dumps({"input_ids": [1, 5 + i, 9, 2]}) + "\n" for i in range(8)))
    argv = ["train", model_dir, spec, data, "--out", out, "--max-steps", 2, "--batch-size", 4]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    for name in ("training_curves.svg", "trainer_state.json"):
        assert str(out / name) in printed and (out / name).is_file()
