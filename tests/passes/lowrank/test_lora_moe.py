"""LoRA on transformers' mixture-of-experts models (Mixtral, Qwen3-MoE, gpt-oss), traced whole.

Their experts multiply by ``torch._grouped_mm`` in the model's dtype; surgeon's traces evaluate
that op by a fake implementation that accepts what the kernel accepts (torch's own takes bf16
only), so the whole model is one specialised graph in float32 and bfloat16 alike. LoRA on the
experts' raw 3-D parameters (PEFT's ``target_parameters``, `passes/lowrank/lora_parameters.py`)
loads and saves PEFT's files, computes and trains as PEFT, merges into the parameters, and
refuses what PEFT refuses; the whole model still traces as one graph.
"""

import copy
import json

import pytest
import torch
from test_quiet import tiny_gpt_oss, tiny_mixtral, tiny_qwen3_moe
from torch._subclasses.fake_tensor import FakeTensorMode
from zoo import padded_ids, peft_loaded, peft_model, randomize

import surgeon
from surgeon.errors import SpecError
from surgeon.specialise import _grouped_mm_fake

ATTENTION = ("q_proj", "v_proj")


def _moe(build, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny model of the family: 2 layers, 4 experts, hidden size 32."""
    torch.manual_seed(0)
    return build(layers=2).to(dtype).eval()


# -- the fake grouped matmul ------------------------------------------------------------------


def _operands(layout: str, dtype: torch.dtype) -> tuple:
    """Operands of ``torch._grouped_mm`` in one layout (int32 offsets unless said otherwise)."""
    offs = torch.tensor([2, 4, 8], dtype=torch.int32)
    a2, a3 = torch.randn(8, 16, dtype=dtype), torch.randn(3, 8, 16, dtype=dtype)
    b3 = torch.randn(3, 16, 8, dtype=dtype)
    return {
        "2d-3d": (a2, b3, offs),
        "2d-3d-transposed": (a2, torch.randn(3, 8, 16, dtype=dtype).transpose(-2, -1), offs),
        "3d-3d": (a3, b3, None),
        "2d-2d": (torch.randn(16, 8, dtype=dtype), torch.randn(8, 16, dtype=dtype), offs),
        "3d-2d": (a3, torch.randn(16, 8, dtype=dtype), torch.tensor([16] * 3, dtype=torch.int32)),
        "unaligned": (a2, torch.randn(3, 16, 5, dtype=dtype), offs),
        "int64-offsets": (a2, b3, offs.long()),
        "no-offsets": (a2, b3, None),
        "mixed-dtypes": (a2, b3.float() if dtype != torch.float32 else b3.half(), offs),
    }[layout]


def _outcome(fn, *args) -> tuple | str:
    try:
        out = fn(*args)
    except RuntimeError:
        return "refused"
    return tuple(out.shape), out.dtype


LAYOUTS = ["2d-3d", "2d-3d-transposed", "3d-3d", "2d-2d", "3d-2d", "unaligned",
           "int64-offsets", "no-offsets", "mixed-dtypes"]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_fake_grouped_mm_accepts_what_the_kernel_accepts(dtype):
    for layout in LAYOUTS:
        a, b, offs = _operands(layout, dtype)
        real = _outcome(lambda a, b, o: torch._grouped_mm(a, b, offs=o), a, b, offs)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fakes = [None if t is None else mode.from_tensor(t) for t in (a, b, offs)]
            fake = _outcome(_grouped_mm_fake, *fakes)
        assert fake == real, (layout, dtype)


# -- traced whole -----------------------------------------------------------------------------


def _traced_and_per_layer(build, dtype: torch.dtype) -> tuple:
    """The same LoRA on one model traced whole and on a copy that runs the modules' own
    forwards (``specialise=False``: only the adapted layers are graphs)."""
    model = _moe(build, dtype)
    spec = surgeon.LoRA(rank=4, targets=ATTENTION)
    per_layer = surgeon.compile(copy.deepcopy(model), spec, specialise=False)
    traced = surgeon.compile(model, spec)
    for cm in (traced, per_layer):
        randomize(cm)
    return traced, per_layer


@pytest.mark.parametrize(
    "build, dtype",
    [
        (tiny_mixtral, torch.float32),
        pytest.param(tiny_qwen3_moe, torch.float32, marks=pytest.mark.slow),
        pytest.param(tiny_gpt_oss, torch.float32, marks=pytest.mark.slow),
        pytest.param(tiny_mixtral, torch.bfloat16, marks=pytest.mark.slow),
        pytest.param(tiny_qwen3_moe, torch.bfloat16, marks=pytest.mark.slow),
        pytest.param(tiny_gpt_oss, torch.bfloat16, marks=pytest.mark.slow),
    ],
)
def test_the_whole_graph_computes_and_trains_as_the_modules_own_forwards(build, dtype):
    traced, per_layer = _traced_and_per_layer(build, dtype)
    inputs = padded_ids(batch=2, length=5)
    tolerance = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    with torch.no_grad():
        torch.testing.assert_close(traced(**inputs).logits, per_layer(**inputs).logits, **tolerance)
    assert [r.path for r in traced.graph.live()] == [""] and traced.inspect().refused == []
    grads = []
    for cm in (traced, per_layer):
        cm.train()
        cm(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in cm.store.named_parameters()})
    assert traced.inspect().refused == []  # the training kind of call traced too
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], **tolerance, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("build", [tiny_mixtral, tiny_qwen3_moe, tiny_gpt_oss])
def test_peft_attention_lora_on_a_mixture_of_experts_loads_both_ways_traced_whole(build, tmp_path):
    import peft

    inputs = padded_ids(batch=2, length=5)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(ATTENTION))
    pm = peft_model(_moe(build), config)
    with torch.no_grad():
        expected = pm(**inputs).logits
    pm.save_pretrained(tmp_path / "peft")
    ours = surgeon.load(_moe(build), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, expected)
    assert [r.path for r in ours.graph.live()] == [""] and ours.inspect().refused == []
    ours.save_adapters(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(
            peft_loaded(_moe(build), tmp_path / "ours")(**inputs).logits, expected
        )


# -- LoRA on raw parameters (PEFT's target_parameters) ----------------------------------------

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _peft_side(build, tmp_path, **options) -> tuple:
    """PEFT's model with LoRA on both expert parameters (perturbed), saved under tmp_path."""
    import peft

    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=[], target_parameters=EXPERTS, **options
    )
    pm = peft_model(_moe(build), config)
    pm.save_pretrained(tmp_path / "peft")
    return pm, tmp_path / "peft"


def _grads_by_key(named: dict) -> dict:
    return {k: p.grad for k, p in named.items()}


def _our_factors(cm) -> dict:
    """Our factors under PEFT's keys (without the adapter name)."""
    out = {}
    for path, layer in cm.store.items("default"):
        for key, param in layer.peft_tensors_to_save().items():
            out[f"{path}.{key}"] = param
    return out


def _peft_factors(pm) -> dict:
    return {
        n.removeprefix("base_model.model.").replace(".default", ""): p
        for n, p in pm.named_parameters()
        if "lora_" in n
    }


@pytest.mark.parametrize(
    "build",
    [
        tiny_mixtral,
        pytest.param(tiny_qwen3_moe, marks=pytest.mark.slow),
        pytest.param(tiny_gpt_oss, marks=pytest.mark.slow),
    ],
)
def test_target_parameters_match_peft_both_ways_traced_whole_and_train_alike(build, tmp_path):
    from safetensors.torch import load_file

    inputs = padded_ids(batch=2, length=5)
    pm, saved = _peft_side(build, tmp_path)
    with torch.no_grad():
        expected = pm(**inputs).logits
        assert not torch.allclose(expected, _moe(build)(**inputs).logits)  # the adapter acts
    ours = surgeon.load(_moe(build), saved).eval()
    assert sorted(ours.store.specs["default"].target_parameters) == sorted(EXPERTS)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, expected)
    assert [r.path for r in ours.graph.live()] == [""] and ours.inspect().refused == []
    ours.save_adapters(tmp_path / "ours")
    theirs = load_file(saved / "adapter_model.safetensors")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys()
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in mine
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], msg=key)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(EXPERTS) and config["target_modules"] == []
    with torch.no_grad():
        torch.testing.assert_close(
            peft_loaded(_moe(build), tmp_path / "ours")(**inputs).logits, expected
        )
    # one train step's gradients, factor by factor
    for model in (pm, ours):
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert ours.inspect().refused == []
    peft_grads, our_grads = _grads_by_key(_peft_factors(pm)), _grads_by_key(_our_factors(ours))
    assert our_grads.keys() == peft_grads.keys()
    for key, grad in peft_grads.items():
        torch.testing.assert_close(our_grads[key], grad, msg=key)


@pytest.mark.slow
def test_target_parameters_merge_into_the_parameters_as_peft_and_generate(tmp_path):
    inputs = padded_ids(batch=2, length=5)
    pm, saved = _peft_side(tiny_mixtral, tmp_path)
    ours = surgeon.load(_moe(tiny_mixtral), saved).eval()
    with torch.no_grad():
        expected = ours(**inputs).logits
        ours.merge()
        torch.testing.assert_close(ours(**inputs).logits, expected)
        ours.unmerge()
        torch.testing.assert_close(ours(**inputs).logits, expected)
    generated = ours.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 8)
    merged = ours.merge_and_unload()
    peft_merged = pm.merge_and_unload()
    for name in ("gate_up_proj", "down_proj"):
        torch.testing.assert_close(
            getattr(merged.model.layers[1].mlp.experts, name),
            getattr(peft_merged.model.layers[1].mlp.experts, name),
            msg=name,
        )


def test_target_parameters_alone_on_one_parameter_and_with_targets():
    """``targets=()`` adapts only the parameters; named with targets, both act."""
    model = _moe(tiny_mixtral)
    cm = surgeon.compile(model, surgeon.LoRA(rank=2, targets=(), target_parameters=EXPERTS[:1]))
    layers = dict(cm.store.items("default"))
    assert list(layers) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert list(layers["model.layers.0.mlp.experts"].peft_tensors_to_save()) == [
        "lora_A.weight",
        "lora_B.weight",
    ]
    both = surgeon.LoRA(rank=2, targets=ATTENTION, target_parameters=EXPERTS)
    assert len(both.select(_moe(tiny_mixtral))) == 6


@pytest.mark.parametrize(
    "options, refused",
    [
        ({"dropout": 0.1}, "dropout"),
        ({"lora_bias": True}, "lora_bias"),
        ({"init": "pissa"}, "init"),
        ({"target_parameters": "mlp.experts.down_proj"}, "list of parameter names"),
    ],
)
def test_what_peft_refuses_with_target_parameters_is_a_spec_error(options, refused):
    spec = {"rank": 2, "targets": (), "target_parameters": EXPERTS, **options}
    with pytest.raises(SpecError, match=refused):
        surgeon.LoRA(**spec)


def test_a_variant_with_target_parameters_and_unmatched_names_are_refused():
    with pytest.raises(SpecError, match="variant"):
        surgeon.DoRA(rank=2, targets=(), target_parameters=EXPERTS)
    spec = surgeon.LoRA(rank=2, targets=(), target_parameters=["mlp.experts.nothing"])
    with pytest.raises(SpecError, match="matches no parameter"):
        surgeon.compile(_moe(tiny_mixtral), spec)


@pytest.mark.slow
def test_target_parameters_refuse_mixed_batches_and_stack_as_peft(tmp_path):
    inputs = padded_ids(batch=2, length=5)
    spec = surgeon.LoRA(rank=2, targets=(), target_parameters=EXPERTS)
    cm = surgeon.compile(_moe(tiny_mixtral), spec)
    cm.add_adapter("other", spec)
    randomize(cm)
    with torch.no_grad(), pytest.raises(SpecError, match="mixed batches"):
        cm(**inputs, adapter_names=["default", "other"])
    with torch.no_grad():
        cm.set_active(["default", "other"])
        stacked = cm(**inputs).logits
        cm.merge()
        torch.testing.assert_close(cm(**inputs).logits, stacked)
