"""Data-parallel training through torchrun: 2 gloo processes x batch b end with the same adapter,
losses and eval losses as one process x batch 2b, with DDP and with FSDP2; checkpoints written by
both processes resume exactly; load_best_at_end ends with the best evaluation's weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import BATCH, BEST, EVAL, TRAIN, adapter, compiled, config
from safetensors.torch import load_file
from zoo import ZOO

import surgeon

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """Run the worker under torchrun once for every test here."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    out = tmp_path_factory.mktemp("distributed")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(WORKER),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def one_process() -> tuple[dict[str, torch.Tensor], surgeon.TrainResult]:
    cm = compiled()
    result = surgeon.train(cm, TRAIN, config(2 * BATCH, distributed="none"), eval_data=EVAL)
    return adapter(cm), result


KINDS = ("ddp", "fsdp")


def test_one_torchrun_launch(two_processes, one_process, one_process_best, subtests):
    """Every check of the launch, each a subtest, in one test: pytest-xdist would otherwise
    launch torchrun again in each worker that runs one of them (a module fixture is per worker)."""
    checks = {
        "two processes train as one with the same global batch": lambda kind: (
            check_two_processes_train_as_one(kind, two_processes, one_process)
        ),
        "checkpoints of two processes resume exactly": lambda kind: (
            check_checkpoints_resume_exactly(kind, two_processes)
        ),
        "load_best_at_end under two processes": lambda kind: check_load_best_at_end(
            kind, two_processes, one_process_best
        ),
    }
    for what, check in checks.items():
        for kind in KINDS:
            with subtests.test(what, kind=kind):
                check(kind)


def check_two_processes_train_as_one(kind, two_processes, one_process):
    expected, result = one_process
    theirs = load_file(str(two_processes / f"{kind}.safetensors"))
    assert theirs.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(theirs[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert any(
        not torch.equal(value, before)
        for value, before in zip(expected.values(), adapter(compiled()).values())
    )
    report = json.loads((two_processes / f"{kind}.json").read_text())
    # FSDP: the root and each of the two decoder layers; DDP wraps without changing the model
    assert report["sharded_blocks"] == (3 if kind == "fsdp" else 0)
    assert report["losses"] == pytest.approx(result.losses, rel=1e-6)
    assert [s for s, _ in report["eval_losses"]] == [s for s, _ in result.eval_losses]
    assert [x for _, x in report["eval_losses"]] == pytest.approx(
        [x for _, x in result.eval_losses], rel=1e-6
    )


def check_checkpoints_resume_exactly(kind, two_processes):
    whole = load_file(str(two_processes / f"{kind}.safetensors"))
    resumed = load_file(str(two_processes / f"{kind}-resumed.safetensors"))
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), name
    report = json.loads((two_processes / f"{kind}.json").read_text())
    assert report["resumed_losses"] == report["losses"]
    run = two_processes / f"{kind}-run"
    checkpoints = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-3"]
    ckpt = two_processes / f"{kind}-run" / "checkpoint-3"
    assert (ckpt / "rng_state_0.safetensors").exists() and (ckpt / "rng_state_1.json").exists()
    loaded = surgeon.load(ZOO["llama"].model(0), ckpt)  # the PEFT-layout adapter in it
    for path, layer in loaded.store.items("default"):
        key = f"store.layers.default.{path.replace('.', '_')}.lora_B"
        assert torch.equal(layer.lora_B, whole[key])


@pytest.fixture(scope="module")
def one_process_best() -> tuple[dict[str, torch.Tensor], surgeon.TrainResult]:
    cm = compiled()
    result = surgeon.train(cm, TRAIN, config(2 * BATCH, distributed="none", **BEST), eval_data=EVAL)
    return adapter(cm), result


def check_load_best_at_end(kind, two_processes, one_process_best):
    expected, result = one_process_best
    assert result.best_step == 1 < result.steps  # the eval loss rose after the first step
    report = json.loads((two_processes / f"{kind}.json").read_text())
    assert report["best_step"] == result.best_step
    assert [x for _, x in report["best_eval_losses"]] == pytest.approx(
        [x for _, x in result.eval_losses], rel=1e-5
    )
    theirs = load_file(str(two_processes / f"{kind}-best.safetensors"))
    assert theirs.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(theirs[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # resumed at step 2, after the best (step 1): loaded from checkpoint-1, the same weights
    assert report["best_resumed_step"] == result.best_step
    resumed = load_file(str(two_processes / f"{kind}-best-resumed.safetensors"))
    for name, value in theirs.items():
        assert torch.equal(resumed[name], value), name
