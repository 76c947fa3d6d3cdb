"""The conformance suite: every registered method, every example it declares
(`MethodSpec.examples`), on the models it applies to, through the same battery.

Oracles: the method's formula (its card, `harness.card`), PEFT (same weights, same outputs, files
both ways, the same gradients after a train step), merge consistency, onnxruntime. A new method
gets all of it by registering; its own test file keeps what is specific to it.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from harness import (
    Case,
    LayerCase,
    call_inputs,
    card,
    cases,
    family,
    first_example,
    has_peft,
    is_layer_method,
    layer_cases,
    methods,
    our_base,
    output,
    paired_parameters,
    peft_base,
    peft_cases,
    peft_load,
    peft_model,
    peft_types,
    perturb,
    saves_in_peft_format,
    train_step,
    without_dropout,
)

import surgeon
from surgeon.export import lowered
from surgeon.io import CONFIG_NAME
from surgeon.peft import REQUIRED
from surgeon.spec import METHODS, MethodSpec

pytest.importorskip("peft")

EXACT = {"rtol": 1e-5, "atol": 1e-5}


def _starts_as_base(case: Case) -> bool:
    return case.spec().starts_as_base


def _assert_changed(new: torch.Tensor, old: torch.Tensor) -> None:
    """The adapter must change the outputs, or an equality after it would prove nothing (virtual
    tokens change their shape)."""
    if new.shape == old.shape:
        assert not torch.allclose(new, old, atol=1e-4), "the adapter does not change the outputs"


# -- the spec -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls", sorted(METHODS.values(), key=lambda c: c.name), ids=lambda c: c.name
)
def test_the_card_has_the_formula(cls: type[MethodSpec]):
    assert callable(getattr(card(cls), "formula", None)), (
        f"tests/passes/{cls.__module__.split('.')[-2]}/test_{cls.name}.py defines no formula"
    )


@pytest.mark.parametrize("case", cases(first_model=True))
def test_spec_round_trips_through_dicts_and_peft_configs(case: Case):
    spec = case.spec()
    assert type(spec).from_dict(spec.to_dict()) == spec
    assert MethodSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    if not saves_in_peft_format(case):
        return
    config = json.loads(json.dumps(spec.to_peft_config(())))
    if not type(spec).accepts_peft_config(config):
        return  # its files load as another method (QLoRA's as LoRA's)
    back = type(spec).from_peft_config(config, "adapter_config.json")
    lossy = {k.key for k in spec.peft_format.keys if k.lossy}
    again = back.to_peft_config(())
    assert {k: v for k, v in again.items() if k not in lossy} == {
        k: v for k, v in config.items() if k not in lossy
    }


@pytest.mark.parametrize(
    "cls", [c for c in METHODS.values() if c.peft_format], ids=lambda c: c.name
)
def test_wrong_typed_peft_config_values_are_spec_errors_naming_the_key(cls: type[MethodSpec]):
    """A fuzzed adapter_config.json (a number where a list belongs, a list for a number) is a
    SpecError that names the key, never a TypeError from deep inside."""
    spec = next(iter(cls.examples(("q_proj",)).values()))
    config = spec.to_peft_config(["model.layers.0.self_attn.q_proj"])
    for key in cls.peft_format.keys:
        for wrong in (1.5, [1.5], {"a": []}, "not-a-value", True):
            if key.type.accepts(wrong) and key.load is None:
                continue
            fuzzed = {**config, key.key: wrong}
            try:
                cls.from_peft_config(fuzzed, "adapter_config.json")
            except surgeon.SpecError as err:
                assert key.key in str(err) or (key.field and key.field in str(err)), (key, err)
    for key in cls.peft_format.keys:
        if key.default is REQUIRED:
            with pytest.raises(surgeon.SpecError, match=f"{key.key} is missing"):
                cls.from_peft_config({k: v for k, v in config.items() if k != key.key}, "here")


# -- the math -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases(_starts_as_base))
def test_a_fresh_adapter_leaves_the_outputs_unchanged(case: Case):
    """Unchanged from the base as the compiled model holds it (QLoRA's is stored in 4 bits)."""
    x = case.inputs()
    cm = surgeon.compile(case.entry.model(), case.spec())
    with cm.disabled():
        base = output(cm, x)
    torch.testing.assert_close(output(cm, x), base, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", layer_cases())
def test_the_output_is_the_formula(case: LayerCase):
    model, x = case.build()
    base_out = model(x)
    cm = surgeon.compile(model, case.spec()).eval()
    perturb(cm)
    ((_, adapter),) = cm.store.items("default")
    expected = card(case.cls).formula(case.spec(), adapter, model.layer, x)
    got = cm(x, **call_inputs(case.cls, case.spec(), {"x": x}))
    _assert_changed(got, base_out)
    torch.testing.assert_close(got, expected, **EXACT)


def _assert_refused_without_change(cm: surgeon.CompiledModel, x: dict, act, match: str) -> None:
    """``act`` raises a `SpecError` matching ``match`` and leaves weights and outputs as they
    were."""
    weights = {n: p.detach().clone() for n, p in cm.model.state_dict().items()}
    expected = output(cm, x)
    with pytest.raises(surgeon.SpecError, match=match):
        act()
    assert cm.merged == []
    for name, value in cm.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    torch.testing.assert_close(output(cm, x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", cases(is_layer_method))
def test_merge_equals_the_unmerged_model_and_unmerge_restores_the_weights(case: Case):
    """A method whose update depends on the inputs (`MethodSpec.merge_refusal`) refuses merging,
    merge_and_unload and export, changing nothing."""
    cm = case.compile().eval()
    x = case.inputs()
    if case.cls.merge_refusal is not None:
        for act in (cm.merge, cm.merge_and_unload):
            _assert_refused_without_change(cm, x, act, "cannot merge adapter 'default'")
        return
    weights = {n: p.detach().clone() for n, p in cm.model.state_dict().items()}
    expected = output(cm, x)
    cm.merge()
    assert "adapters." not in cm.graph.code()  # merged: the graphs run the base layers alone
    torch.testing.assert_close(output(cm, x), expected, **EXACT)
    cm.unmerge()
    for name, value in cm.model.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(output(cm, x), expected, **EXACT)


@pytest.mark.parametrize("case", cases())
def test_save_and_load_give_the_same_adapter(case: Case, tmp_path):
    cm = case.compile().eval()
    x = case.inputs()
    if not saves_in_peft_format(case):
        with pytest.raises(surgeon.SpecError):
            cm.save_adapters(tmp_path)
        assert not any(tmp_path.iterdir())
        return
    cm.save_adapters(tmp_path)
    loaded = surgeon.load(our_base(case, case.spec()), tmp_path).eval()
    torch.testing.assert_close(output(loaded, x), output(cm, x), **EXACT)
    mine = {k: v for k, v in cm.adapter_state_dict().items()}
    assert loaded.adapter_state_dict().keys() == mine.keys()


# -- PEFT -----------------------------------------------------------------------------------------


def _own_type(case: Case) -> bool:
    """A method PEFT lacks, saved under a type of this project's own."""
    return case.cls.peft_type not in peft_types() and saves_in_peft_format(case)


@pytest.mark.parametrize("case", methods(_own_type))
def test_peft_refuses_a_file_of_our_own_type_rather_than_misreading_it(case: Case, tmp_path):
    import peft

    case.compile().save_adapters(tmp_path)
    for load in (
        lambda: peft.PeftConfig.from_pretrained(tmp_path),
        lambda: peft.PeftModel.from_pretrained(case.entry.model(), tmp_path),
    ):
        with warnings.catch_warnings(), pytest.raises(KeyError, match=case.cls.peft_type):
            warnings.simplefilter("ignore")
            load()


@pytest.mark.parametrize("case", peft_cases())
def test_peft_loads_our_file_with_our_outputs(case: Case, tmp_path):
    cm = case.compile().eval()
    x = case.inputs()
    expected = output(cm, x)
    _assert_changed(expected, output(case.entry.model(), case.base_inputs()))
    cm.save_adapters(tmp_path)
    pm = peft_load(tmp_path, peft_base(case, cm))
    torch.testing.assert_close(output(pm, x), expected, **EXACT)


@pytest.mark.parametrize("case", peft_cases())
def test_we_load_peft_file_with_peft_outputs(case: Case, tmp_path):
    spec = case.spec()
    ours = our_base(case, spec)
    pm = peft_model(case, spec, spec.select(ours), peft_base(case, spec=spec))
    pm.save_pretrained(tmp_path)
    x = case.inputs()
    expected = output(pm, x)
    _assert_changed(expected, output(case.entry.model(), case.base_inputs()))
    cm = surgeon.load(ours, tmp_path / _peft_subfolder(tmp_path)).eval()
    assert type(cm.spec("default")).peft_type == case.cls.peft_type
    torch.testing.assert_close(output(cm, x), expected, **EXACT)


def _peft_subfolder(path) -> str:
    return "" if (path / CONFIG_NAME).exists() else "default"


def _trains_from_its_file(case: Case) -> bool:
    """A method's first example, where its file holds what training moves (not a prefix
    encoder's output). First examples train deterministically (no rank or module dropout)."""
    return case.example == first_example(case.cls) and case.spec().file_holds_trained_form


@pytest.mark.parametrize("case", peft_cases(_trains_from_its_file, first_model=True))
def test_a_train_step_gives_peft_gradients(case: Case, tmp_path):
    """PEFT's model from our config, perturbed and saved; ours loads that file; one train step
    on each gives the same gradients for every parameter both train."""
    spec = case.spec()
    paths = spec.select(our_base(case, spec))
    pm = peft_model(case, spec, paths, peft_base(case, spec=spec))
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(our_base(case, spec), tmp_path / _peft_subfolder(tmp_path))
    for model in (cm, pm):
        without_dropout(model)
    x = case.inputs()
    torch.manual_seed(0)  # a method sampling in training (Poly's mixing) draws the same
    train_step(cm, x)
    torch.manual_seed(0)
    train_step(pm, x)
    pairs = paired_parameters(cm.store, pm)
    assert pairs
    for name, mine, their_name, theirs in pairs:
        assert mine.grad is not None and theirs.grad is not None, name
        torch.testing.assert_close(
            mine.grad.flatten(),
            theirs.grad.flatten(),
            rtol=1e-4,
            atol=1e-6,
            msg=f"{name} vs {their_name}",
        )


# -- training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", methods())
def test_gradients_reach_the_adapter_only(case: Case):
    cm = case.compile()
    without_dropout(cm)
    train_step(cm, case.inputs())
    trainable = {n for n, p in cm.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in cm.named_parameters() if p.grad is not None}
    assert trainable and with_grad == trainable
    assert all(n.startswith("store.") for n in trainable)


# -- devices and dtypes ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", methods())
def test_compiles_and_runs_on_the_meta_device(case: Case):
    """Adapters build on the meta device with their real shapes; a method whose shapes come
    from the weights' values (`MethodSpec.shapes_from_weight_values`) refuses it by name."""
    spec = case.spec()
    real = surgeon.compile(case.entry.model(), spec)
    with torch.device("meta"):
        model = case.entry.build().eval()
    if spec.shapes_from_weight_values:
        with pytest.raises(surgeon.SpecError, match="shapes come from the weight's values"):
            surgeon.compile(model, spec)
        return
    cm = surgeon.compile(model, spec)
    shapes = {n: p.shape for n, p in real.store.named_parameters()}
    assert {n: p.shape for n, p in cm.store.named_parameters()} == shapes
    assert all(p.is_meta for p in cm.store.parameters())
    x = {k: v.to("meta") for k, v in case.inputs().items()}
    out = output(cm, x)
    assert out.is_meta and out.shape == output(real, case.inputs()).shape


HALF = ((torch.bfloat16, "bf16"), (torch.float16, "fp16"))


def _half_precision_cases() -> list:
    """Every method in both half dtypes. The default lane runs one dtype per method, the two in
    turn down the registry (both code paths stay in the lane at half the cost); ``-m slow``
    runs the other."""
    out = []
    for index, param in enumerate(methods(prefer="llama")):
        for turn, (dtype, name) in enumerate(HALF):
            other = [pytest.mark.slow] if turn != index % len(HALF) else []
            marks = [*param.marks, *other]
            out.append(pytest.param(*param.values, dtype, id=f"{param.id}-{name}", marks=marks))
    return out


@pytest.mark.parametrize("case, dtype", _half_precision_cases())
def test_half_precision(case: Case, dtype: torch.dtype, tmp_path):
    """Half-precision models run (forward and backward) in their dtype, close to float32 with
    the same adapter; where PEFT's oracle is the plain model, with PEFT's adapter dtypes (its
    autocast_adapter_dtype) and as PEFT to a few units of the dtype's precision."""
    cm = case.compile(dtype).eval()
    reference = case.compile().eval()
    reference.store.load_state_dict({k: v.float() for k, v in cm.store.state_dict().items()})
    x = case.inputs(dtype=dtype)
    out = output(cm, x)
    assert out.dtype == dtype
    expected = output(reference, case.inputs())
    scale = expected.detach().abs().max()
    assert (out.float() - expected).abs().max() <= 0.05 * scale
    if has_peft(case) and not hasattr(card(case.cls), "peft_base"):
        cm.save_adapters(tmp_path)
        pm = peft_load(tmp_path, case.entry.model().to(dtype))
        pairs = (
            paired_parameters(cm.store, pm, False) if case.spec().file_holds_trained_form else []
        )
        for name, mine, their_name, theirs in pairs:
            assert mine.dtype == theirs.dtype, f"{name}: {mine.dtype}, {their_name}: {theirs.dtype}"
        tolerance = 2 * torch.finfo(dtype).eps * max(1.0, float(scale))
        torch.testing.assert_close(out, output(pm, x), rtol=0, atol=tolerance)
    train_step(cm, x)
    assert any(p.grad is not None for p in cm.store.parameters())


# -- export -----------------------------------------------------------------------------------------


def _exported(case: Case) -> bool:
    return is_layer_method(case)


def _export_cases() -> list:
    """The default lane exports the first example of the first method of each family (a
    family's methods share their merge and lowering code); ``-m slow`` exports every example of
    every method. Every method's lowering is checked in the lane without onnx
    (`test_lowering_runs_the_base_forward_with_the_adapters_folded_in`)."""
    exported, families = [], set()
    for param in cases(_exported, first_model=True):
        (case,) = param.values
        first_of_family = (
            case.example == first_example(case.cls) and family(case.cls) not in families
        )
        families.add(family(case.cls))
        marks = [] if first_of_family else [pytest.mark.slow]
        exported.append(pytest.param(case, id=param.id, marks=[*param.marks, *marks]))
    return exported


@pytest.mark.parametrize("case", methods(_exported))
def test_lowering_runs_the_base_forward_with_the_adapters_folded_in(case: Case):
    """What export sees: the plain model's forward (no adapter node runs) with the merged
    outputs; after it, the compiled model is as it was."""
    cm = case.compile().eval()
    x = case.inputs()
    if case.cls.merge_refusal is not None:

        def lower() -> None:
            with lowered(cm):
                pass

        _assert_refused_without_change(cm, x, lower, "cannot export adapter 'default'")
        return
    expected = output(cm, x)
    ran = []
    with lowered(cm) as model:  # merging may run the adapter's own modules: not counted
        hooks = [m.register_forward_hook(lambda m, *_: ran.append(m)) for m in cm.store.modules()]
        try:
            folded = output(model, x)
        finally:
            for hook in hooks:
                hook.remove()
    assert not ran, "an adapter module ran in the lowered model"
    torch.testing.assert_close(folded, expected, **EXACT)
    torch.testing.assert_close(output(cm, x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", _export_cases())
def test_the_merged_model_exports_to_onnx_verified(case: Case, tmp_path):
    cm = case.compile().eval()
    x = case.inputs()
    if case.cls.merge_refusal is not None:

        def export() -> None:
            surgeon.export_onnx(cm, tmp_path / "model.onnx", x, verify=True)

        _assert_refused_without_change(cm, x, export, "cannot export adapter 'default'")
        assert not any(tmp_path.iterdir())
        return
    expected = output(cm, x)
    report = surgeon.export_onnx(cm, tmp_path / "model.onnx", x, verify=True)
    assert report.max_abs_diff < 1e-5
    torch.testing.assert_close(output(cm, x), expected)  # the compiled model is left as it was


# -- several adapters ---------------------------------------------------------------------------------


def _two_adapters(case: Case) -> surgeon.CompiledModel:
    cm = surgeon.compile(case.entry.model(), surgeon.Spec({"a": case.spec(), "b": case.spec()}))
    perturb(cm, seed=3)
    return cm.eval()


@pytest.mark.parametrize("case", cases(first_model=True))
def test_several_adapters_active_on_one_layer(case: Case, tmp_path):
    """Both adapters apply (stacked input transforms chain): as PEFT with both active, and the
    merged model equals the unmerged one. A method acting on the model call refuses two."""
    if not is_layer_method(case):
        cm = surgeon.compile(case.entry.model(), case.spec(), name="a")
        cm.add_adapter("b", case.spec())
        with pytest.raises(surgeon.SpecError, match="only one of them"):
            cm.set_active(["a", "b"])
        return
    cm = _two_adapters(case)
    x = case.inputs()
    cm.set_active(["a"])
    only_a = output(cm, x)
    cm.set_active(["a", "b"])
    if not case.cls.stacks:
        with pytest.raises(surgeon.SpecError, match=r"'a'.*'b'"):  # naming both
            output(cm, x)
        return
    both = output(cm, x)
    _assert_changed(both, only_a)
    if has_peft(case):
        cm.save_adapters(tmp_path)
        pm = peft_load(tmp_path / "a", peft_base(case, cm), adapter_name="a")
        pm.load_adapter(tmp_path / "b", adapter_name="b")
        pm.base_model.set_adapter(["a", "b"])
        if getattr(card(case.cls), "PEFT_FORWARD_RUNS_FIRST_ACTIVE_ONLY", False):
            pm.base_model.merge_adapter(["a", "b"])  # its merge folds in both
        torch.testing.assert_close(both, output(pm, x), **EXACT)
    if case.cls.merge_refusal is not None:
        return  # merging is refused (test_merge_equals_...)
    cm.merge()
    torch.testing.assert_close(output(cm, x), both, **EXACT)
    cm.unmerge()
    torch.testing.assert_close(output(cm, x), both, **EXACT)


@pytest.mark.parametrize("case", cases(first_model=True))
def test_a_mixed_batch_gives_each_row_its_adapter(case: Case):
    """Two adapters and the base model in one batch; a method acting on the model call takes
    part with its rows and the base model's where it serves mixed batches (X-LoRA; its mixes
    with layer adapters are the card's), and is refused otherwise (prompt methods)."""
    x = case.inputs()
    rows = next(iter(x.values())).shape[0]
    if is_layer_method(case):
        cm = _two_adapters(case)
        names = (["a", "b", "__base__"] * rows)[:rows]
    else:
        cm = surgeon.compile(case.entry.model(), case.spec(), name="a")
        if not cm.store.calls["a"].serves_mixed_batches:
            with pytest.raises(surgeon.SpecError, match="mixed batches"):
                cm(**x, adapter_names=["a"] * rows)
            return
        perturb(cm, seed=3)
        cm.eval()
        names = (["a", "__base__"] * rows)[:rows]
    mixed = output(cm, {**x, "adapter_names": names})
    for name in set(names):
        # each adapter's rows as a batch of their own: a router that mixes over the batch
        # (Lily) sees the same rows either way
        mine = torch.tensor([i for i, n in enumerate(names) if n == name])
        alone = {k: v[mine] for k, v in x.items()}
        if name == "__base__":
            with cm.disabled():
                expected = output(cm, alone)
        else:
            cm.set_active(name)
            expected = output(cm, alone)
        torch.testing.assert_close(mixed[mine], expected, **EXACT)
