"""LoRA-FA and the Riemannian LoRA optimizer (`surgeon.optimizers`, ``TrainingConfig.optimizer``):
steps equal PEFT's ``create_lorafa_optimizer`` / ``create_riemannian_optimizer`` steps from the
same weights and gradients, training resumes exactly, and what they refuse."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import ZOO, peft_loaded, randomize

import surgeon
from surgeon.optimizers import LoraFA, RiemannianAdamW
from surgeon.train import (
    build_optimizer,
    frozen_factors,
    optimized_parameters,
    parameter_groups,
    trained_parameters,
)

SPECS = {
    "lorafa": surgeon.LoRA(rank=4, alpha=16, targets=("q_proj", "v_proj")),
    "lorafa-rslora": surgeon.LoRA(
        rank=4, alpha=3, rslora=True, targets=("q_proj", "v_proj"), alpha_pattern={"v_proj": 5}
    ),
    "riemannian": surgeon.LoRA(rank=4, targets=("q_proj", "v_proj")),
    "riemannian-dora": surgeon.DoRA(rank=4, targets=("q_proj", "v_proj")),
}


def config(**changes) -> surgeon.TrainingConfig:
    base = dict(
        learning_rate=1e-2,
        batch_size=2,
        gradient_accumulation_steps=2,
        warmup_steps=0,
        max_steps=3,
        lr_scheduler="constant",
        progress=False,
        distributed="none",
    )
    return surgeon.TrainingConfig(**{**base, **changes})


def compiled(spec, seed: int = 2):
    cm = surgeon.compile(ZOO["llama"].model(), spec)
    randomize(cm, seed=seed, scale=0.2)
    return cm


def peft_names(cm) -> dict[str, str]:
    """Our parameter name -> PEFT's, through the keys our adapter file gives each tensor."""
    ours = {id(p): n for n, p in cm.named_parameters()}
    out = {}
    for path, layer in cm.store.items("default"):
        for key, tensor in layer.peft_tensors().items():
            leaf = {
                "lora_A.weight": "lora_A.default.weight",
                "lora_B.weight": "lora_B.default.weight",
                "lora_magnitude_vector": "lora_magnitude_vector.default.weight",
            }[key]
            out[ours[id(tensor)]] = f"base_model.model.{path}.{leaf}"
    return out


def peft_side(cm, option: str, tmp_path, lr: float, weight_decay: float):
    """PEFT's model loaded from ``cm``'s adapter file, and its optimizer."""
    from peft.optimizers import create_lorafa_optimizer, create_riemannian_optimizer

    cm.save_adapters(tmp_path)
    pm = peft_loaded(ZOO["llama"].model(), tmp_path, is_trainable=True)
    spec = cm.spec("default")
    if option == "lorafa":
        opt = create_lorafa_optimizer(pm, r=spec.rank, lora_alpha=spec.alpha, lr=lr)
        for group in opt.param_groups:
            group["weight_decay"] = weight_decay
    else:
        opt = create_riemannian_optimizer(pm, torch.optim.AdamW, lr=lr, weight_decay=weight_decay)
    return pm, opt


@pytest.mark.parametrize("case", sorted(SPECS))
def test_steps_equal_peft_steps(case, tmp_path, monkeypatch):
    """One and three steps. PEFT's LoRA-FA projects B's gradient under bfloat16 autocast
    wherever bfloat16 is available (1e-4 apart after a step at lr 1e-2); ours keeps float32,
    so PEFT's autocast is turned off here to compare the formulas exactly."""
    import peft.optimizers.lorafa

    monkeypatch.setattr(peft.optimizers.lorafa, "is_bf16_available", lambda: False)
    option = case.split("-")[0]
    cm = compiled(SPECS[case])
    # our groups spare DoRA's magnitudes from weight decay, as with AdamW; PEFT's decays them
    decay = 0.0 if case.endswith("dora") else 0.1
    cfg = config(optimizer=option, learning_rate=1e-2, weight_decay=decay)
    pm, theirs = peft_side(cm, option, tmp_path, cfg.learning_rate, cfg.weight_decay)
    trained = optimized_parameters(cm, cfg)
    ours_opt_groups = parameter_groups(cm, trained, cfg)
    with surgeon.optimizers.frozen(frozen_factors(cm, cfg)):
        ours = build_optimizer(cm, ours_opt_groups, cfg)
        assert isinstance(ours, LoraFA if option == "lorafa" else RiemannianAdamW)
        names = peft_names(cm)
        peft_params = dict(pm.named_parameters())
        learned = {n: p for n, p in trained.items() if p.requires_grad}
        assert {names[n] for n in learned} == {n for n, p in peft_params.items() if p.requires_grad}
        g = torch.Generator().manual_seed(0)
        for step in range(3):
            for name, param in learned.items():
                grad = torch.randn(param.shape, generator=g) * 0.05
                param.grad = grad.clone()
                peft_params[names[name]].grad = grad.clone()
            ours.step()
            theirs.step()
            for name, param in trained.items():
                torch.testing.assert_close(
                    param,
                    peft_params[names[name]],
                    rtol=0,
                    atol=1e-6,
                    msg=lambda m, name=name, step=step: f"{name} step {step}: {m}",
                )


@pytest.mark.parametrize("option", ["lorafa", "riemannian"])
def test_resuming_is_the_uninterrupted_run(option, tmp_path):
    spec, data = SPECS[option], _samples(12, seed=7)
    cfg = config(optimizer=option, max_steps=5, weight_decay=0.05)
    whole = compiled(spec)
    before = {n: p.detach().clone() for n, p in trained_parameters(whole).items()}
    expected = surgeon.train(whole, data, cfg)
    after = trained_parameters(whole)
    assert after.keys() == before.keys()  # LoRA-FA's A is trainable again after the run
    for name, value in before.items():  # and was frozen during it
        frozen = option == "lorafa" and name.endswith("lora_A")
        assert torch.equal(value, after[name]) == frozen, name
    part = compiled(spec)
    run = tmp_path / "run"
    surgeon.train(part, data, cfg.replace(max_steps=2, output_dir=str(run)))
    fresh = compiled(spec, seed=9)  # other adapter weights, A included: all must be restored
    result = surgeon.train(fresh, data, cfg.replace(output_dir=str(run)), resume_from=run)
    assert result.losses == expected.losses
    for name, param in whole.store.named_parameters():
        assert torch.equal(param, dict(fresh.store.named_parameters())[name]), name


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"optimizer": "adam"}, r"optimizer='adam'.*'adamw', 'lorafa', 'riemannian'"),
        ({"optimizer": "lorafa", "loraplus_lr_ratio": 4.0}, r"optimizer='lorafa': does not"),
        ({"riemannian_reg": -1.0}, r"riemannian_reg=-1.0"),
    ],
)
def test_config_refusals(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        config(**fields)


@pytest.mark.parametrize(
    ("option", "spec", "match"),
    [
        ("lorafa", surgeon.DoRA(rank=4), r"optimizer='lorafa': adapter 'default' is dora"),
        ("riemannian", surgeon.IA3(), r"optimizer='riemannian': adapter 'default' is ia3"),
        (
            "lorafa",
            surgeon.LoRA(rank=4, targets=("q_proj", "embed_tokens")),
            r"optimizer='lorafa': .*embed_tokens is a embedding layer",
        ),
        (
            "riemannian",
            surgeon.LoRA(rank=4, targets=("embed_tokens",)),
            r"optimizer='riemannian': the active adapters have no LoRA A/B matrix pair",
        ),
    ],
)
def test_adapter_refusals(option, spec, match):
    cm = surgeon.compile(ZOO["llama"].model(), spec)
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.train(cm, _samples(4), config(optimizer=option))


def test_riemannian_refuses_closures():
    param = nn.Parameter(torch.ones(2))
    with pytest.raises(surgeon.SpecError, match="closures"):
        RiemannianAdamW([param]).step(lambda: 0.0)


def _samples(n: int, seed: int = 0) -> list[dict]:
    """Causal-LM samples of one length: a single specialised graph serves the whole run."""
    ids = torch.randint(3, 96, (n, 6), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def test_fsdp_refuses_the_factor_optimizers():
    from surgeon.distributed import Parallel
    from surgeon.train import _check_optimizer

    with pytest.raises(surgeon.SpecError, match="optimizer='lorafa' multiplies whole"):
        _check_optimizer(config(optimizer="lorafa"), Parallel("fsdp", 0, 2))
    _check_optimizer(config(), Parallel("fsdp", 0, 2))
