"""P-tuning v2: the encoder's shape, PEFT's prefix projection at depth 2 (files both ways),
depths PEFT cannot describe, both routes, generate, training, BERT, graph-route export."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import (
    ZOO,
    assert_same_generation,
    decode_without_cache,
    generate,
    logits,
    peft_loaded,
    peft_model,
    prefix_formula,
    randomize,
    tiny_traced_decoder,
)
from zoo import (
    padded_ids as _inputs,
)

import surgeon

formula = prefix_formula  # the prefixes (folded from the encoder) as the key/value cache


peft = pytest.importorskip("peft")

N = 3  # virtual tokens


def _compiled(model, hidden: int = 8, depth: int = 3, **fields) -> surgeon.CompiledModel:
    spec = surgeon.PTuningV2(N, encoder_hidden_size=hidden, encoder_num_layers=depth, **fields)
    cm = surgeon.compile(model, spec)
    randomize(cm, scale=0.5)
    return cm


def test_bad_fields():
    with pytest.raises(surgeon.SpecError, match=r"PTuningV2\.encoder_num_layers=0"):
        surgeon.PTuningV2(encoder_num_layers=0)
    with pytest.raises(surgeon.SpecError, match=r"PTuningV2\.encoder_hidden_size=-3"):
        surgeon.PTuningV2(encoder_hidden_size=-3)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_the_encoder_is_an_mlp_of_the_given_width_and_depth(depth):
    cm = surgeon.compile(ZOO["llama"].model(), surgeon.PTuningV2(N, 10, depth))
    encoder = cm.store.calls["default"].encoder
    linears = [m for m in encoder.transform if isinstance(m, nn.Linear)]
    tanhs = [m for m in encoder.transform if isinstance(m, nn.Tanh)]
    assert len(linears) == depth and len(tanhs) == depth - 1
    # Llama's key/value width is 2 heads x 8; every layer's key and value comes out
    widths = [(lin.in_features, lin.out_features) for lin in linears]
    assert widths[0][0] == 16 and widths[-1][1] == 2 * 2 * 16
    assert all(w == (10, 10) for w in widths[1:-1])
    assert encoder.embedding.weight.shape == (N, 16)


def test_two_layers_are_peft_prefix_projection_and_save_as_it(tmp_path):
    pm = peft_model(
        ZOO["gpt2"].model(),
        peft.PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=N,
            prefix_projection=True,
            encoder_hidden_size=8,
        ),
        seed=None,
    )
    cm = surgeon.compile(ZOO["gpt2"].model(), surgeon.PTuningV2(N, 8, 2))
    cm.store.calls["default"].encoder.load_state_dict(pm.prompt_encoder["default"].state_dict())
    x = _inputs()
    mine = logits(cm(**x))
    torch.testing.assert_close(mine, logits(pm(**x)), rtol=1e-5, atol=1e-5)
    cm.save_adapters(tmp_path)
    loaded = peft_loaded(ZOO["gpt2"].model(), tmp_path)
    config = loaded.peft_config["default"]
    assert (config.peft_type, config.prefix_projection, config.encoder_hidden_size) == (
        "PREFIX_TUNING",
        True,
        8,
    )
    torch.testing.assert_close(logits(loaded(**x)), mine, rtol=1e-5, atol=1e-5)
    back = surgeon.load(ZOO["gpt2"].model(), tmp_path)
    assert back.spec("default") == surgeon.PrefixTuning(N, projection_dim=8)
    torch.testing.assert_close(logits(back(**x)), mine, rtol=1e-5, atol=1e-5)


def test_other_depths_refuse_peft_format_and_write_nothing(tmp_path):
    cm = _compiled(ZOO["llama"].model(), depth=3)
    with pytest.raises(surgeon.SpecError, match=r"encoder_num_layers=3: .*no PEFT equivalent"):
        cm.save_adapters(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_with_the_cache_equals_decoding_without_it(kind):
    cm = _compiled(ZOO[kind].model())
    x = _inputs()
    got = generate(cm, x["input_ids"], x["attention_mask"], 4, False)
    assert_same_generation(got, decode_without_cache(cm, **x, steps=4, sample=False))


def test_graph_and_cache_routes_agree_in_outputs_and_gradients():
    pair = []
    for route in ("graph", "cache"):
        torch.manual_seed(0)
        pair.append(_compiled(tiny_traced_decoder().eval(), route=route))
    x = _inputs()
    outs = [cm(**x, labels=x["input_ids"]) for cm in pair]
    torch.testing.assert_close(outs[0].logits, outs[1].logits, rtol=1e-5, atol=1e-5)
    for out in outs:
        out.loss.backward()
    for p, q in zip(pair[0].store.parameters(), pair[1].store.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for cm in pair for p in cm.model.parameters())


def test_bert_sequence_classification_trains_its_prompts_only():
    cm = _compiled(ZOO["bert"].model())
    x = _inputs()
    base = logits(ZOO["bert"].model()(**x))
    out = cm(**x, labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 3) and not torch.allclose(out.logits, base, atol=1e-4)
    out.loss.backward()
    grads = [p.grad for p in cm.store.calls["default"].encoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    with cm.disabled():
        torch.testing.assert_close(logits(cm(**x)), base)


@pytest.mark.slow  # the default run exports Llama with prompt and prefix tuning, BERT with prompts
def test_graph_route_export_keeps_the_prefix_as_constants(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    cm = _compiled(tiny_traced_decoder().eval())
    assert cm.store.calls["default"].route == "graph"
    report = surgeon.export_onnx(cm, tmp_path / "m.onnx", _inputs(padded=False))
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert cm.graph.region("layers.0").graph is not None  # the rewrite is back after lowering
