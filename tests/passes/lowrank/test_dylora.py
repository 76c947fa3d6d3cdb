"""DyLoRA's card (its formula) and what is its own: the truncation at the drawn rank while
training (the paper's frozen update, or every row up to it), the ranks drawn per step from the
seed and shared by every layer, the inference rank (merging folds it in; `set_eval_rank` changes
it in place), files (this project's own PEFT type, PEFT's loader refusing them), spec and config
errors, training through `surgeon.train` with exact resumption. PEFT has no DyLoRA: the
conformance suite runs the rest against the formula alone."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from zoo import (
    ZOO,
    One,
    gpt2_conv1d,
    load_with_changed_config,
    logits,
    plain_output,
    randomize,
    train_and_resume_spec,
)

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.lowrank.dylora import DyLoRA, DyLoRALayer, set_eval_rank
from surgeon.passes.lowrank.lora import LoRA
from surgeon.spec import METHODS


def _update(adapter, rank: int, alpha: float, frozen: bool = False) -> torch.Tensor:
    """``alpha/k · B[:, :k] A[:k]`` (out x in) at rank k; ``frozen``: rows and columns below k
    are constants in backward."""
    a, b = adapter.lora_A[:rank], adapter.lora_B[:, :rank]
    if frozen:
        a = torch.cat((a[:-1].detach(), a[-1:]))
        b = torch.cat((b[:, :-1].detach(), b[:, -1:]), dim=1)
    return alpha / rank * b @ a


def _adapted(adapter, base, x, rank: int, alpha: float, frozen: bool = False) -> torch.Tensor:
    """The layer with ``W + ΔW_k`` as its weight (GPT-2's Conv1D stores it transposed)."""
    delta = _update(adapter, rank, alpha, frozen)
    w = base.weight if isinstance(base, nn.Linear) else base.weight.t()
    adapted = w.float() + delta
    return plain_output(base, x, adapted if isinstance(base, nn.Linear) else adapted.t())


def formula(spec, adapter, base, x):
    """DyLoRA (Valipour et al., 2022, eq. 4) at inference: ``W x + b + alpha/k · B[:, :k] A[:k] x``
    with k the inference rank (``eval_rank``, else r)."""
    rank = spec.rank if spec.eval_rank is None else spec.eval_rank
    return _adapted(adapter, base, x, rank, spec.alpha)


peft = pytest.importorskip("peft")

LAYERS = {"linear": lambda: nn.Linear(6, 5), "conv1d_gpt2": lambda: gpt2_conv1d(6, 5)}
"""The layers DyLoRA adapts, 6 inputs and 5 outputs each."""


def _single(make=LAYERS["linear"], **fields) -> tuple[nn.Module, surgeon.CompiledModel]:
    torch.manual_seed(0)
    model = One(make())
    cm = surgeon.compile(model, DyLoRA(targets=("layer",), **{"rank": 4, **fields}))
    randomize(cm, scale=0.3)
    return model, cm


def _adapter(cm, name: str = "default") -> DyLoRALayer:
    (_, adapter), *_ = cm.store.items(name)
    return adapter


def _draws(seed: int, rank: int, count: int) -> list[int]:
    """The ranks of ``count`` steps: uniform draws from 1..r of a CPU generator seeded so."""
    generator = torch.Generator().manual_seed(seed)
    return [int(torch.randint(1, rank + 1, (), generator=generator)) for _ in range(count)]


# -- the math -------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
@pytest.mark.parametrize("eval_rank", [None, 1, 3])
def test_eval_mode_runs_and_merges_the_inference_rank(make, eval_rank):
    model, cm = _single(make, alpha=6, eval_rank=eval_rank)
    spec, adapter = cm.spec("default"), _adapter(cm)
    x = torch.randn(3, 6)
    cm.eval()
    with torch.no_grad():
        expected = formula(spec, adapter, model.layer, x)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    weight = model.layer.weight.detach().clone()
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(model.layer.weight, weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "unfrozen"])
def test_training_runs_the_drawn_rank_and_trains_only_the_rows_it_should(make, frozen):
    model, cm = _single(make, alpha=6, frozen=frozen, seed=1)
    adapter = _adapter(cm)
    cm.train()
    x, target = torch.randn(4, 6), torch.randn(4, 5)
    for k in _draws(1, 4, 3):
        assert adapter.sampler.current() == k
        out = cm(x)
        expected = _adapted(adapter, model.layer, x, k, 6.0, frozen)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        params = (adapter.lora_A, adapter.lora_B)
        ours = torch.autograd.grad((out * target).sum(), params)
        theirs = torch.autograd.grad((expected * target).sum(), params)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        trained = {k - 1} if frozen else set(range(k))  # rows of A, columns of B
        assert {i for i in range(4) if ours[0][i].any()} == trained
        assert {i for i in range(4) if ours[1][:, i].any()} == trained
        cm.update_ranks(0)


def test_one_rank_per_step_for_every_layer_drawn_uniformly_from_the_seed():
    model = ZOO["llama"].model()
    cm = surgeon.compile(model, DyLoRA(rank=5, seed=7, targets=("q_proj", "v_proj")))
    layers = [layer for _, layer in cm.store.items("default")]
    assert len({id(layer.sampler) for layer in layers}) == 1
    seen = []
    for _ in range(200):
        seen.append(layers[0].sampler.current())
        cm.update_ranks(0)
    assert seen == _draws(7, 5, 200)
    assert set(seen) == {1, 2, 3, 4, 5}


def test_a_rank_of_one_is_lora_at_rank_one():
    model, cm = _single(rank=1, alpha=3)
    x = torch.randn(3, 6)
    lora = surgeon.compile(One(nn.Linear(6, 5)), LoRA(rank=1, alpha=3, targets=("layer",)))
    lora.model.layer.load_state_dict(model.layer.state_dict())
    (_, theirs), *_ = lora.store.items("default")
    with torch.no_grad():
        theirs.lora_A.copy_(_adapter(cm).lora_A)
        theirs.lora_B.copy_(_adapter(cm).lora_B)
    for mode in ("train", "eval"):
        getattr(cm, mode)(), getattr(lora, mode)()
        torch.testing.assert_close(cm(x), lora(x), rtol=1e-6, atol=1e-6)


def test_a_fresh_adapter_has_lora_factors():
    torch.manual_seed(0)
    cm = surgeon.compile(One(nn.Linear(6, 5)), DyLoRA(rank=3, targets=("layer",)))
    adapter = _adapter(cm)
    assert adapter.lora_A.shape == (3, 6) and adapter.lora_B.shape == (5, 3)
    assert adapter.lora_A.abs().max() <= 1 / 6**0.5 and adapter.lora_A.std() > 0
    assert torch.count_nonzero(adapter.lora_B) == 0


# -- the inference rank ---------------------------------------------------------------------------


def test_set_eval_rank_changes_the_compiled_model_and_what_it_saves(tmp_path):
    model, cm = _single(alpha=6)
    x = torch.randn(3, 6)
    cm.eval()
    set_eval_rank(cm, 2)
    assert cm.spec("default") == DyLoRA(rank=4, alpha=6, eval_rank=2, targets=("layer",))
    with torch.no_grad():
        expected = _adapted(_adapter(cm), model.layer, x, 2, 6.0)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.save_adapters(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["eval_rank"] == 2
    loaded = surgeon.load(One(nn.Linear(6, 5)).requires_grad_(False), tmp_path)
    loaded.model.layer.load_state_dict(model.layer.state_dict())
    torch.testing.assert_close(loaded.eval()(x), expected, rtol=1e-5, atol=1e-5)
    set_eval_rank(cm, None)
    with torch.no_grad():
        full = _adapted(_adapter(cm), model.layer, x, 4, 6.0)
    torch.testing.assert_close(cm(x), full, rtol=1e-5, atol=1e-5)


def test_set_eval_rank_refuses_a_merged_adapter_a_rank_too_high_and_other_methods():
    _, cm = _single()
    cm.merge()
    with pytest.raises(surgeon.SpecError, match="'default' is merged at rank 4; unmerge it"):
        set_eval_rank(cm, 2)
    cm.unmerge()
    with pytest.raises(surgeon.SpecError, match=r"DyLoRA.eval_rank=5: expected at most rank=4"):
        set_eval_rank(cm, 5)
    assert cm.spec("default").eval_rank is None
    cm.add_adapter("lora", LoRA(rank=2, targets=("layer",)))
    with pytest.raises(surgeon.SpecError, match="adapter 'lora' is lora, not dylora"):
        set_eval_rank(cm, 1, "lora")


# -- files ----------------------------------------------------------------------------------------


def test_files_hold_loras_factors_under_our_own_type(tmp_path):
    entry = ZOO["llama"]
    spec = DyLoRA(rank=4, alpha=6, eval_rank=3, frozen=False, seed=9)
    cm = surgeon.compile(entry.model(), spec).eval()
    randomize(cm, scale=0.5)
    x = entry.example()
    expected = logits(cm(**x))
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "SURGEON_DYLORA"
    assert (config["r"], config["lora_alpha"], config["eval_rank"]) == (4, 6, 3)
    assert config["frozen"] is False and config["rank_seed"] == 9
    saved = load_file(tmp_path / WEIGHTS_NAME)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert saved[f"{q}.lora_A.weight"].shape == (4, 32)
    assert saved[f"{q}.lora_B.weight"].shape == (32, 4)
    loaded = surgeon.load(entry.model(), tmp_path).eval()
    assert loaded.spec("default") == spec
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"eval_rank": 5},
            r"eval_rank=5: expected at most rank=4 .*\(adapter_config.json key 'eval_rank'\)",
        ),
        ({"eval_rank": 1.5}, "eval_rank=1.5: expected an integer, or null"),
        ({"frozen": "yes"}, "frozen='yes': expected true or false"),
        ({"rank_seed": "x"}, "rank_seed='x': expected an integer"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"use_dora": True}, "use_dora=True"),
        ({"target_modules": None}, "target_modules is missing"),
    ],
)
def test_configs_surgeon_cannot_honour_are_refused_naming_the_key(change, match, tmp_path):
    entry = ZOO["llama"]
    surgeon.compile(entry.model(), DyLoRA(rank=4)).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


# -- the spec -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"DyLoRA.rank=0: expected an integer >= 1"),
        ({"eval_rank": 0}, r"DyLoRA.eval_rank=0: expected an integer >= 1"),
        ({"rank": 2, "eval_rank": 3}, r"DyLoRA.eval_rank=3: expected at most rank=2"),
        ({"alpha": 0}, r"DyLoRA.alpha=0: expected a number > 0"),
        ({"dropout": 1.0}, r"DyLoRA.dropout=1.0: expected a number >= 0 and < 1"),
        ({"frozen": 1}, r"DyLoRA.frozen=1: expected true or false"),
        ({"seed": 0.5}, r"DyLoRA.seed=0.5: expected an integer from"),
        ({"bias": "lora_only"}, r"DyLoRA.bias='lora_only': expected one of"),
        ({"targets": ()}, r"DyLoRA.targets=\[\]: expected at least one target"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        DyLoRA(**fields)


def test_registered_under_its_name_with_its_own_peft_type():
    assert METHODS["dylora"] is DyLoRA is surgeon.DyLoRA
    assert DyLoRA.peft_type == "SURGEON_DYLORA"
    spec = surgeon.MethodSpec.from_dict({"method": "dylora", "rank": 4, "eval_rank": 2})
    assert spec == DyLoRA(rank=4, eval_rank=2)


@pytest.mark.parametrize(
    ("layer", "name"),
    [(nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")],
)
def test_other_layers_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which DyLoRA cannot adapt"):
        surgeon.compile(One(layer), DyLoRA(targets=("layer",)))


# -- training -------------------------------------------------------------------------------------


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = gpt2_conv1d(6, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_surgeon_train_draws_a_rank_per_step_and_resumes_exactly(tmp_path):
    spec = DyLoRA(rank=4, seed=2, targets=("a", "b"))
    _, whole, fresh, _ = train_and_resume_spec(spec, Stack, tmp_path)
    assert _adapter(whole).sampler.current() == _draws(2, 4, 5)[-1]  # 4 steps drew 4 times
    assert _adapter(fresh).sampler.current() == _adapter(whole).sampler.current()
