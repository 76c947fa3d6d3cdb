"""Prefix tuning beyond the conformance suite: files both ways on a padded batch with labels, the
projection while training and BERT against PEFT, folding, generate with the cache, training, the
graph route against the cache route, errors, float32 prefixes in half-precision models, export."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
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
    train_a_few_steps,
)
from zoo import (
    padded_ids as _inputs,
)

import surgeon
from surgeon.passes.prompt.graph import attend_with_prefix

formula = prefix_formula  # the prefixes (folded from the encoder) as the key/value cache


peft = pytest.importorskip("peft")

N = 3  # virtual tokens


def _peft_model(kind: str, projection: bool, task: str = "CAUSAL_LM"):
    config = peft.PrefixTuningConfig(
        task_type=task,
        num_virtual_tokens=N,
        prefix_projection=projection,
        encoder_hidden_size=7 if projection else None,
    )
    return peft_model(ZOO[kind].model(), config, seed=0)  # PEFT trains its prompt encoder only


def _compiled(model, **fields) -> surgeon.CompiledModel:
    fields.setdefault("projection_dim", None)
    cm = surgeon.compile(model, surgeon.PrefixTuning(num_virtual_tokens=N, **fields))
    randomize(cm, scale=0.5)
    return cm


# -- the spec ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_virtual_tokens": 0}, "PrefixTuning.num_virtual_tokens=0"),
        ({"projection_dim": -1}, "PrefixTuning.projection_dim=-1"),
        ({"projection_dim": 2.5}, "PrefixTuning.projection_dim=2.5"),
        ({"route": "fast"}, "PrefixTuning.route='fast'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, message):
    with pytest.raises(surgeon.SpecError, match=message):
        surgeon.PrefixTuning(**fields)


@pytest.mark.parametrize(
    "name, text",
    [
        ("spec.toml", 'method = "prefix_tuning"\nnum_virtual_tokens = 4\nprojection_dim = 0\n'),
        ("spec.yaml", "method: prefix-tuning\nnum_virtual_tokens: 4\nprojection_dim: null\n"),
        ("spec.json", '{"method": "ptuning_v2", "num_virtual_tokens": 4, "route": "cache"}'),
    ],
)
def test_spec_files(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    method = surgeon.load_spec(tmp_path / name).adapters["default"]
    if name == "spec.json":
        assert method == surgeon.PTuningV2(num_virtual_tokens=4, route="cache")
    else:
        assert method == surgeon.PrefixTuning(num_virtual_tokens=4, projection_dim=None)
    assert surgeon.MethodSpec.from_dict(method.to_dict()) == method


# -- PEFT parity through the cache route ------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_peft_files_load_in_surgeon_and_surgeon_files_in_peft(kind, projection, tmp_path):
    pm = _peft_model(kind, projection)
    pm.save_pretrained(tmp_path / "p")
    cm = surgeon.load(ZOO[kind].model(), tmp_path / "p")
    assert cm.spec("default") == surgeon.PrefixTuning(N, 7 if projection else None)
    x = _inputs()
    mine, theirs = cm(**x, labels=x["input_ids"]), pm(**x, labels=x["input_ids"])
    assert mine.logits.shape == (2, 6, 96)
    torch.testing.assert_close(mine.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.loss, theirs.loss)

    cm.save_adapters(tmp_path / "s")
    back = peft_loaded(ZOO[kind].model(), tmp_path / "s")
    assert back.peft_config["default"].prefix_projection == projection
    torch.testing.assert_close(back(**x).logits, mine.logits, rtol=1e-5, atol=1e-5)


def test_training_the_projection_matches_peft():
    """The encoder itself (not the folded prefixes): same outputs and gradients as PEFT's."""
    pm = _peft_model("llama", projection=True).train()
    cm = surgeon.compile(ZOO["llama"].model(), surgeon.PrefixTuning(N, projection_dim=7))
    encoder = cm.store.calls["default"].encoder
    encoder.load_state_dict(pm.prompt_encoder["default"].state_dict())
    cm.train()
    x = _inputs()
    mine, theirs = cm(**x, labels=x["input_ids"]), pm(**x, labels=x["input_ids"])
    torch.testing.assert_close(mine.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    mine.loss.backward()
    theirs.loss.backward()
    for (name, a), b in zip(encoder.named_parameters(), pm.prompt_encoder["default"].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in cm.model.parameters())


def test_the_encoder_is_folded_once_for_inference_and_again_after_a_step():
    cm = surgeon.compile(ZOO["gpt2"].model(), surgeon.PrefixTuning(N, projection_dim=8))
    adapter = cm.store.calls["default"]
    x = _inputs()
    trained = logits(cm(**x))
    with torch.no_grad():
        folded = adapter.flat()
        assert adapter.flat() is folded  # reused, not recomputed
        torch.testing.assert_close(logits(cm(**x)), trained)
    optimizer = torch.optim.SGD(adapter.parameters(), lr=1.0)
    cm(**x, labels=x["input_ids"]).loss.backward()
    optimizer.step()
    with torch.no_grad():
        refolded = adapter.flat()
        assert refolded is not folded
        torch.testing.assert_close(refolded, adapter.encoder())


def test_bert_sequence_classification_matches_peft(tmp_path):
    """PEFT's SEQ_CLS prefix path fails with this transformers (it looks for past_key_values in
    the forward's signature); its FEATURE_EXTRACTION class hands the prefixes to any model."""
    pm = _peft_model("bert", projection=False, task="FEATURE_EXTRACTION")
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(ZOO["bert"].model(), tmp_path)
    x = _inputs()
    labels = torch.tensor([1, 2])
    mine, theirs = cm(**x, labels=labels), pm(**x, labels=labels)
    torch.testing.assert_close(mine.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.loss, theirs.loss)
    mine.loss.backward()
    assert cm.store.calls["default"].prefixes.grad.abs().sum() > 0


# -- generate, training ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampling"])
def test_generate_with_the_cache_equals_decoding_without_it(kind, sample):
    """The prefix stays in the cache across steps, the mask and positions stay consistent."""
    cm = _compiled(ZOO[kind].model())
    x = _inputs()
    torch.manual_seed(5)
    got = generate(cm, x["input_ids"], x["attention_mask"], 4, sample)
    torch.manual_seed(5)
    assert_same_generation(got, decode_without_cache(cm, **x, steps=4, sample=sample))
    with cm.disabled():
        base = generate(cm, x["input_ids"], x["attention_mask"], 1, False)
    assert not torch.allclose(base[1][0], got[1][0], atol=1e-3)


def test_a_left_padded_row_generates_as_it_would_alone():
    cm = _compiled(ZOO["llama"].model())
    x = _inputs()
    batch = generate(cm, x["input_ids"], x["attention_mask"], 4, False)
    alone = generate(cm, x["input_ids"][1:, 2:], x["attention_mask"][1:, 2:], 4, False)
    assert torch.equal(alone[0][0], batch[0][1, 2:])


def test_training_moves_only_the_prefixes_and_lowers_the_loss():
    cm = _compiled(ZOO["llama"].model(), projection_dim=8)
    trainable = [p for p in cm.parameters() if p.requires_grad]
    assert trainable == list(cm.store.calls["default"].encoder.parameters())
    losses = train_a_few_steps(cm, _inputs(), lr=0.02)
    assert losses[-1] < losses[0]


# -- the graph route --------------------------------------------------------------------------


def _route_pair(eager: bool, **fields) -> tuple[surgeon.CompiledModel, surgeon.CompiledModel]:
    """The same adapter on the same model, through the graph route and the cache route."""
    pair = []
    for route in ("graph", "cache"):
        torch.manual_seed(0)
        pair.append(_compiled(tiny_traced_decoder(eager).eval(), route=route, **fields))
    return pair[0], pair[1]


ATTENTION = [False, True]
ATTENTION_IDS = ["sdpa", "matmul-softmax"]


@pytest.mark.parametrize("eager", ATTENTION, ids=ATTENTION_IDS)
def test_auto_takes_the_graph_route_where_attention_traces_and_inserts_the_prefix_there(eager):
    model = tiny_traced_decoder(eager)
    cm = surgeon.compile(model, surgeon.PrefixTuning(N, projection_dim=None))
    assert cm.store.calls["default"].route == "graph"
    assert "graph route" in str(cm.inspect())
    for path in ("layers.0", "layers.1"):
        code = cm.graph.code(path)
        assert code.count("self.adapters.default.prefix_0(") == 1
        if eager:  # keys, values and the additive mask of the matmul-softmax pattern
            assert code.count("with_prefix(") == 2 and code.count("pad_mask(") == 1
        else:
            assert code.count("attend_with_prefix(") == 1
    cm.graph.check()
    llama = ZOO["llama"].model()
    assert surgeon.compile(llama, surgeon.PrefixTuning(N)).store.calls["default"].route == "cache"


@pytest.mark.parametrize("eager", ATTENTION, ids=ATTENTION_IDS)
@pytest.mark.parametrize("projection_dim", [None, 8])
def test_graph_and_cache_routes_give_the_same_outputs_losses_gradients_and_decoding(
    eager, projection_dim
):
    graph, cache = _route_pair(eager, projection_dim=projection_dim)
    x = _inputs()
    a, b = graph(**x, labels=x["input_ids"]), cache(**x, labels=x["input_ids"])
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    for p, q in zip(graph.store.parameters(), cache.store.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # a prefill, then two more tokens through each route's cache
        steps = []
        for cm in (graph, cache):
            first = {k: v[:, :4] for k, v in x.items()}
            out = cm(**first, past_key_values=DynamicCache(), use_cache=True)
            more = cm(
                input_ids=x["input_ids"][:, 4:],
                attention_mask=x["attention_mask"],
                past_key_values=out.cache,
                use_cache=True,
            )
            steps.append(torch.cat([out.logits, more.logits], dim=1))
        torch.testing.assert_close(steps[0], steps[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(steps[0], a.logits, rtol=1e-5, atol=1e-5)


def test_lora_in_the_same_regions_as_the_graph_route_prefix():
    outs = []
    for route in ("graph", "cache"):
        torch.manual_seed(0)
        spec = surgeon.Spec(
            {
                "lora": surgeon.LoRA(rank=2, targets=("q_proj", "k_proj")),
                "prefix": surgeon.PrefixTuning(N, projection_dim=None, route=route),
            }
        )
        cm = surgeon.compile(tiny_traced_decoder().eval(), spec)
        randomize(cm, scale=0.5)
        outs.append(logits(cm(**_inputs())))
        if route == "graph":
            assert cm.graph.region("layers.0").adapted["layers.0"] == ["prefix"]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_attend_with_prefix_is_attention_over_the_prefix_and_the_keys():
    """The inserted op against attention written out, for masks of each kind."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    prefix = (torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8))
    full_k = torch.cat([prefix[0], k], 2).repeat_interleave(2, 1)
    full_v = torch.cat([prefix[1], v], 2).repeat_interleave(2, 1)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    allowed = {
        "none": torch.ones(5, 8, dtype=torch.bool),
        "causal": torch.cat([torch.ones(5, 3, dtype=torch.bool), causal], 1),
    }
    for kind, mask, is_causal in [("none", None, False), ("causal", None, True)]:
        key, value, padded = attend_with_prefix(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask, is_causal, prefix
        )
        scores = (q @ full_k.transpose(-1, -2)) / 8**0.5
        scores = scores.masked_fill(~allowed[kind], -float("inf"))
        expected = torch.softmax(scores, -1) @ full_v
        got = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=padded)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    float_mask = torch.zeros(2, 1, 5, 5).masked_fill(~causal, -1e9)
    _, _, padded = attend_with_prefix(q, k, v, float_mask, False, prefix)
    assert padded.shape == (2, 1, 5, 8) and torch.equal(padded[..., :3], torch.zeros(2, 1, 5, 3))


def test_route_graph_where_attention_does_not_trace_is_refused_and_the_model_unchanged():
    model = ZOO["llama"].model()
    with pytest.raises(
        surgeon.SpecError, match=r"PrefixTuning.route='graph': .*graph breaks: .*Llama"
    ):
        surgeon.compile(model, surgeon.PrefixTuning(N, route="graph"))
    assert all(p.requires_grad for p in model.parameters()) and not model._forward_pre_hooks


# -- files, errors, dtypes, export --------------------------------------------------------------


def test_file_sizes_must_fit_the_model(tmp_path):
    pm = _peft_model("llama", projection=False)
    pm.save_pretrained(tmp_path)
    config = tmp_path / "adapter_config.json"
    # 4 heads of 4 has the shape of 2 heads of 8: only the size fields tell them apart
    text = config.read_text().replace('"num_attention_heads": 2', '"num_attention_heads": 4')
    config.write_text(text)
    with pytest.raises(surgeon.SpecError, match="num_attention_heads=4, this model needs 2"):
        surgeon.load(ZOO["llama"].model(), tmp_path)


def test_a_file_cannot_be_hot_swapped_into_a_prefix_encoder(tmp_path):
    cm = surgeon.compile(ZOO["llama"].model(), surgeon.PrefixTuning(N, projection_dim=8))
    cm.save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match="cannot be loaded back into an encoder"):
        cm.hotswap_adapter(tmp_path)
    plain = _compiled(ZOO["llama"].model())
    plain.save_adapters(tmp_path / "plain")
    x = _inputs()
    expected = logits(plain(**x))
    randomize(plain, seed=9)
    plain.hotswap_adapter(tmp_path / "plain")
    torch.testing.assert_close(logits(plain(**x)), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_keep_float32_prefixes(dtype):
    cm = _compiled(ZOO["llama"].model().to(dtype))
    assert cm.store.calls["default"].prefixes.dtype == torch.float32


def test_export_folds_the_projection_into_constant_prefixes(tmp_path):
    pytest.importorskip("onnxruntime")
    cm = surgeon.compile(ZOO["llama"].model(), surgeon.PrefixTuning(N, projection_dim=8))
    randomize(cm, scale=0.5)
    x = {"input_ids": _inputs(padded=False)["input_ids"]}  # plain input_ids, nothing else
    report = surgeon.export_onnx(cm, tmp_path / "m.onnx", x)
    assert report.inputs == ["input_ids"]
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    import onnx

    nodes = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "Tanh" not in nodes  # the encoder ran at export time; only its prefixes remain
