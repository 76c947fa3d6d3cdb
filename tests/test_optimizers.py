"""LoRA-FA and the Riemannian LoRA optimizer (`surgeon.optimizers`, ``TrainingConfig.optimizer``):
steps equal PEFT's ``create_lorafa_optimizer`` / ``create_riemannian_optimizer`` steps from the
same weights and gradients, training resumes exactly, and what they refuse. Flora
(``optimizer="flora"``, a paper method): steps equal the paper's update written out, its state
is compressed, and it resumes exactly across a resampling."""

from __future__ import annotations

import math

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


# -- Flora (arXiv:2402.03293) -----------------------------------------------------------------

FLORA_SHAPES = {"wide": (6, 10), "tall": (10, 6), "factor": (3, 10), "vector": (10,)}
"""With rank 3: the two matrices are compressed (either side projected), the LoRA-sized factor
and the vector keep a plain first moment."""


class PaperFlora:
    """The paper's Algorithm 2 over Adafactor for one tensor, written out from the equations:
    ``β̂₂ = 1 - t^-0.8``; ``V`` the factored (row/column) or plain mean of ``g² + 1e-30``;
    ``U = g / √V``; compressed: ``M ← M A_{t-1} A_tᵀ`` when ``t % κ = 0``, then
    ``M ← β₁ M + (1 - β₁) U Aₜᵀ`` and ``D = M Aₜ`` (``A ~ N(0, 1/r)``, ``r x m``, of the longer
    side ``m``); plain: ``D = M ← β₁ M + (1 - β₁) U``; ``θ ← θ (1 - lr λ) - lr D / max(1,
    RMS(D))``."""

    def __init__(self, value, rank, compressed, beta1=0.9):
        self.value, self.rank, self.compressed, self.beta1 = value.clone(), rank, compressed, beta1
        self.t, self.v, self.moment, self.seed = 0, None, 0.0, None

    def draw(self, seed, size):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.rank, size, generator=g) / self.rank**0.5

    def step(self, grad, lr, decay, seed, kappa):
        self.t += 1
        beta2 = 1 - self.t**-0.8
        square = grad**2 + 1e-30
        if grad.dim() == 2:
            rows, cols = square.mean(1), square.mean(0)
            if self.v is None:
                self.v = (torch.zeros_like(rows), torch.zeros_like(cols))
            r = beta2 * self.v[0] + (1 - beta2) * rows
            c = beta2 * self.v[1] + (1 - beta2) * cols
            self.v = (r, c)
            second = torch.outer(r, c) / r.mean()
        else:
            self.v = (1 - beta2) * square + (beta2 * self.v if self.v is not None else 0)
            second = self.v
        u = grad / second.sqrt()
        if self.compressed:
            flip = u.shape[0] > u.shape[1]
            u = u.T if flip else u
            a = self.draw(seed, u.shape[1])
            if self.t % kappa == 0:
                self.moment = self.moment @ self.draw(self.seed, u.shape[1]) @ a.T
            else:
                assert seed == self.seed or self.seed is None  # no resampling off the boundary
            self.seed = seed
            self.moment = self.beta1 * self.moment + (1 - self.beta1) * u @ a.T
            update = self.moment @ a
            update = update.T if flip else update
        else:
            self.moment = self.beta1 * self.moment + (1 - self.beta1) * u
            update = self.moment
        rms = update.pow(2).mean().sqrt()
        update = update / max(1.0, float(rms))
        self.value = self.value * (1 - lr * decay) - lr * update


def test_flora_steps_are_the_papers_update():
    """Five steps with κ = 2 (resampling at steps 2 and 4) equal the written-out update, for
    both orientations of a compressed matrix, a plain factor and a vector."""
    torch.manual_seed(0)
    params = {k: nn.Parameter(torch.randn(s) * 0.3) for k, s in FLORA_SHAPES.items()}
    rank, kappa, lr = 3, 2, 1e-2
    decays = {"wide": 0.1, "tall": 0.1, "factor": 0.1, "vector": 0.0}
    groups = [
        {"params": [params[k] for k in ("wide", "tall", "factor")], "weight_decay": 0.1},
        {"params": [params["vector"]], "weight_decay": 0.0},
    ]
    ours = surgeon.optimizers.Flora(groups, lr=lr, rank=rank, kappa=kappa, seed=42)
    compressed = {"wide": True, "tall": True, "factor": False, "vector": False}
    papers = {k: PaperFlora(p.detach(), rank, compressed[k]) for k, p in params.items()}
    g = torch.Generator().manual_seed(1)
    seen = {k: [] for k in params}
    for step in range(1, 6):
        grads = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}
        for k, p in params.items():
            p.grad = grads[k].clone()
        ours.step()
        for k, p in params.items():
            seed = ours.state[p].get("seed")
            assert (seed is not None) == compressed[k], k
            seen[k].append(seed)
            papers[k].step(grads[k], lr, decays[k], seed, kappa)
            torch.testing.assert_close(
                p.detach(),
                papers[k].value,
                rtol=0,
                atol=1e-6,
                msg=lambda m, k=k, step=step: f"{k} step {step}: {m}",
            )
    # one projection per κ steps: steps 1 | 2, 3 | 4, 5; the matrices draw different ones
    assert [len(set(seen["wide"][a:b])) for a, b in ((0, 1), (1, 3), (3, 5))] == [1, 1, 1]
    assert len(set(seen["wide"])) == 3
    assert not set(seen["wide"]) & set(seen["tall"])


def test_flora_state_is_compressed():
    """A whole trained matrix (``modules_to_save``: o_proj's 32 x 32 copy) keeps a 32 x rank
    first moment and row/column second moments; LoRA's 4 x 32 / 32 x 4 factors, at or under
    the rank, keep whole ones; a half-precision matrix is stepped with float32 state."""
    spec = surgeon.LoRA(rank=4, targets=("q_proj",), modules_to_save=("o_proj",))
    cm = surgeon.compile(ZOO["llama"].model(), spec)
    cfg = config(optimizer="flora", flora_rank=4)
    trained = optimized_parameters(cm, cfg)
    opt = build_optimizer(cm, parameter_groups(cm, trained, cfg), cfg)
    assert isinstance(opt, surgeon.optimizers.Flora)
    for param in trained.values():
        param.grad = torch.randn_like(param)
    opt.step()
    flora_numel = adam_numel = 0
    for name, param in trained.items():
        state = opt.state[param]
        tensors = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
        if name.endswith("copy.weight"):
            assert tensors == {
                "exp_avg": (32, 4),
                "exp_avg_sq_row": (32,),
                "exp_avg_sq_col": (32,),
            }, name
            assert isinstance(state["seed"], int)
            flora_numel += sum(math.prod(s) for s in tensors.values())
            adam_numel += 2 * param.numel()
        else:
            assert tensors["exp_avg"] == tuple(param.shape) and "seed" not in state, name
    assert flora_numel * 10 < adam_numel
    half = nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16))
    half.grad = torch.randn(8, 8, dtype=torch.bfloat16)
    before = half.detach().clone()
    opt = surgeon.optimizers.Flora([half], lr=1e-2, rank=2)
    opt.step()
    assert half.dtype == torch.bfloat16 and not torch.equal(half, before)
    assert opt.state[half]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize(("kappa", "at_most_rank"), [(2, False), (100, True)])
def test_flora_resampling_lifts_the_update_rank(kappa, at_most_rank):
    """Without weight decay a fixed projection keeps the summed update of a matrix within rank
    r (the LoRA-like limit); resampling every κ steps lets it grow past r (the paper's point)."""
    param = nn.Parameter(torch.zeros(16, 16))
    opt = surgeon.optimizers.Flora([param], lr=1e-2, rank=2, kappa=kappa)
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        param.grad = torch.randn(16, 16, generator=g)
        opt.step()
    rank = int(torch.linalg.matrix_rank(param.detach()))
    assert (rank <= 2) == at_most_rank, rank


def test_flora_resumes_exactly_across_a_resampling(tmp_path):
    """Flora on LoRA factors and a whole matrix (``modules_to_save``), κ = 2: a run stopped
    after 3 steps (a resampling at 2, the next at 4) and resumed from its checkpoint equals the
    uninterrupted run; the whole matrix moved by more than rank-r updates."""
    spec = surgeon.LoRA(rank=4, targets=("q_proj",), modules_to_save=("o_proj",))
    data = _samples(12, seed=7)
    cfg = config(optimizer="flora", flora_rank=4, flora_kappa=2, max_steps=5, weight_decay=0.0)
    whole = compiled(spec)
    copy = next(
        n for n in trained_parameters(whole) if n.endswith("layers_0_self_attn_o_proj.copy.weight")
    )
    before = trained_parameters(whole)[copy].detach().clone()
    expected = surgeon.train(whole, data, cfg)
    moved = trained_parameters(whole)[copy].detach() - before
    assert int(torch.linalg.matrix_rank(moved)) > 4
    part = compiled(spec)
    run = tmp_path / "run"
    surgeon.train(part, data, cfg.replace(max_steps=3, output_dir=str(run)))
    fresh = compiled(spec, seed=9)
    result = surgeon.train(fresh, data, cfg.replace(output_dir=str(run)), resume_from=run)
    assert result.losses == expected.losses
    for name, param in whole.store.named_parameters():
        assert torch.equal(param, dict(fresh.store.named_parameters())[name]), name


def test_flora_keeps_loraplus_groups_and_any_method():
    """Flora acts on whatever the groups hold: LoRA+'s learning rates stay per group, and a
    method other than LoRA trains under it."""
    cm = surgeon.compile(ZOO["llama"].model(), SPECS["riemannian"])
    cfg = config(optimizer="flora", loraplus_lr_ratio=4.0, learning_rate=1e-3)
    opt = build_optimizer(cm, parameter_groups(cm, trained_parameters(cm), cfg), cfg)
    assert isinstance(opt, surgeon.optimizers.Flora)
    assert sorted({g["lr"] for g in opt.param_groups}) == [1e-3, 4e-3]
    cm = surgeon.compile(ZOO["llama"].model(), surgeon.IA3())
    result = surgeon.train(cm, _samples(4), config(optimizer="flora", max_steps=1))
    assert len(result.losses) == 1


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"optimizer": "flora", "flora_rank": 0}, r"flora_rank=0: expected an integer >= 1"),
        ({"optimizer": "flora", "flora_kappa": 1.5}, r"flora_kappa=1.5: expected an integer"),
    ],
)
def test_flora_config_refusals(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        config(**fields)


def test_fsdp_refuses_flora():
    from surgeon.distributed import Parallel
    from surgeon.train import _check_optimizer

    with pytest.raises(surgeon.SpecError, match="optimizer='flora' multiplies whole matrices"):
        _check_optimizer(config(optimizer="flora"), Parallel("fsdp", 0, 2))
