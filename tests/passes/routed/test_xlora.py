"""X-LoRA's card: the formula (two passes, classifier, top-k), PEFT parity on a Llama whose
experts PEFT can load, files both ways, the errors."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import add_noise, tiny_llama

import surgeon
from surgeon.io import WEIGHTS_NAME, read_safetensors
from surgeon.passes.routed.xlora import LORA_MODEL, XLoRA, write_seeded_expert

X = {"input_ids": torch.tensor([[5, 9, 33, 70, 12, 3, 44], [8, 90, 17, 6, 61, 27, 4]])}


def peft_base(model: nn.Module, compiled: Any) -> nn.Module:
    """PEFT's X-LoRA refuses a model whose config has use_cache on (the zoo's)."""
    model.config.use_cache = False
    return model


def peft_cannot(spec: XLoRA, model_name: str) -> str:
    return (
        "PEFT 0.21's X-LoRA cannot load the examples' experts: its key rework assumes every "
        "adapted module under `model.` (lm_head and GPT-2's transformer are not), and its save "
        "drops the classifier keys holding '.<expert index>.'; the card checks parity on a "
        "Llama's attention experts instead"
    )


def formula(spec: XLoRA, adapter: surgeon.CompiledModel, base: nn.Module, x: dict) -> torch.Tensor:
    """X-LoRA's two passes with hooks on the plain model: experts scaled by ``s`` added to each
    gated layer's output; ``adapter`` is the compiled model holding the experts and classifier."""
    ((_, call),) = adapter.store.calls.items()
    gated = dict(adapter.store.items("default"))
    paths = list(gated)

    def run(scalings: torch.Tensor, **extra: Any) -> Any:
        def hook(path: str):
            def add(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
                s = scalings[:, :, paths.index(path), :]
                if spec.top_k is not None:
                    top = s.topk(spec.top_k, dim=-1).indices
                    s = s * torch.zeros_like(s).scatter(-1, top, 1.0)
                if spec.softmax_topk:
                    s = torch.where(s != 0, s, float("-inf")).softmax(-1).nan_to_num(0.0)
                    s = torch.where(scalings[:, :, paths.index(path), :] * 0 + s != 0, s, 0.0)
                for i, expert in gated[path].experts.items():
                    xi = inputs[0] * s[..., int(i) : int(i) + 1]
                    delta = F.linear(F.linear(xi, expert.lora_A), expert.lora_B)
                    out = out + delta * expert.scale * spec.global_weight
                return out

            return add

        handles = [base.get_submodule(p).register_forward_hook(hook(p)) for p in paths]
        try:
            return base(**x, **extra)
        finally:
            for h in handles:
                h.remove()

    batch, length = x["input_ids"].shape
    shape = (batch, length, len(paths), len(spec.experts))
    with torch.no_grad():
        hidden = run(torch.full(shape, spec.scaling_pass_value), output_hidden_states=True)
    logits = call.classifier.layers(hidden.hidden_states[-1])
    if not spec.layerwise:
        logits = logits.unsqueeze(2).expand(-1, -1, len(paths), -1)
    scalings = logits.reshape(shape)
    if spec.softmax:
        scalings = (scalings / spec.temperature).softmax(-1)
    return run(scalings).logits


ATTENTION = {
    f"model.layers.{i}.self_attn.{name}": shape
    for i in range(2)
    for name, shape in (("q_proj", (32, 32)), ("v_proj", (32, 16)))
}


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> tuple[str, ...]:
    """Two seeded LoRA experts in PEFT folders, written once for the module: the first on the
    Llama's q_proj and v_proj, the second on q_proj only (so some layers lack an expert)."""
    root = tmp_path_factory.mktemp("experts")
    q_only = {path: shape for path, shape in ATTENTION.items() if "q_proj" in path}
    write_seeded_expert(root / "e0", ATTENTION, rank=2, alpha=4.0, seed=10)
    write_seeded_expert(root / "e1", q_only, rank=3, alpha=3.0, seed=11)
    return (str(root / "e0"), str(root / "e1"))


def _llama() -> nn.Module:
    torch.manual_seed(0)
    model = tiny_llama().eval()
    model.config.use_cache = False
    return model


def _ours(spec: XLoRA) -> surgeon.CompiledModel:
    """Our X-LoRA with its classifier and its experts perturbed (the experts no longer hold
    their folders' values: files and PEFT must get them from the adapter)."""
    cm = surgeon.compile(_llama(), spec).eval()
    add_noise(cm.store.parameters(), seed=3, scale=0.3)
    return cm


def _peft(spec: XLoRA, ours: surgeon.CompiledModel) -> Any:
    """PEFT's X-LoRA on the same expert folders, set to our adapter's state dict (classifier
    and experts: every key of ours is one of PEFT's model)."""
    import peft

    config = {**spec.to_peft_config(()), "hidden_size": 32, "task_type": "CAUSAL_LM"}
    config.pop("modules_to_save")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_llama(), peft.get_peft_config(config)).eval()
    result = peft.set_peft_model_state_dict(pm, ours.adapter_state_dict())
    assert not result.unexpected_keys
    adapter_keys = (".lora_A.", ".lora_B.", ".lora_embedding_", "internal_xlora_classifier")
    assert not [k for k in result.missing_keys if any(a in k for a in adapter_keys)]
    return pm


OPTIONS = {
    "default": {},
    "deep-layerwise-topk-softmax": dict(
        depth=3,
        size=8,
        dropout=0.0,
        layerwise=True,
        top_k=1,
        softmax_topk=True,
        softmax=False,
        scaling_pass_value=0.5,
        global_weight=0.7,
    ),
    "temperature-topk": dict(temperature=0.5, top_k=1),
}


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(
            o, id=k, marks=[] if k == "deep-layerwise-topk-softmax" else [pytest.mark.slow]
        )
        for k, o in OPTIONS.items()
    ],
)
def test_the_output_is_the_formula_and_peft_in_two_passes(options, experts):
    spec = XLoRA(experts=experts, **options)
    cm = _ours(spec)
    calls = []
    handle = cm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    got = cm(**X).logits
    handle.remove()
    assert len(calls) == 2  # the scaling pass, then the real one
    assert "layer_scalings" in cm.graph.code()  # each gated layer reads the call's scalings
    torch.testing.assert_close(got, formula(spec, cm, _llama(), X), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, _peft(spec, cm)(**X).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_classifier_gradients_are_peft(experts):
    spec = XLoRA(experts=experts, layerwise=True)
    cm = _ours(spec)
    pm = _peft(spec, cm)
    for model in (cm, pm):
        model.train()
        torch.manual_seed(7)  # the same classifier dropout masks in both
        model(**X).logits.pow(2).mean().backward()
    theirs = dict(pm.base_model.internal_xlora_classifier.named_parameters())
    ours = dict(cm.store.calls["default"].classifier.named_parameters())
    assert [n for n, p in cm.named_parameters() if p.requires_grad] == [
        f"store.calls.default.classifier.{n}" for n in ours
    ]
    for name, param in ours.items():
        torch.testing.assert_close(param.grad, theirs[name].grad, rtol=1e-4, atol=1e-6)


def test_the_file_holds_the_experts_and_peft_loads_it(experts, tmp_path):
    """Experts changed since their folders were written: the saved file carries them, and
    both loads (ours, PEFT's) give the saved model's outputs."""
    spec = XLoRA(experts=experts, depth=2, size=8)
    cm = _ours(spec)
    cm.save_adapters(tmp_path / "x")
    expected = cm(**X).logits
    loaded = surgeon.load(_llama(), tmp_path / "x").eval()
    torch.testing.assert_close(loaded(**X).logits, expected, rtol=0, atol=0)
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(_llama(), tmp_path / "x").eval()
    torch.testing.assert_close(pm(**X).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_file_without_the_experts_takes_them_from_their_folders(experts, tmp_path):
    """PEFT's layout (the classifier alone): the experts are their folders', as PEFT loads."""
    from safetensors.torch import save_file

    spec = XLoRA(experts=experts)
    cm = surgeon.compile(_llama(), spec).eval()
    add_noise(cm.store.calls.parameters(), seed=3, scale=0.3)
    cm.save_adapters(tmp_path)
    tensors = read_safetensors(tmp_path / WEIGHTS_NAME)
    assert any(k.startswith(LORA_MODEL) for k in tensors)
    classifier = {k: v for k, v in tensors.items() if not k.startswith(LORA_MODEL)}
    save_file(classifier, str(tmp_path / WEIGHTS_NAME))
    loaded = surgeon.load(_llama(), tmp_path).eval()
    torch.testing.assert_close(loaded(**X).logits, cm(**X).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_a_peft_file_missing_classifier_layers_is_refused(experts, tmp_path):
    """PEFT 0.21 saves the classifier without its keys holding '.0.', '.1.', ... (its filter
    for the experts' names): loading would leave those layers random, so it is refused."""
    spec = XLoRA(experts=experts)
    pm = _peft(spec, _ours(spec))
    pm.save_pretrained(tmp_path / "x")
    with pytest.raises(
        surgeon.SpecError, match=r"missing key.*internal_xlora_classifier\.layers\.0"
    ):
        surgeon.load(_llama(), tmp_path / "x")


@pytest.mark.slow
def test_the_same_seed_gives_the_same_model(experts):
    """Nothing but the seed decides the classifier's draws and the dropout masks."""
    spec = XLoRA(experts=experts, depth=2, size=8, dropout=0.5)
    outputs = []
    for _ in range(2):
        cm = surgeon.compile(_llama(), spec).train()
        torch.manual_seed(1)
        outputs.append(cm(**X).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_errors(experts, tmp_path):
    with pytest.raises(surgeon.SpecError, match="top_k=3: there are only 2 experts"):
        XLoRA(experts=experts, top_k=3)
    with pytest.raises(surgeon.SpecError, match="experts"):
        XLoRA(experts=())
    config = {**XLoRA(experts=experts).to_peft_config(()), "adapters": {"a": experts[0]}}
    with pytest.raises(surgeon.SpecError, match="named '0', '1'"):
        XLoRA.from_peft_config(config, "adapter_config.json")
    cm = surgeon.compile(_llama(), XLoRA(experts=experts))
    for merge in (cm.merge, lambda: cm.merge(["default"]), cm.merge_and_unload):
        with pytest.raises(surgeon.SpecError, match="cannot merge adapter 'default'"):
            merge()
    with pytest.raises(surgeon.SpecError, match="cannot export adapter 'default'"):
        surgeon.export_onnx(cm, tmp_path / "model.onnx", X)
    assert not cm.merged and not any(tmp_path.iterdir())
    cm.add_adapter("other", XLoRA(experts=experts))
    with pytest.raises(surgeon.SpecError, match="only one of them"):
        cm.set_active(["default", "other"])
    with pytest.raises(surgeon.SpecError, match="use_cache=False"):
        cm.generate(**X, max_new_tokens=2, do_sample=False, use_cache=True)


def test_a_mixed_batch_of_xlora_lora_and_base_rows_gives_each_row_its_own_result(experts):
    cm = _ours(XLoRA(experts=experts))
    cm.add_adapter("lora", surgeon.LoRA(rank=2, targets=("q_proj", "v_proj")))
    add_noise([p for n, p in cm.named_parameters() if "lora" in n and p.requires_grad], seed=4)
    rows = torch.cat([X["input_ids"], X["input_ids"].flip(1)])
    names = ["default", "lora", "__base__", "default"]
    mixed = cm(input_ids=rows, adapter_names=names).logits
    for name in set(names):
        mine = [i for i, n in enumerate(names) if n == name]
        if name == "__base__":
            with cm.disabled():
                alone = cm(input_ids=rows[mine]).logits
        else:
            cm.set_active(name)
            alone = cm(input_ids=rows[mine]).logits
        torch.testing.assert_close(mixed[mine], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(surgeon.SpecError, match="mixed batches take one of them"):
        cm.add_adapter("other", XLoRA(experts=experts))
        cm(input_ids=rows, adapter_names=["default", "other", "lora", "__base__"])
