"""QLoRA's card (its formula, and the bases PEFT's side and ours run on) and what is QLoRA's own:
4-bit bases (bitsandbytes' bytes), LoRA in the compute dtype, PEFT + bitsandbytes parity, merging
into and out of 4 bits, 4-bit layers on the meta device, spec checks. The conformance suite
(tests/conformance) runs the formula, merging, files, PEFT parity, gradients, devices and dtypes on
every example."""

from __future__ import annotations

import copy
import gc
import json
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import (
    ZOO,
    One,
    assert_lora_a_grads_match_peft,
    bnb_llama,
    llama64,
    logits,
    peft_loaded,
    peft_model,
    randomize,
)

import surgeon
from surgeon import quant


def formula(spec, adapter, base, x):
    """QLoRA (Dettmers et al., 2023): the 4-bit weight dequantized into the compute dtype, the
    layer and LoRA computed in that dtype, each brought back to the input's dtype and added."""
    dtype = spec.quant.dtype
    a, b = adapter.lora_A, adapter.lora_B
    r = a.shape[0]
    scale = spec.alpha_pattern.get("layer", spec.alpha) / (math.sqrt(r) if spec.rslora else r)
    h = x.to(dtype)
    bias = base.bias.to(dtype) if base.bias is not None else None
    layer = F.linear(h, base.dequantize(dtype), bias)
    low = scale * (h @ a.t().to(dtype) @ b.t().to(dtype))
    return layer.to(x.dtype) + low.to(x.dtype)


def peft_base(model, compiled):
    """PEFT's side of a parity check: LoRA on the same model holding our 4-bit weights
    dequantized (PEFT with bitsandbytes is compared below)."""
    with torch.no_grad():
        for path, layer in compiled.model.named_modules():
            if quant.is_quantized(layer):
                target = model.get_submodule(path)
                weight = layer.dequantize(torch.float32)
                target.weight.copy_(weight if isinstance(target, nn.Linear) else weight.t())
    return model


def our_base(model, spec):
    """A model stored in 4 bits as ``spec`` stores it: a PEFT LoRA file loads onto it as QLoRA."""
    for path in spec.quantized_paths(model, spec.select(model)):
        quant.quantize_linear(model.get_submodule(path), spec.quant)
    return model


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _ids(seed=1):
    return torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(seed))


def _fp32(**kwargs):
    return surgeon.QLoRA(quant=surgeon.NF4(compute_dtype="float32"), **kwargs)


# -- the formula, per compute dtype ----------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_output_is_dequantized_matmul_plus_lora_in_the_compute_dtype(compute_dtype, quant_type):
    torch.manual_seed(0)
    layer = nn.Linear(70, 33)
    model = One(layer)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    spec = surgeon.NF4(compute_dtype=compute_dtype, quant_type=quant_type)
    cm = surgeon.compile(model, surgeon.QLoRA(rank=4, alpha=8, targets=("layer",), quant=spec))
    randomize(cm, scale=0.2)
    ((_, adapter),) = cm.store.items("default")
    assert adapter.lora_A.dtype == spec.dtype and adapter.lora_A.requires_grad
    dt = spec.dtype
    w = quant.quantize_4bit(weight, 64, quant_type).dequantize(dt)
    x = torch.randn(5, 70)
    xc = x.to(dt)
    expected = (
        F.linear(xc, w, bias.to(dt)).float()
        + (F.linear(F.linear(xc, adapter.lora_A) * 2.0, adapter.lora_B)).float()
    )
    out = cm(x)
    assert out.dtype == torch.float32
    tol = 1e-6 if dt == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def test_bases_are_stored_packed_and_the_full_precision_weights_are_gone():
    model = llama64()  # the statistics' fixed 8 bytes per layer weigh too much on 32 x 16
    refs = {n: weakref.ref(p) for n, p in model.named_parameters() if n.endswith("proj.weight")}
    count = sum(p.numel() for p in model.parameters())
    cm = surgeon.compile(model, surgeon.QLoRA())
    assert cm.num_parameters() == count + cm.num_trainable()  # 4-bit weights count as weights
    gc.collect()
    assert all(r() is None for r in refs.values()), [n for n, r in refs.items() if r()]
    linears = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    stored = {p for p, m in linears.items() if quant.is_quantized(m)}
    assert stored == set(linears) - {"lm_head"}  # every linear but the output head
    for path in stored:
        layer = linears[path]
        assert layer.weight.dtype == torch.uint8
        assert layer.storage_bytes() / (layer.in_features * layer.out_features) <= 0.53
    assert cm.num_trainable() == sum(p.numel() for p in cm.store.parameters())


def test_quantize_targets_only_and_selectors():
    model = ZOO["llama"].model()
    surgeon.compile(model, surgeon.QLoRA(targets=("q_proj",), quantize="targets"))
    stored = [p for p, m in model.named_modules() if quant.is_quantized(m)]
    assert stored == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    model = ZOO["llama"].model()
    surgeon.compile(model, surgeon.QLoRA(targets=("q_proj",), quantize=("down_proj",)))
    assert sum(quant.is_quantized(m) for m in model.modules()) == 4
    with pytest.raises(surgeon.SpecError, match=r"QLoRA\.quantize='embed_tokens' selects no layer"):
        surgeon.compile(ZOO["llama"].model(), surgeon.QLoRA(quantize="embed_tokens"))


def test_graph_shows_the_dequantize_and_the_matmul():
    cm = surgeon.compile(ZOO["llama"].model(), surgeon.QLoRA())
    code = cm.graph.code("model.layers.0.self_attn.q_proj")
    assert "surgeon_quant_dequantize_absmax(" in code
    assert (
        "surgeon_quant_dequantize_4bit(" in code and "(32, 32), 64, 'nf4', torch.bfloat16" in code
    )
    assert "surgeon_quant_linear_4bit(" in code
    assert "self.base(" not in code  # the layer's call is spelled out, not called
    cm.graph.check()
    nodes = cm.graph.to_networkx().nodes(data=True)
    assert any(d["target"] == "dequantize_4bit" and d["method"] == "qlora" for _, d in nodes)


# -- training ---------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = llama64()
        cm = surgeon.compile(model, _fp32(dropout=0.0))
        randomize(cm)
        cm.train()
        if checkpointing:
            cm.gradient_checkpointing_enable()
            assert model.model.gradient_checkpointing
        cm(input_ids=_ids(), labels=_ids()).loss.backward()
        grads.append({n: p.grad.clone() for n, p in cm.store.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_bias_all_trains_the_4bit_layers_bias():
    torch.manual_seed(0)
    model = One(nn.Linear(64, 16))
    cm = surgeon.compile(model, _fp32(targets=("layer",), bias="all"))
    cm(torch.randn(3, 64)).square().sum().backward()
    assert model.layer.bias.grad is not None and model.layer.weight.grad is None


# -- PEFT + bitsandbytes -----------------------------------------------------------------------------------

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


@pytest.fixture
def peft_and_surgeon():
    """PEFT's QLoRA (LoRA on bitsandbytes Linear4bit) and surgeon's, with the same LoRA weights."""

    def build(compute_dtype=torch.float32, rank=8):
        state = copy.deepcopy(llama64().state_dict())
        config = peft.LoraConfig(r=rank, lora_alpha=16, target_modules=list(ATTENTION))
        theirs = peft_model(bnb_llama(state, compute_dtype), config, seed=None)
        assert isinstance(
            theirs.base_model.model.model.layers[0].self_attn.q_proj,
            peft.tuners.lora.bnb.Linear4bit,
        )
        ours_model = llama64()
        ours_model.load_state_dict(state)
        name = str(compute_dtype).removeprefix("torch.")
        ours = surgeon.compile(
            ours_model, surgeon.QLoRA(rank=rank, quant=surgeon.NF4(compute_dtype=name))
        ).eval()
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            lora = {n: p for n, p in theirs.named_parameters() if "lora_" in n}
            for p in lora.values():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            for path, layer in ours.store.items("default"):
                prefix = f"base_model.model.{path}"
                layer.lora_A.copy_(lora[f"{prefix}.lora_A.default.weight"])
                layer.lora_B.copy_(lora[f"{prefix}.lora_B.default.weight"])
        return theirs, ours

    return build


def test_same_4bit_bytes_as_bitsandbytes_layers(peft_and_surgeon):
    theirs, ours = peft_and_surgeon()
    for path, layer in ours.model.named_modules():
        if quant.is_quantized(layer):
            other = theirs.base_model.model.get_submodule(path)
            other = getattr(other, "base_layer", other)
            assert torch.equal(layer.weight.view(-1), other.weight.view(-1)), path
            assert torch.equal(layer.absmax, other.weight.quant_state.absmax), path


def test_outputs_and_gradients_match_peft_with_bitsandbytes(peft_and_surgeon):
    theirs, ours = peft_and_surgeon(torch.float32)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=1e-5
        )
    assert_lora_a_grads_match_peft(ours, theirs, ids)


def test_bfloat16_compute_is_close_to_peft(peft_and_surgeon):
    theirs, ours = peft_and_surgeon(torch.bfloat16)
    ids = _ids()
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    # PEFT keeps LoRA in float32 (autocast_adapter_dtype), QLoRA here in bfloat16
    assert (a - b).abs().max() < 0.02 * b.abs().max()


def test_saved_adapter_is_a_peft_lora_adapter_both_ways(peft_and_surgeon, tmp_path):
    theirs, ours = peft_and_surgeon(torch.float32)
    ids = _ids()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
    ours.save_adapters(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert mine["peft_type"] == peft_config["peft_type"] == "LORA"
    for key in (
        "r",
        "lora_alpha",
        "lora_dropout",
        "bias",
        "use_dora",
        "use_rslora",
        "fan_in_fan_out",
    ):
        assert mine[key] == peft_config[key], key
    assert sorted(mine["target_modules"]) == sorted(peft_config["target_modules"])
    # PEFT loads ours onto its bitsandbytes model
    state = copy.deepcopy(llama64().state_dict())
    loaded = peft_loaded(bnb_llama(state, torch.float32), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    # surgeon loads PEFT's onto a 4-bit model: LoRA there runs QLoRA's layer
    model = llama64()
    quant.quantize_model(model, surgeon.NF4(compute_dtype="float32"))
    cm = surgeon.load(model, tmp_path / "peft").eval()
    assert cm.spec("default").name == "lora"
    assert all(layer.method == "qlora" for _, layer in cm.store.items("default"))
    with torch.no_grad():
        torch.testing.assert_close(cm(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


# -- merging ---------------------------------------------------------------------------------------------


def test_merge_folds_into_the_original_dtype_and_unmerge_restores_the_4bit_bytes():
    model = ZOO["llama"].model()
    cm = surgeon.compile(model, _fp32()).eval()
    randomize(cm)
    q_proj = model.model.layers[0].self_attn.q_proj
    stored = {k: v.clone() for k, v in q_proj.state_dict().items()}
    ids = _ids()
    with torch.no_grad():
        unmerged = logits(cm(input_ids=ids))
        cm.merge()
        assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float32
        cm.unmerge()
        assert quant.is_quantized(q_proj)
        assert all(torch.equal(q_proj.state_dict()[k], v) for k, v in stored.items())
        torch.testing.assert_close(logits(cm(input_ids=ids)), unmerged, rtol=0, atol=0)
        with cm.disabled():
            base = logits(cm(input_ids=ids))
        assert not torch.allclose(base, unmerged)


@pytest.mark.parametrize("requantize", [False, True])
def test_merge_and_unload(requantize):
    model = ZOO["llama"].model()
    cm = surgeon.compile(model, _fp32()).eval()
    randomize(cm)
    ids = _ids()
    layers = {
        p: (layer.base, layer.delta_weight().detach()) for p, layer in cm.store.items("default")
    }
    expected = {p: base.dequantize(torch.float32) + delta for p, (base, delta) in layers.items()}
    with torch.no_grad():
        unmerged = logits(cm(input_ids=ids))
    plain = cm.merge_and_unload(requantize=requantize)
    assert plain is model and not hasattr(plain, "store")
    for path, weight in expected.items():
        layer = plain.get_submodule(path)
        if requantize:
            assert quant.is_quantized(layer)
            again = quant.quantize_4bit(weight, 64, "nf4", True)
            assert torch.equal(layer.weight.view(-1), again.packed)
        else:
            assert type(layer) is nn.Linear
            torch.testing.assert_close(layer.weight, weight, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        out = logits(plain(input_ids=ids))
    if requantize:  # rounding the merged weight to 4 bits moves the outputs a little
        assert (out - unmerged).abs().max() < 0.15 and (out - unmerged).abs().mean() < 0.02
    else:
        torch.testing.assert_close(out, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_export_onnx_lowers_the_4bit_layers_and_restores_them(tmp_path):
    pytest.importorskip("onnxruntime")
    model = ZOO["llama"].model()
    cm = surgeon.compile(model, _fp32()).eval()
    randomize(cm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = surgeon.export_onnx(cm, tmp_path / "m.onnx", {"input_ids": _ids()})
    assert report.max_abs_diff < 1e-4
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert quant.is_quantized(model.model.layers[0].mlp.up_proj)


# -- the compiler's other contracts ---------------------------------------------------------------------------


def test_failed_compile_leaves_the_model_as_it_was():
    model = ZOO["llama"].model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = surgeon.Spec(
        {"q": surgeon.QLoRA(), "bad": surgeon.LoRA(targets=("embed_tokens",), init="pissa")}
    )
    with pytest.raises(surgeon.SpecError, match="pissa"):
        surgeon.compile(model, spec)
    assert not any(quant.is_quantized(m) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_4bit_layers_on_the_meta_device_are_meta_bytes():
    with torch.device("meta"):
        model = ZOO["llama"].build()
    surgeon.compile(model, surgeon.QLoRA())
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.is_meta and layer.weight.dtype == torch.uint8 and layer.absmax.is_meta


def test_model_in_bfloat16_and_generate():
    model = ZOO["llama"].model().to(torch.bfloat16)
    cm = surgeon.compile(model, surgeon.QLoRA())
    randomize(cm)
    assert model.model.layers[0].self_attn.q_proj.weight_dtype == torch.bfloat16
    out = cm.generate(input_ids=_ids()[:, :3], max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 7)
    assert cm.config is model.config


def test_lora_on_a_4bit_model_is_qlora_and_other_methods_refuse():
    model = ZOO["llama"].model()
    paths = quant.quantize_model(model, surgeon.NF4(compute_dtype="float32"))
    assert "lm_head" not in paths and len(paths) == 14
    cm = surgeon.compile(model, surgeon.LoRA(targets=("q_proj",)))
    assert all(layer.method == "qlora" for _, layer in cm.store.items("default"))
    with pytest.raises(surgeon.SpecError, match=r"DoRA cannot adapt layers stored in 4 bits"):
        cm.add_adapter("d", surgeon.DoRA(targets=("q_proj",)))
    with pytest.raises(surgeon.SpecError, match="already stored as NF4"):
        cm.add_adapter("other", surgeon.QLoRA(quant=surgeon.NF4(block_size=128)))
    assert cm.adapters == ["default"]
    with pytest.raises(surgeon.SpecError, match="residual inits need its full-precision weight"):
        cm.add_adapter("p", surgeon.LoRA(targets=("v_proj",), init="pissa"))


def test_hotswap_of_a_saved_adapter_keeps_the_4bit_base_and_the_parameters(tmp_path):
    spec = _fp32(rank=4, targets=("q_proj", "v_proj"))
    source, serving = (surgeon.compile(ZOO["llama"].model(), spec) for _ in range(2))
    randomize(source, seed=1)
    randomize(serving, seed=2)
    source.save_adapters(tmp_path)  # a PEFT LoRA file, read back as LoRA
    params = {id(p) for p in serving.store.parameters()}
    serving.hotswap_adapter(tmp_path)
    inputs = ZOO["llama"].example()
    torch.testing.assert_close(logits(serving(**inputs)), logits(source(**inputs)))
    assert {id(p) for p in serving.store.parameters()} == params
    assert serving.store.specs["default"] == source.store.specs["default"]  # quant kept
    with pytest.raises(surgeon.SpecError, match="differs from adapter 'default' in rank"):
        surgeon.compile(ZOO["llama"].model(), spec.replace(rank=2)).hotswap_adapter(tmp_path)


def test_gpt2_conv1d_layers_are_stored_as_4bit_linears():
    model = ZOO["gpt2"].model()
    c_attn = model.transformer.h[0].attn.c_attn
    weight = c_attn.weight.detach().t().clone()  # Conv1D stores [in, out]
    surgeon.compile(model, _fp32(targets=("c_attn",)))
    assert quant.is_quantized(c_attn) and (c_attn.out_features, c_attn.in_features) == (96, 32)
    assert torch.equal(c_attn.weight.view(-1), quant.quantize_4bit(weight).packed)


def test_pissa_quantizes_the_residual():
    torch.manual_seed(0)
    model = One(nn.Linear(64, 32))
    weight = model.layer.weight.detach().clone()
    cm = surgeon.compile(model, _fp32(targets=("layer",), rank=4, init="pissa"))
    ((_, adapter),) = cm.store.items("default")
    residual = weight - adapter.delta_weight().detach()
    assert torch.equal(model.layer.weight.view(-1), quant.quantize_4bit(residual).packed)


def test_spec_fields_files_and_errors(tmp_path):
    spec = surgeon.QLoRA()
    assert (
        spec.targets == ATTENTION and spec.quant == surgeon.NF4() and spec.quantize == "all-linear"
    )
    data = spec.to_dict()
    assert data["method"] == "qlora" and data["quant"] == {
        "block_size": 64,
        "double_quant": True,
        "compute_dtype": "bfloat16",
        "quant_type": "nf4",
    }
    (tmp_path / "s.yaml").write_text(
        "method: qlora\nrank: 4\nquant: {block_size: 128, compute_dtype: float16}\n"
    )
    loaded = surgeon.load_spec(tmp_path / "s.yaml").adapters["default"]
    assert loaded.quant == surgeon.NF4(block_size=128, compute_dtype="float16")
    with pytest.raises(surgeon.SpecError, match=r"QLoRA\.quant: NF4\.block_size=100"):
        surgeon.QLoRA(quant={"block_size": 100})
    with pytest.raises(surgeon.SpecError, match=r"QLoRA\.quant=4: expected surgeon\.NF4"):
        surgeon.QLoRA(quant=4)
    with pytest.raises(surgeon.SpecError, match=r"QLoRA\.quantize=5"):
        surgeon.QLoRA(quantize=5)
    with pytest.raises(surgeon.SpecError, match=r"QLoRA\.targets=.*Embedding|cannot adapt"):
        surgeon.compile(ZOO["llama"].model(), surgeon.QLoRA(targets=("embed_tokens",)))
