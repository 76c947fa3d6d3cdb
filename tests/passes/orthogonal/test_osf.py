"""OSF beyond the conformance suite: the init is PEFT's SVD split (same numbers, same signs, in
half precision too); the formula on tall, wide and square layers; the gradient projection (after
one backward the low factors' gradients are orthogonal to the high subspace, equal to PEFT's
projected gradients, also where PEFT stores the high factor); `surgeon.train` and a plain loop
keep the high part frozen; PEFT parity on options the examples lack (rank patterns found
anywhere in a path, whole-layer ranks, init_weights=False, target_svd_config, the default
targets, several adapters through PEFT's merge); errors naming fields and PEFT keys."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn
from zoo import (
    ZOO,
    One,
    gpt2_conv1d,
    load_with_changed_config,
    logits,
    peft_loaded,
    peft_model,
    plain_output,
    randomize,
)

import surgeon
from surgeon.io import CONFIG_NAME
from surgeon.passes.orthogonal.osf import OSF, resolve_rank


def formula(spec, adapter, base, x):
    """OSF (Nayak et al., 2025): ``(W_high + U_low diag(S_low) V_low) x + b`` with ``W_high`` the
    top-``k`` part of the base weight's SVD (the conformance suite wraps the layer as ``layer``)."""
    u, s, vh = torch.linalg.svd(base.weight.detach().float(), full_matrices=False)
    k = resolve_rank(_value_for(spec, "layer"), min(base.weight.shape))
    high = (u[:, :k] * s[:k]) @ vh[:k]
    low = (adapter.U_low * adapter.S_low) @ adapter.V_low
    return plain_output(base, x, (high + low).to(base.weight.dtype))


def _value_for(spec, path):
    """The effective rank the spec gives ``path``: the first rank_pattern key found in it."""
    found = (v for key, v in spec.rank_pattern.items() if re.search(key, path))
    return next(found, spec.effective_rank)


peft = pytest.importorskip("peft")

# PEFT 0.21's OSF forward runs only active_adapters[0]; its merge folds in every active one
PEFT_FORWARD_RUNS_FIRST_ACTIVE_ONLY = True


class Shapes(nn.Module):
    """A tall (out > in: PEFT stores U_high), a wide (out < in: V_high) and a square layer."""

    def __init__(self) -> None:
        super().__init__()
        self.tall = nn.Linear(6, 10)
        self.wide = nn.Linear(10, 4)
        self.square = nn.Linear(4, 4)

    def forward(self, x):
        return self.square(self.wide(self.tall(x)))


NAMES = ("tall", "wide", "square")
NAMES_LOW = ("U_low", "S_low", "V_low")


def _shapes(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return Shapes().to(dtype)


def _peft(model, seed: int | None = 5, **config):
    """PEFT's OSF on the three layers, ``config`` over rank 2."""
    config = {"target_modules": list(NAMES), "effective_rank": 2, **config}
    return peft_model(model, peft.OSFConfig(**config), seed=seed)


def _theirs(pm, path, adapter="default"):
    """PEFT's OSF layer at ``path``: its trainable factors and frozen buffers by our names."""
    layer = pm.base_model.model.get_submodule(path)
    params = layer.osf_svd_params[adapter]
    out = {n: params[n] for n in ("U_low", "S_low", "V_low")}
    for ours, buffers in [
        ("U_init", layer._osf_U_low_init),
        ("S_init", layer._osf_S_low_init),
        ("V_init", layer._osf_V_low_init),
        ("U_high", layer._osf_U_high),
        ("V_high", layer._osf_V_high),
    ]:
        out[ours] = dict(buffers.items()).get(adapter)  # PEFT's BufferDict has no get()
    return out


def _high_bases(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, _, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    return u[:, :k], vh[:k]


# -- the init and the formula ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_init_is_peft_svd_split_with_the_same_numbers(dtype):
    """Same factors, same signs, same order; in half precision rounded through the base dtype
    and kept in float32; U_high stored only for the tall layer, V_high only for the wide one."""
    pm = _peft(_shapes(dtype), seed=None, effective_rank=3)
    cm = surgeon.compile(_shapes(dtype), OSF(effective_rank=3, targets=NAMES))
    for path, layer in cm.store.items("default"):
        theirs = _theirs(pm, path)
        for name, value in theirs.items():
            mine = getattr(layer, name)
            if value is None:
                assert mine is None, (path, name)
                continue
            assert mine.dtype == value.dtype == torch.float32, (path, name)
            assert torch.equal(mine, value), (path, name)
    layers = dict(cm.store.items("default"))
    assert layers["tall"].U_high.shape == (10, 3) and layers["tall"].V_high is None
    assert layers["wide"].V_high.shape == (3, 10) and layers["wide"].U_high is None
    assert layers["square"].U_low.shape == (4, 1)
    x = torch.randn(3, 6, dtype=dtype)
    assert torch.equal(cm(x), _shapes(dtype)(x))  # the two low terms cancel exactly


def test_the_output_is_the_formula_on_tall_wide_and_square_layers_and_merges():
    model = _shapes()
    spec = OSF(effective_rank=2, rank_pattern={"sq": 0.5}, targets=NAMES)
    cm = surgeon.compile(model, spec).eval()
    randomize(cm, scale=0.3)
    x = torch.randn(5, 6)
    layers = dict(cm.store.items("default"))
    assert layers["square"].S_low.numel() == 2  # 0.5 of 4 frozen
    with torch.no_grad():
        h = x
        for name in NAMES:
            base = model.get_submodule(name)
            u, s, vh = torch.linalg.svd(base.weight.float(), full_matrices=False)
            k = min(base.weight.shape) - layers[name].S_low.numel()
            low = (layers[name].U_low * layers[name].S_low) @ layers[name].V_low
            h = plain_output(base, h, (u[:, :k] * s[:k]) @ vh[:k] + low)
    torch.testing.assert_close(cm(x), h, rtol=1e-5, atol=1e-5)
    weights = [p.detach().clone() for p in model.parameters()]
    cm.merge()
    torch.testing.assert_close(cm(x), h, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(list(model.parameters()), weights, rtol=0, atol=1e-6)


# -- the gradient projection ----------------------------------------------------------------


def _raw_gradients(layer, base, x):
    """The gradients of U_low, S_low, V_low from the formula with plain leaf copies (nothing
    projects them), for the loss ``sum(y²)`` of this one layer."""
    leaves = {n: getattr(layer, n).detach().clone().requires_grad_() for n in NAMES_LOW}
    initial = (layer.U_init * layer.S_init) @ layer.V_init
    weight = base.weight - initial + (leaves["U_low"] * leaves["S_low"]) @ leaves["V_low"]
    plain_output(base, x, weight).pow(2).sum().backward()
    return {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("shape", [(6, 10), (10, 4), (4, 4)], ids=["tall", "wide", "square"])
def test_after_one_backward_the_low_gradients_are_orthogonal_to_the_high_subspace(shape):
    torch.manual_seed(0)
    base = nn.Linear(*shape)
    cm = surgeon.compile(One(base), OSF(effective_rank=2, targets=("layer",))).train()
    randomize(cm, scale=0.3)
    ((_, layer),) = cm.store.items("default")
    x = torch.randn(7, shape[0])
    cm(x).pow(2).sum().backward()
    u_high, v_high = _high_bases(base.weight, 2)
    raw = _raw_gradients(layer, base, x)
    assert (u_high.t() @ raw["U_low"]).abs().max() > 1e-2  # there was something to remove
    assert (u_high.t() @ layer.U_low.grad).abs().max() < 1e-5
    assert (layer.V_low.grad @ v_high.t()).abs().max() < 1e-5
    complement_u = torch.eye(shape[1]) - u_high @ u_high.t()
    complement_v = torch.eye(shape[0]) - v_high.t() @ v_high
    torch.testing.assert_close(layer.U_low.grad, complement_u @ raw["U_low"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.V_low.grad, raw["V_low"] @ complement_v, rtol=1e-4, atol=1e-5)
    # S_low's gradient is not projected
    torch.testing.assert_close(layer.S_low.grad, raw["S_low"], rtol=1e-5, atol=1e-6)


def test_the_projected_gradients_are_peft_gradients(tmp_path):
    """PEFT's model (its hooks on the parameters) saved, loaded here: one backward on each gives
    the same gradients on the tall (U_high), wide (V_high) and square layers."""
    pm = _peft(_shapes(), effective_rank=2)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(_shapes(), tmp_path)
    x = torch.randn(5, 6)
    for model in (cm, pm):
        model.train()
        model(x).pow(2).sum().backward()
    for path, layer in cm.store.items("default"):
        theirs = _theirs(pm, path)
        for name in NAMES_LOW:
            torch.testing.assert_close(
                getattr(layer, name).grad, theirs[name].grad, rtol=1e-5, atol=1e-6
            )


def test_half_precision_gradients_are_projected_too():
    """PEFT's upcast of half-precision adapters replaces the parameters its hooks sit on, so
    PEFT leaves those gradients unprojected; the graph's projection does not depend on that."""
    model = _shapes(torch.bfloat16)
    cm = surgeon.compile(model, OSF(effective_rank=2, targets=NAMES)).train()
    randomize(cm, scale=0.3)
    cm(torch.randn(5, 6, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    for path, layer in cm.store.items("default"):
        assert layer.U_low.grad.dtype == torch.float32
        u_high, v_high = _high_bases(model.get_submodule(path).weight, 2)
        u_high, v_high = u_high.bfloat16().float(), v_high.bfloat16().float()
        scale = max(layer.U_low.grad.abs().max(), layer.V_low.grad.abs().max())
        assert (u_high.t() @ layer.U_low.grad).abs().max() < 1e-2 * scale, path
        assert (layer.V_low.grad @ v_high.t()).abs().max() < 1e-2 * scale, path


def _high_part(cm, model, k=2) -> dict[str, torch.Tensor]:
    """``U_highᵀ W_eff V_highᵀ`` of every adapted layer, with W_eff the adapted weight."""
    out = {}
    for path, layer in cm.store.items("default"):
        base = model.get_submodule(path)
        u_high, v_high = _high_bases(base.weight, k)
        with torch.no_grad():
            out[path] = u_high.t() @ (base.weight + layer.delta_weight()) @ v_high.t()
    return out


def test_a_plain_sgd_loop_keeps_the_high_part_and_moves_the_low_part_orthogonally():
    """Nothing to call: backward leaves projected gradients, so a linear optimizer's updates of
    U_low and V_low stay orthogonal to the high subspace and the adapted weight's component
    there stays diag(S_high)."""
    model = _shapes()
    cm = surgeon.compile(model, OSF(effective_rank=2, targets=NAMES)).train()
    before = _high_part(cm, model)
    start = {
        p: (layer.U_low.detach().clone(), layer.V_low.detach().clone())
        for p, layer in cm.store.items("default")
    }
    optimizer = torch.optim.SGD(
        [p for p in cm.parameters() if p.requires_grad], lr=0.05, momentum=0.9
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(8, 6, generator=generator)
        (cm(x) - 1).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = _high_part(cm, model)
    for path, layer in cm.store.items("default"):
        u_high, v_high = _high_bases(model.get_submodule(path).weight, 2)
        moved_u = layer.U_low.detach() - start[path][0]
        moved_v = layer.V_low.detach() - start[path][1]
        assert moved_u.abs().max() > 1e-3 and moved_v.abs().max() > 1e-3, path
        assert (u_high.t() @ moved_u).abs().max() < 1e-5, path
        assert (moved_v @ v_high.t()).abs().max() < 1e-5, path
        torch.testing.assert_close(after[path], before[path], rtol=1e-5, atol=1e-5)


def test_surgeon_train_sees_projected_gradients_and_moves_only_the_low_part():
    """Every step's gradients, as the optimizer gets them, are orthogonal to the high subspace
    (AdamW's elementwise steps then need not be: as in PEFT); the base weight and the frozen
    parts do not move."""
    model = _shapes()
    cm = surgeon.compile(model, OSF(effective_rank=2, targets=NAMES))
    seen: list[tuple[str, str, torch.Tensor]] = []
    for path, layer in cm.store.items("default"):
        for name in ("U_low", "V_low"):
            getattr(layer, name).register_post_accumulate_grad_hook(
                lambda p, path=path, name=name: seen.append((path, name, p.grad.clone()))
            )
    frozen = {
        n: t.detach().clone() for n, t in [*model.named_parameters(), *cm.store.named_buffers()]
    }
    low = {n: p.detach().clone() for n, p in cm.store.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(6, 6, generator=generator), torch.randn(6, 4, generator=generator)
    )
    config = surgeon.TrainingConfig(
        learning_rate=1e-2,
        batch_size=2,
        gradient_accumulation_steps=1,
        warmup_steps=0,
        max_steps=3,
        progress=False,
        distributed="none",
    )
    surgeon.train(cm, data, config, loss_fn=nn.functional.mse_loss)
    assert len(seen) == 3 * 2 * 3  # steps x factors x layers
    for path, name, grad in seen:
        u_high, v_high = _high_bases(model.get_submodule(path).weight, 2)
        along = u_high.t() @ grad if name == "U_low" else grad @ v_high.t()
        assert along.abs().max() < 1e-5 * max(1.0, grad.abs().max()), (path, name)
    for n, t in [*model.named_parameters(), *cm.store.named_buffers()]:
        assert torch.equal(t, frozen[n]), n
    assert all(not torch.equal(p, low[n]) for n, p in cm.store.named_parameters())


# -- PEFT parity on options the examples lack ------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        # found anywhere in the path (re.search), the first matching key wins ("sq" never:
        # "e" comes first; a file keeps keys sorted), 1.0 is all of a layer, 1 one direction
        {"effective_rank": 0.5, "rank_pattern": {"e": 1, "sq": 3.0, "t": 1.0}},
        {"effective_rank": 8},  # more than any layer has: clamped, nothing trains
        {"effective_rank": None, "init_weights": False},  # random starts the file replaces
        {"effective_rank": 1, "target_svd_config": {"tall.weight": 2}},  # PEFT ignores it
    ],
    ids=["patterns", "whole-layers", "random-init", "target-svd-config"],
)
def test_peft_files_with_other_options_load_with_peft_outputs(config, tmp_path):
    pm = _peft(_shapes(), **config)
    pm.save_pretrained(tmp_path)
    x = torch.randn(5, 6)
    cm = surgeon.load(_shapes(), tmp_path).eval()
    spec = cm.spec("default")
    for path, layer in cm.store.items("default"):
        assert layer.S_low.shape == _theirs(pm, path)["S_low"].shape, path
    torch.testing.assert_close(cm(x), pm(x), rtol=1e-5, atol=1e-5)
    back = tmp_path / "back"
    cm.save_adapters(back)
    written = json.loads((back / CONFIG_NAME).read_text())
    assert written["effective_rank"] == config["effective_rank"]
    assert written["rank_pattern"] == config.get("rank_pattern", {})
    assert "target_svd_config" not in written and written["init_weights"] is True
    assert spec == OSF.from_peft_config(written, "here")
    torch.testing.assert_close(peft_loaded(_shapes(), back)(x), pm(x), rtol=1e-5, atol=1e-5)


def test_pattern_resolution_is_peft_order_and_search():
    spec = OSF(effective_rank=0.5, rank_pattern={"e": 1, "sq": 3, "t": 0.5}, targets=NAMES)
    cm = surgeon.compile(_shapes(), spec)
    ranks = {p: layer.effective_rank for p, layer in cm.store.items("default")}
    assert ranks == {"tall": 3, "wide": 1, "square": 1}


def test_patterns_whose_order_decides_differently_once_sorted_are_refused():
    """PEFT takes the first matching key in the mapping's order, and adapter_config.json keeps
    keys sorted: an adapter whose ranks depend on that order would change when saved."""
    spec = OSF(rank_pattern={"al": 1, "a": 1.0}, targets=NAMES)
    with pytest.raises(surgeon.SpecError, match=r"keys 'al' and 'a' both match tall"):
        surgeon.compile(_shapes(), spec)
    same_rank = OSF(rank_pattern={"al": 2, "a": 2}, targets=NAMES)
    assert surgeon.compile(_shapes(), same_rank).store.paths["default"] == list(NAMES)


def test_the_default_targets_are_peft_all_linear_on_llama(tmp_path):
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), OSF())
    randomize(cm, scale=0.05)
    paths = cm.store.paths["default"]
    assert len(paths) == 2 * 7 and not any("lm_head" in p for p in paths)
    cm.save_adapters(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["target_modules"] == "all-linear"
    pm = peft_loaded(entry.model(), tmp_path)
    x = entry.example()
    torch.testing.assert_close(logits(pm(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-5)


def test_layers_and_exclusions_are_written_as_the_chosen_paths(tmp_path):
    entry = ZOO["llama"]
    spec = OSF(effective_rank=4, targets=("q_proj", "v_proj"), layers=1, exclude=("v_proj",))
    cm = surgeon.compile(entry.model(), spec)
    randomize(cm, scale=0.05)
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    assert "exclude_modules" not in config and "layers_to_transform" not in config
    x = entry.example()
    pm = peft_loaded(entry.model(), tmp_path)
    torch.testing.assert_close(logits(pm(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_peft_files_load_with_peft_outputs(dtype, tmp_path):
    pm = _peft(_shapes(dtype))
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(_shapes(dtype), tmp_path).eval()
    x = torch.randn(5, 6, dtype=dtype)
    out = cm(x)
    assert out.dtype == dtype
    tolerance = 2 * torch.finfo(dtype).eps * max(1.0, float(out.detach().abs().max()))
    torch.testing.assert_close(out, pm(x), rtol=0, atol=tolerance)


def test_two_active_adapters_add_up_as_peft_merges_them(tmp_path):
    """PEFT's OSF forward runs only the first active adapter, while its merge folds every
    active one; surgeon applies both unmerged, as PEFT's merged model (and its own merge)."""
    cm = surgeon.compile(
        _shapes(),
        surgeon.Spec({"a": OSF(effective_rank=2, targets=NAMES), "b": OSF(targets=NAMES)}),
    ).eval()
    randomize(cm, scale=0.3)
    cm.set_active(["a", "b"])
    x = torch.randn(5, 6)
    both = cm(x)
    cm.save_adapters(tmp_path)
    pm = peft_loaded(_shapes(), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])
    assert not torch.allclose(pm(x), both, atol=1e-4)  # PEFT's forward: "a" alone
    pm.base_model.merge_adapter()
    torch.testing.assert_close(pm(x), both, rtol=1e-5, atol=1e-5)


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"effective_rank": 0}, r"OSF.effective_rank=0: expected an integer >= 1"),
        ({"effective_rank": -2}, r"OSF.effective_rank=-2: expected"),
        ({"effective_rank": 2.5}, r"OSF.effective_rank=2.5: expected .* a fraction in \(0, 1\]"),
        ({"effective_rank": True}, r"OSF.effective_rank=True: expected"),
        ({"effective_rank": "half"}, r"OSF.effective_rank='half': expected"),
        ({"rank_pattern": {"q_proj": 0.0}}, r"OSF.rank_pattern\['q_proj'\]=0.0: expected"),
        ({"rank_pattern": {"(": 2}}, r"OSF.rank_pattern\['\('\]='\(': not a valid regular"),
        ({"rank_pattern": [("q", 2)]}, r"OSF.rank_pattern=.*: expected a mapping"),
        ({"r": 8}, r"OSF has no field 'r'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        OSF(**fields)


def test_a_whole_float_rank_is_the_integer_and_one_point_zero_stays_a_fraction():
    assert OSF(effective_rank=16.0).effective_rank == 16
    assert OSF(effective_rank=1.0).effective_rank == 1.0
    assert isinstance(OSF(effective_rank=1.0).effective_rank, float)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            OSF(effective_rank=0.1, targets=NAMES),
            r"OSF.effective_rank=0.1 gives tall \(smaller dimension 6\) an effective rank of 0",
        ),
        (OSF(rank_pattern={"wi": 0.2}, targets=NAMES), r"OSF.rank_pattern\['wi'\]=0.2 gives wide"),
        (
            OSF(rank_pattern={"nowhere": 2}, targets=NAMES),
            r"OSF.rank_pattern: key 'nowhere' matches no targeted module",
        ),
    ],
    ids=["fraction-to-zero", "pattern-to-zero", "pattern-unmatched"],
)
def test_ranks_that_do_not_fit_the_model_are_refused(spec, match):
    model = _shapes()
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.compile(model, spec)
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize(
    ("layer", "name"),
    [(gpt2_conv1d(), "Conv1D"), (nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which OSF cannot adapt"):
        surgeon.compile(One(layer), OSF(targets=("layer",)))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"effective_rank": 2.5}, r"effective_rank=2.5.*adapter_config.json key 'effective_rank'"),
        ({"effective_rank": 0}, r"effective_rank=0.*adapter_config.json key 'effective_rank'"),
        ({"effective_rank": "2"}, r"effective_rank='2': expected a number"),
        ({"rank_pattern": {"tall": -1}}, r"rank_pattern\['tall'\]=-1.*key 'rank_pattern'"),
        ({"rank_pattern": ["tall"]}, r"rank_pattern=\['tall'\]: expected a mapping"),
        ({"target_modules": None}, r"target_modules is missing"),
        ({"use_dora": True}, r"use_dora=True selects a variant"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused_naming_the_key(change, match, tmp_path):
    surgeon.compile(_shapes(), OSF(targets=NAMES)).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(_shapes(), tmp_path, change)


# -- devices ---------------------------------------------------------------------------------


def test_the_frozen_parts_follow_the_model_onto_the_meta_device():
    """The suite checks the trainable factors on the meta device; the buffers it does not see."""
    with torch.device("meta"):
        model = Shapes()
    cm = surgeon.compile(model, OSF(effective_rank=2, targets=NAMES))
    layers = dict(cm.store.items("default"))
    assert all(b.is_meta for b in cm.store.buffers())
    assert layers["tall"].U_high.shape == (10, 2) and layers["wide"].V_high.shape == (2, 10)
    assert cm(torch.empty(3, 6, device="meta")).shape == (3, 4)
