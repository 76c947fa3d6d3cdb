"""AdaLoRA's card (its SVD formula) and what is AdaLoRA's own: a dilated convolution and
merge_and_unload, the scale under rank patterns, the init (as PEFT's), dropout, files (the three
factors, rank patterns both ways, PEFT config variants), rank allocation step by step beside PEFT's
RankAllocator, the orthogonality regulariser, spec validation, golden rewritten graphs. The
conformance suite (tests/conformance) runs the formula, merging, files, PEFT parity, gradients,
devices and dtypes on every example."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from zoo import (
    ZOO,
    One,
    gpt2_conv1d,
    graph_code,
    load_with_changed_config,
    logits,
    peft_loaded,
    peft_model,
    plain_output,
    randomize,
)

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.lowrank.adalora import AdaLoRA, allocate


def formula(spec, adapter, base, x):
    """AdaLoRA (Zhang et al., 2023): ``W x + b + P diag(Λ) Q x · alpha / (initial rank +
    1e-5)``; on a Conv2d ``P diag(Λ) Q`` is the kernel, flattened over its input dims."""
    p, e, q = adapter.lora_B, adapter.lora_E.view(-1), adapter.lora_A
    delta = p @ torch.diag(e) @ q * (spec.alpha / (spec.initial_rank + 1e-5))
    if isinstance(base, nn.Conv2d):
        return plain_output(base, x, base.weight + delta.view(base.weight.shape))
    weight = base.weight + (delta if isinstance(base, nn.Linear) else delta.t())
    return plain_output(base, x, weight)


peft = pytest.importorskip("peft")

TARGETS = ("q_proj", "v_proj", "down_proj")  # on the tiny Llama
FACTORS = ("lora_A", "lora_E", "lora_B")


def _spec(**fields) -> AdaLoRA:
    return AdaLoRA(**{"initial_rank": 4, "target_rank": 2, **fields})


def _peft_config(targets, **fields):
    fields = {"init_r": 4, "target_r": 2, "lora_alpha": 16, "total_step": 10, **fields}
    return peft.AdaLoraConfig(target_modules=list(targets), **fields)


def _peft_layer(pm, path):
    return pm.base_model.model.get_submodule(path)


def _copy_to_peft(cm, pm):
    with torch.no_grad():
        for path, layer in cm.store.items("default"):
            for factor in FACTORS:
                getattr(_peft_layer(pm, path), factor)["default"].copy_(getattr(layer, factor))


LAYERS = {
    "linear": (lambda: nn.Linear(5, 6), lambda: torch.randn(3, 5)),
    "conv1d_gpt2": (gpt2_conv1d, lambda: torch.randn(2, 3, 5)),
    "conv2d": (
        lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2),
        lambda: torch.randn(2, 3, 9, 9),
    ),
    "conv2d_1x1": (lambda: nn.Conv2d(3, 4, 1), lambda: torch.randn(2, 3, 5, 5)),
}


# -- the formula ---------------------------------------------------------------------------------


def _expected(layer: nn.Module, adapter, x: torch.Tensor, alpha: float, rank: int):
    """The formula written out: ΔW = P diag(Λ) Q · alpha / (initial rank + 1e-5), added to W."""
    p, e, q = adapter.lora_B, adapter.lora_E.view(-1), adapter.lora_A
    delta = p @ torch.diag(e) @ q * (alpha / (rank + 1e-5))
    if isinstance(layer, nn.Conv2d):
        kernel = delta.view(layer.weight.shape)
        extra = F.conv2d(x, kernel, None, layer.stride, layer.padding, layer.dilation)
        return layer(x) + extra
    base = layer(x) if isinstance(layer, nn.Linear) else x @ layer.weight + layer.bias
    return base + x @ delta.t()


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_output_is_the_svd_formula_and_merge_matches(kind):
    """With a dilated conv2d (the conformance suite's layers have none) and merge_and_unload."""
    build, make_x = LAYERS[kind]
    torch.manual_seed(0)
    model = One(build())
    x = make_x()
    cm = surgeon.compile(model, _spec(initial_rank=3, alpha=5, targets=("layer",)))
    randomize(cm, scale=0.5)
    ((_, adapter),) = cm.store.items("default")
    weight = model.layer.weight.detach().clone()
    expected = _expected(model.layer, adapter, x, alpha=5, rank=3)
    assert not torch.allclose(expected, model.layer(x), atol=1e-3)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.merge()
    assert "lora_E" not in cm.graph.code()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(model.layer.weight, weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    plain = cm.merge_and_unload()
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


def test_scale_uses_the_initial_rank_even_for_layers_a_rank_pattern_shrinks():
    torch.manual_seed(0)
    model = One(nn.Linear(5, 6))
    x = torch.randn(3, 5)
    spec = _spec(alpha=8, targets=("layer",), rank_pattern={"layer": [True, False, True, False]})
    cm = surgeon.compile(model, spec)
    randomize(cm, scale=0.5)
    ((_, adapter),) = cm.store.items("default")
    assert adapter.lora_A.shape == (2, 5) and adapter.lora_B.shape == (6, 2)
    assert adapter.scale == pytest.approx(8 / (4 + 1e-5))
    expected = _expected(model.layer, adapter, x, alpha=8, rank=4)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_init_is_peft_init_and_leaves_outputs_unchanged(dtype):
    """Λ zero, P and Q normal(0, 0.02) in float32 (rounded through a half-precision base), with
    the same draws from the global generator as PEFT: one seed, one adapter."""
    entry = ZOO["llama"]
    config = _peft_config(TARGETS, init_r=6)
    torch.manual_seed(3)
    pm = peft_model(entry.model().to(dtype), config, seed=None)
    torch.manual_seed(3)
    cm = surgeon.compile(entry.model().to(dtype), _spec(initial_rank=6, targets=TARGETS))
    for path, layer in cm.store.items("default"):
        assert layer.lora_A.dtype == torch.float32
        for factor in FACTORS:
            assert torch.equal(
                getattr(layer, factor), getattr(_peft_layer(pm, path), factor)["default"]
            )
    assert torch.count_nonzero(layer.lora_E) == 0
    assert layer.lora_A.std().item() == pytest.approx(0.02, rel=0.2)
    x = entry.example()
    torch.testing.assert_close(logits(cm(**x)), logits(entry.model().to(dtype)(**x)))


def test_dropout_is_live_in_train_mode_and_off_in_eval():
    cm = surgeon.compile(ZOO["mlp"].model(), _spec(targets=("head",), dropout=0.5))
    randomize(cm)
    x = torch.randn(8, 12)
    cm.eval()
    torch.testing.assert_close(cm(x), cm(x))
    cm.train()
    torch.manual_seed(0)
    assert not torch.allclose(cm(x), cm(x))


# -- files and PEFT configs ----------------------------------------------------------------------


def test_files_hold_the_three_factors_and_peft_reads_total_steps(tmp_path):
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), _spec(targets=TARGETS, total_steps=100))
    cm.save_adapters(tmp_path)
    assert set(load_file(tmp_path / WEIGHTS_NAME)) == {
        f"base_model.model.{p}.{f}" for p in cm.store.paths["default"] for f in FACTORS
    }
    loaded = peft_loaded(entry.model(), tmp_path)
    assert loaded.peft_config["default"].total_step == 100


def _peft_masked(entry, flags):
    """A PEFT model with random factors and some triplets pruned by its own RankAllocator."""
    pm = peft_model(entry.model(), _peft_config(("q_proj", "v_proj")), seed=None)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    pattern = {f"{path}.lora_E.default": f for path, f in flags.items()}
    pm.base_model.rankallocator.mask_using_rank_pattern(pm.base_model.model, pattern)
    pm.peft_config["default"].rank_pattern = pattern
    return pm.eval()


PATTERN = {
    "model.layers.0.self_attn.q_proj": [True, False, True, False],
    "model.layers.0.self_attn.v_proj": [False, False, False, False],  # pruned away entirely
    "model.layers.1.self_attn.q_proj": [True, True, True, True],
    "model.layers.1.self_attn.v_proj": [False, True, False, False],
}


def test_peft_rank_patterns_load_as_smaller_layers_and_save_back(tmp_path):
    entry = ZOO["llama"]
    pm = _peft_masked(entry, PATTERN)
    x = entry.example()
    expected = logits(pm(**x))
    with warnings.catch_warnings():  # PEFT suspects its own empty layer of being a shard
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "peft")
    cm = surgeon.load(entry.model(), tmp_path / "peft")
    assert cm.spec("default").rank_pattern == {p: tuple(f) for p, f in PATTERN.items()}
    rows = {p: layer.lora_A.shape[0] for p, layer in cm.store.items("default")}
    assert rows == {p: sum(f) for p, f in PATTERN.items()}
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)
    cm.save_adapters(tmp_path / "surgeon")
    config = json.loads((tmp_path / "surgeon" / CONFIG_NAME).read_text())
    assert config["rank_pattern"] == {f"{p}.lora_E": f for p, f in PATTERN.items()}
    loaded = peft_loaded(entry.model(), tmp_path / "surgeon")
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=1e-5, atol=1e-6)
    again = surgeon.load(entry.model(), tmp_path / "surgeon")
    assert torch.equal(logits(again(**x)), logits(cm(**x)))


def test_allocated_masks_save_as_the_final_rank_pattern(tmp_path):
    """After allocation the file holds only the kept triplets and the config the final
    rank_pattern, as PEFT saves them: PEFT and surgeon load it with the same outputs."""
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), _spec(total_steps=10))
    randomize(cm, scale=0.5)
    for path, layer in cm.store.items("default"):
        layer.keep(torch.tensor(PATTERN[path]))
    assert [layer.rank for _, layer in cm.store.items("default")] == [2, 0, 4, 1]
    assert [row.rank for row in cm.inspect().rows] == [2, 0, 4, 1]
    x = entry.example()
    expected = logits(cm(**x))
    with torch.no_grad():
        reference = _peft_masked(entry, PATTERN)
        _copy_to_peft(cm, reference)
    torch.testing.assert_close(logits(reference(**x)), expected, rtol=1e-5, atol=1e-6)
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["rank_pattern"] == {f"{p}.lora_E": list(f) for p, f in PATTERN.items()}
    saved = load_file(tmp_path / WEIGHTS_NAME)
    for path, flags in PATTERN.items():
        assert saved[f"base_model.model.{path}.lora_E"].shape == (sum(flags), 1)
    loaded = peft_loaded(entry.model(), tmp_path)
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=1e-5, atol=1e-6)
    back = surgeon.load(entry.model(), tmp_path)
    assert [layer.rank for _, layer in back.store.items("default")] == [2, 0, 4, 1]
    torch.testing.assert_close(logits(back(**x)), expected, rtol=1e-5, atol=1e-6)


def test_a_spec_without_total_steps_saves_a_config_peft_accepts(tmp_path):
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), _spec(tinit=3, tfinal=2))
    randomize(cm)
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["total_step"] == 6 and config["rank_pattern"] is None
    x = entry.example()
    loaded = peft_loaded(entry.model(), tmp_path)
    torch.testing.assert_close(logits(loaded(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bias": "all"}, "bias='all'"),
        ({"target_modules": None}, "target_modules is missing"),
        ({"layers_to_transform": [0], "layers_pattern": "blocks.x"}, "layers_pattern="),
        ({"rank_pattern": {"model.layers.0.self_attn.q_proj": [True] * 4}}, "lora_E parameter"),
        ({"rank_pattern": {"model.layers.0.q.lora_E": [True] * 4}}, "not a targeted module"),
        ({"rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [1]}}, "list of 4"),
        ({"use_dora": True}, "use_dora=True selects a variant"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["llama"]
    surgeon.compile(entry.model(), _spec(total_steps=10)).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


def test_fields_peft_ignores_for_adalora_are_accepted(tmp_path):
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), _spec(total_steps=10))
    randomize(cm)
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config.update({"r": 64, "use_rslora": True, "alpha_pattern": {"q_proj": 3}})
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    x = entry.example()
    expected = logits(peft_loaded(entry.model(), tmp_path)(**x))
    torch.testing.assert_close(logits(surgeon.load(entry.model(), tmp_path)(**x)), expected)
    torch.testing.assert_close(expected, logits(cm(**x)), rtol=1e-5, atol=1e-6)


# -- rank allocation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tinit", "tfinal", "delta_t", "total"), [(0, 0, 1, 20), (3, 5, 2, 30), (10, 0, 4, 17)]
)
def test_budget_schedule_is_peft_budget_schedule(tinit, tfinal, delta_t, total):
    config = _peft_config(
        ("q_proj", "v_proj"),
        init_r=6,
        target_r=2,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=delta_t,
        total_step=total,
    )
    allocator = peft_model(ZOO["llama"].model(), config, seed=None).base_model.rankallocator
    spec = _spec(initial_rank=6, tinit=tinit, tfinal=tfinal, delta_t=delta_t, total_steps=total)
    assert (allocator.init_bgt, allocator.target_bgt) == (24, 8)
    ours = [spec.budget_schedule(step, 24, 8) for step in range(total + 3)]
    assert ours == [allocator.budget_schedule(step) for step in range(total + 3)]
    assert ours[0] == (24, False) and ours[-1] == (8, True)
    assert [b for b, _ in ours] == sorted((b for b, _ in ours), reverse=True)


def test_allocation_prunes_the_lowest_scores_across_layers_with_ties():
    cm = surgeon.compile(ZOO["mlp"].model(), _spec(targets=("body.0", "head"), total_steps=10))
    first, second = (layer for _, layer in cm.store.items("default"))
    # importance = sensitivity x uncertainty per entry; Λ's entry + mean over Q's row and P's column
    for layer, e_scores in ((first, [5.0, 1.0, 3.0, 0.5]), (second, [2.0, 1.0, 7.0, 0.5])):
        for factor in FACTORS:
            param = getattr(layer, factor)
            setattr(layer, f"{factor}_sensitivity", torch.ones_like(param))
            setattr(layer, f"{factor}_uncertainty", torch.zeros_like(param))
        layer.lora_E_uncertainty = torch.tensor(e_scores).view(-1, 1)
        layer.lora_A_uncertainty[0] = 2.0  # row 0 of Q adds 2: the triplet scores 5 + 2
        with torch.no_grad():
            layer.lora_E.fill_(1.0)
    torch.testing.assert_close(first.triplet_scores(), torch.tensor([7.0, 1.0, 3.0, 0.5]))
    allocate([first, second], budget=5)  # prune 3: 0.5, 0.5 (tied) and 1.0, 1.0 (tied) all go
    assert first.kept.tolist() == [True, False, True, False]
    assert second.kept.tolist() == [True, False, True, False]
    assert first.lora_E.view(-1).tolist() == [1.0, 0.0, 1.0, 0.0]
    allocate([first, second], budget=8)  # nothing to prune
    assert first.kept.all() and second.kept.all()


def test_regulariser_is_peft_frobenius_mean_by_hand():
    cm = surgeon.compile(ZOO["llama"].model(), _spec(orth_reg_weight=0.3, total_steps=10))
    randomize(cm, scale=0.4)
    layers = dict(cm.store.items("default"))
    norms = []
    for layer in layers.values():
        a, b = layer.lora_A.detach(), layer.lora_B.detach()
        norms.append(((a @ a.t() - torch.eye(4)) ** 2).sum().sqrt())
        norms.append(((b.t() @ b - torch.eye(4)) ** 2).sum().sqrt())
    expected = 0.3 * sum(norms) / len(norms)
    term = cm.regularization_loss()
    torch.testing.assert_close(term, expected)
    term.backward()
    assert all(layer.lora_A.grad is not None for layer in layers.values())
    assert _spec(orth_reg_weight=0).loss_term(layers) is None


def _train_side_by_side(steps: int, **schedule):
    """Tiny Llama with AdaLoRA here and in PEFT from the same weights, fed the same batches,
    AdamW on both, allocation after each backward; yields both sides between allocation and
    the optimizer step."""
    entry = ZOO["llama"]
    fields = {"initial_rank": 6, "target_rank": 3, "alpha": 16, **schedule}
    cm = surgeon.compile(entry.model(), AdaLoRA(targets=("q_proj", "v_proj"), **fields))
    config = _peft_config(
        ("q_proj", "v_proj"),
        init_r=6,
        target_r=3,
        tinit=schedule["tinit"],
        tfinal=schedule["tfinal"],
        deltaT=schedule["delta_t"],
        total_step=schedule["total_steps"],
        task_type="CAUSAL_LM",  # PEFT adds its orthogonality term to the loss only with a task
    )
    pm = peft_model(entry.model(), config, seed=None)
    randomize(cm, scale=0.3)  # Λ non-zero: every factor has gradients from the first step
    _copy_to_peft(cm, pm)
    cm.train(), pm.train()
    ours = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=1e-2)
    theirs = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        ids = torch.randint(3, 96, (2, 6), generator=generator)
        their_loss = pm(input_ids=ids, labels=ids).loss
        our_loss = cm(input_ids=ids, labels=ids).loss + cm.regularization_loss()
        their_loss.backward(), our_loss.backward()
        pm.base_model.update_and_allocate(step)
        cm.update_ranks(step)
        yield step, cm, pm, our_loss.item(), their_loss.item()
        ours.step(), theirs.step(), ours.zero_grad(), theirs.zero_grad()


def test_training_allocates_ranks_like_peft():
    """Masks equal PEFT's at every allocation, losses (with the regulariser) and weights agree
    up to float32 rounding (the forward multiplies in another order than PEFT's)."""
    schedule = {"tinit": 2, "tfinal": 4, "delta_t": 2, "total_steps": 16}
    masked_steps = []
    for step, cm, pm, our_loss, their_loss in _train_side_by_side(19, **schedule):
        assert our_loss == pytest.approx(their_loss, rel=1e-5)
        pattern = pm.peft_config["default"].rank_pattern
        layers = dict(cm.store.items("default"))
        if pattern is not None and all(layer.kept is not None for layer in layers.values()):
            masks = {p: layer.kept.tolist() for p, layer in layers.items()}
            assert masks == {p.removesuffix(".lora_E.default"): m for p, m in pattern.items()}
            masked_steps.append((step, sum(layer.rank for layer in layers.values())))
        if step > 12:  # the allocation is fixed: what the optimizer moved is zeroed again
            for layer in layers.values():
                assert torch.count_nonzero(layer.lora_E.view(-1)[~layer.kept]) == 0
        for path, layer in layers.items():
            for factor in FACTORS:
                theirs = getattr(_peft_layer(pm, path), factor)["default"]
                torch.testing.assert_close(getattr(layer, factor), theirs, rtol=1e-4, atol=1e-5)
    # allocations every second step from 4 on; the budget falls 24 -> 12 and stays there
    budgets = dict(masked_steps)
    assert min(budgets) == 4 and budgets[12] == 12 and budgets[18] == 12
    assert sorted(budgets.values(), reverse=True) == list(budgets.values())
    assert all(layer.lora_A_sensitivity is None for layer in layers.values())  # freed at 12


def test_allocation_needs_total_steps_and_gradients():
    cm = surgeon.compile(ZOO["mlp"].model(), _spec(targets=("head",)))
    with pytest.raises(surgeon.SpecError, match=r"AdaLoRA.total_steps=None: rank allocation needs"):
        cm.update_ranks(0)
    cm = surgeon.compile(ZOO["mlp"].model(), _spec(targets=("head",), total_steps=5))
    with pytest.raises(surgeon.SpecError, match="lora_A has no gradient; call update_ranks"):
        cm.update_ranks(0)
    with pytest.raises(surgeon.SpecError, match="no importance recorded yet"):
        cm.update_ranks(5)  # the final allocation, with nothing recorded before it


# -- spec validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"initial_rank": 0}, r"AdaLoRA.initial_rank=0: expected an integer >= 1"),
        (
            {"target_rank": 13},
            r"AdaLoRA.target_rank=13: expected an integer <= initial_rank \(12\)",
        ),
        ({"target_rank": 0}, r"AdaLoRA.target_rank=0: expected an integer >= 1"),
        ({"alpha": 0}, r"AdaLoRA.alpha=0: expected a number > 0"),
        ({"beta1": 1.0}, r"AdaLoRA.beta1=1.0: expected a number > 0 and < 1"),
        ({"beta2": 0}, r"AdaLoRA.beta2=0: expected a number > 0 and < 1"),
        ({"tinit": -1}, r"AdaLoRA.tinit=-1: expected an integer >= 0"),
        ({"tfinal": 1.5}, r"AdaLoRA.tfinal=1.5: expected an integer >= 0"),
        ({"delta_t": 0}, r"AdaLoRA.delta_t=0: expected an integer >= 1"),
        ({"total_steps": 0}, r"AdaLoRA.total_steps=0: expected an integer >= 1"),
        (
            {"total_steps": 10, "tinit": 6, "tfinal": 4},
            r"AdaLoRA.tinit=6: expected tinit < total_steps - tfinal \(10 - 4\)",
        ),
        ({"orth_reg_weight": -0.1}, r"AdaLoRA.orth_reg_weight=-0.1: expected a number >= 0"),
        ({"dropout": 1.0}, r"AdaLoRA.dropout=1.0: expected a number >= 0 and < 1"),
        ({"targets": ()}, r"AdaLoRA.targets=\[\]: expected at least one target"),
        (
            {"rank_pattern": {"q": [True]}},
            r"AdaLoRA.rank_pattern\['q'\]=\[True\]: expected a list of 12",
        ),
        ({"rank_pattern": {"q": [1] * 12}}, r"AdaLoRA.rank_pattern\['q'\]=\[1, .*true/false flags"),
        ({"rank_pattern": ["q"]}, r"AdaLoRA.rank_pattern=\['q'\]: expected a mapping"),
        ({"rank": 4}, r"AdaLoRA has no field 'rank'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        AdaLoRA(**fields)


def test_rank_pattern_for_a_module_not_targeted_is_refused():
    spec = _spec(targets=("head",), rank_pattern={"body.0": [True] * 4})
    with pytest.raises(surgeon.SpecError, match=r"rank_pattern: 'body.0' is not a targeted module"):
        surgeon.compile(ZOO["mlp"].model(), spec)


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (nn.Embedding(5, 4), r"layer \(Embedding\), which AdaLoRA cannot adapt"),
        (nn.Conv1d(2, 2, 1), r"layer \(Conv1d\), which AdaLoRA cannot adapt"),
        (nn.Conv2d(2, 2, 1, groups=2), "convolutions with groups"),
    ],
)
def test_layers_peft_cannot_adapt_are_refused(layer, match):
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.compile(One(layer), _spec(targets=("layer",)))


def test_spec_round_trips_through_a_dict():
    spec = _spec(
        alpha=4,
        tinit=2,
        tfinal=3,
        delta_t=5,
        total_steps=50,
        orth_reg_weight=0.1,
        dropout=0.1,
        layers=(1,),
        rank_pattern={"x": [True, False, True, True]},
    )
    assert surgeon.MethodSpec.from_dict(spec.to_dict()) == spec


# -- golden graphs -------------------------------------------------------------------------------


GOLDEN_MLP = """\
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    body_0 = getattr(self.body, "0")(x);  x = None
    body_1 = getattr(self.body, "1")(body_0);  body_0 = None
    body_2 = getattr(self.body, "2")(body_1);  body_1 = None
    body_3 = getattr(self.body, "3")(body_2);  body_2 = None
    relu = torch.relu(body_3);  body_3 = None
    head = self.head(relu)
    adapters_default_head_lora_a = self.adapters.default.head.lora_A
    adapters_default_head_lora_e = self.adapters.default.head.lora_E
    adapters_default_head_lora_b = self.adapters.default.head.lora_B
    adapters_default_head_dropout = self.adapters.default.head.dropout(relu);  relu = None
    view = adapters_default_head_lora_e.view(-1);  adapters_default_head_lora_e = None
    mul = torch.mul(view, 1.9999950000125002);  view = None
    linear = torch._C._nn.linear(adapters_default_head_dropout, adapters_default_head_lora_a);  adapters_default_head_dropout = adapters_default_head_lora_a = None
    mul_1 = torch.mul(linear, mul);  linear = mul = None
    linear_1 = torch._C._nn.linear(mul_1, adapters_default_head_lora_b);  mul_1 = adapters_default_head_lora_b = None
    add = torch.add(head, linear_1);  head = linear_1 = None
    return add"""

GOLDEN_CNN_CONV1 = """\
    conv1 = self.conv1(x)
    adapters_default_conv1_lora_a = self.adapters.default.conv1.lora_A
    adapters_default_conv1_lora_e = self.adapters.default.conv1.lora_E
    adapters_default_conv1_lora_b = self.adapters.default.conv1.lora_B
    view = adapters_default_conv1_lora_a.view(3, 3, 3, 3);  adapters_default_conv1_lora_a = None
    conv2d = torch.conv2d(x, view, None, (1, 1), (1, 1), (1, 1));  x = view = None
    view_1 = adapters_default_conv1_lora_e.view(-1, 1, 1);  adapters_default_conv1_lora_e = None
    mul = torch.mul(view_1, 1.9999933333555555);  view_1 = None
    view_2 = adapters_default_conv1_lora_b.view(8, 3, 1, 1);  adapters_default_conv1_lora_b = None
    mul_1 = torch.mul(conv2d, mul);  conv2d = mul = None
    conv2d_1 = torch.conv2d(mul_1, view_2);  mul_1 = view_2 = None
    add = torch.add(conv1, conv2d_1);  conv1 = conv2d_1 = None"""

GOLDEN_LEAF_BF16 = """\
def forward(self, input):
    input_1 = input
    base = self.base(input_1)
    adapters_default_lora_a = self.adapters.default.lora_A
    adapters_default_lora_e = self.adapters.default.lora_E
    adapters_default_lora_b = self.adapters.default.lora_B
    to = input_1.to(torch.float32);  input_1 = None
    view = adapters_default_lora_e.view(-1);  adapters_default_lora_e = None
    mul = torch.mul(view, 1.9999900000499997);  view = None
    linear = torch._C._nn.linear(to, adapters_default_lora_a);  to = adapters_default_lora_a = None
    mul_1 = torch.mul(linear, mul);  linear = mul = None
    linear_1 = torch._C._nn.linear(mul_1, adapters_default_lora_b);  mul_1 = adapters_default_lora_b = None
    add = torch.add(base, linear_1);  base = linear_1 = None
    to_1 = add.to(torch.bfloat16);  add = None
    return to_1"""


def test_golden_graph_of_a_whole_model_region_with_dropout():
    """Λ times the scale is one r-vector multiplying the rank-r intermediate (8 / (4 + 1e-5))."""
    spec = _spec(alpha=8, targets=("head",), dropout=0.1)
    assert graph_code(surgeon.compile(ZOO["mlp"].model(), spec), "") == GOLDEN_MLP


def test_golden_graph_of_a_conv2d_as_two_convolutions():
    """Q as an r-channel kernel with the layer's stride and padding, then P as a 1x1 kernel."""
    spec = _spec(initial_rank=3, alpha=6, targets=("conv1",))
    assert GOLDEN_CNN_CONV1 in graph_code(surgeon.compile(ZOO["cnn"].model(), spec), "")


def test_golden_graph_of_a_bfloat16_leaf():
    cm = surgeon.compile(
        ZOO["llama"].model().to(torch.bfloat16), _spec(initial_rank=2, target_rank=1, alpha=4)
    )
    assert graph_code(cm, "model.layers.0.self_attn.v_proj") == GOLDEN_LEAF_BF16
