"""One process of tests/test_distributed.py, started by ``torchrun --nproc_per_node 2``.

For each of DDP and FSDP2 (gloo, CPU): train a tiny Llama's LoRA adapter on the shared data,
saving checkpoints, then resume a fresh model from the mid-run one, then train one with
``load_best_at_end`` at a rate that makes the eval loss rise, and resume it after its best
evaluation; rank 0 writes the adapters, losses
and eval losses to ``OUT/<kind>.*`` for the test to compare with one process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, os.path.dirname(__file__))
from zoo import ZOO, randomize

import surgeon
from surgeon.train import trained_parameters

BATCH = 2  # per process; one process runs 2 x BATCH
STEPS = 3


def compiled():
    cm = surgeon.compile(ZOO["llama"].model(0), surgeon.LoRA(rank=4, targets=("q_proj", "v_proj")))
    randomize(cm, seed=2, scale=0.2)
    return cm


def samples(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(3, 96, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


TRAIN, EVAL = samples(24, seed=1), samples(7, seed=2)
# the eval loss is lowest after the first step, then rises (asserted in the test)
BEST = dict(
    learning_rate=0.3,
    lr_scheduler="constant",
    warmup_steps=0,
    max_steps=4,
    eval_steps=1,
    load_best_at_end=True,
)


def config(batch_size: int, **changes) -> surgeon.TrainingConfig:
    fields = dict(
        learning_rate=1e-2,
        batch_size=batch_size,
        gradient_accumulation_steps=2,
        max_steps=STEPS,
        warmup_steps=1,
        seed=3,
        progress=False,
    )
    return surgeon.TrainingConfig(**{**fields, **changes})


def adapter(cm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in trained_parameters(cm).items()}


def main(out: Path) -> None:
    for kind in ("ddp", "fsdp"):
        run = out / f"{kind}-run"
        cm = compiled()
        result = surgeon.train(
            cm,
            TRAIN,
            config(BATCH, distributed=kind, output_dir=str(run), save_steps=2),
            eval_data=EVAL,
        )
        whole = adapter(cm)
        resumed_cm = compiled()
        resumed = surgeon.train(
            resumed_cm,
            TRAIN,
            config(BATCH, distributed=kind),
            eval_data=EVAL,
            resume_from=run / "checkpoint-2",
        )
        best_run = out / f"{kind}-best-run"
        best_config = config(
            BATCH, distributed=kind, **BEST, output_dir=str(best_run), save_steps=1
        )
        best_cm = compiled()
        best = surgeon.train(best_cm, TRAIN, best_config, eval_data=EVAL)
        # resumed after the best evaluation: the best weights come from its checkpoint
        best_resumed_cm = compiled()
        best_resumed = surgeon.train(
            best_resumed_cm,
            TRAIN,
            best_config,
            eval_data=EVAL,
            resume_from=best_run / "checkpoint-2",
        )
        if torch.distributed.get_rank() == 0:
            save_file(whole, str(out / f"{kind}.safetensors"))
            save_file(adapter(resumed_cm), str(out / f"{kind}-resumed.safetensors"))
            save_file(adapter(best_cm), str(out / f"{kind}-best.safetensors"))
            save_file(adapter(best_resumed_cm), str(out / f"{kind}-best-resumed.safetensors"))
            report = {
                "losses": result.losses,
                "eval_losses": result.eval_losses,
                "resumed_losses": resumed.losses,
                "best_eval_losses": best.eval_losses,
                "best_step": best.best_step,
                "best_resumed_step": best_resumed.best_step,
                "sharded_blocks": sum(isinstance(m, FSDPModule) for m in cm.modules()),
            }
            (out / f"{kind}.json").write_text(json.dumps(report))
        torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # every result is written and both processes passed the last barrier: leave without
    # tearing gloo down, which now and then aborts a process ("terminate called without an
    # active exception") after all the work is done
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
