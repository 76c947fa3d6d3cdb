"""Specialised regions (surgeon/specialise.py): modules plain FX cannot trace are traced per kind
of call, run as one graph while their guards hold, and fall back to their own forward (with the
adapters on their layers) where a trace is refused. The oracle is the same compiled model with
specialisation off: the plain regions, themselves checked against PEFT in tests/passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import FAMILIES, ZOO, logits, padded_ids, randomize, tiny_family

import surgeon
import surgeon.specialise
from surgeon.passes.fuse import fused_sites


@pytest.fixture(autouse=True)
def fresh_traces():
    """Traces are shared across identical models in a process: start each test without any."""
    surgeon.specialise._SHARED.clear()


def _compiled_both(build, method, train: bool = False, **options) -> list:
    """The same adapted model compiled twice, specialising and on plain regions only, with the
    same seeded base and adapter weights."""
    compiled = []
    for specialise in (True, False):
        torch.manual_seed(0)
        cm = surgeon.compile(build(), method, specialise=specialise, **options)
        randomize(cm)
        cm.train(train)
        compiled.append(cm)
    return compiled


def _pair(entry_name: str, train: bool = False) -> list:
    method = surgeon.LoRA(targets="all-linear", dropout=0.1 if train else 0.0)
    return _compiled_both(ZOO[entry_name].model, method, train)


def _no_cache(name: str, inputs: dict) -> dict:
    return inputs if name == "bert" else {**inputs, "use_cache": False}


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_transformers_layers_run_as_one_region_with_the_same_outputs(name):
    cm, plain = _pair(name)
    inputs = _no_cache(name, padded_ids())
    before = cm.graph.regions_per_layer()
    torch.testing.assert_close(logits(cm(**inputs)), logits(plain(**inputs)), rtol=0, atol=1e-6)
    assert cm.graph.traced(), cm.inspect().breaks_table()
    assert cm.graph.regions_per_layer() == 1.0 < before
    report = str(cm.inspect())
    assert "1.0 per decoder layer" in report and "specialised at call time" in report


def test_a_decoder_is_one_graph_with_adapters_marked():
    cm, _ = _pair("llama")
    assert "not traced yet" in cm.graph.code("model.layers.0")
    cm(**_no_cache("llama", padded_ids()))
    code = cm.graph.code("", marked=True)
    assert "specialised" in code.splitlines()[0]
    assert code.count("# + lora[default]") >= 2 * 7 * 3  # 7 linears per layer, A, B, add
    assert "scaled_dot_product_attention" in code


def test_training_step_matches_plain_regions_with_dropout():
    cm, plain = _pair("llama", train=True)
    inputs = _no_cache("llama", padded_ids())
    grads = []
    for model in (cm, plain):
        torch.manual_seed(0)
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=1e-5, atol=1e-6)
    assert cm.graph.traced()


def test_a_loss_module_made_inside_the_forward_is_traced_through():
    cm, plain = _pair("bert", train=True)
    inputs, labels = padded_ids(), torch.tensor([0, 2])
    grads = []
    for model in (cm, plain):
        torch.manual_seed(0)
        model(**inputs, labels=labels).loss.backward()  # BERT makes a CrossEntropyLoss
        grads.append([p.grad for p in model.store.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert cm.graph.refused() == [] and cm.graph.region("") in cm.graph.live()
    assert "cross_entropy" in cm.graph.code("")


def _family_calls(cm, name: str) -> list[torch.Tensor]:
    """Logits of a padded batch, a train step's loss and gradients, and generated tokens."""
    inputs = padded_ids()
    seq2seq = name in ("t5", "bart")
    if seq2seq:
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :4].contiguous()
    with torch.no_grad():
        results = [logits(cm(**inputs))]
    cm.train()
    torch.manual_seed(0)
    classifier = "Classification" in type(cm.model).__name__
    labels = torch.tensor([0, 2]) if classifier else inputs.get("decoder_input_ids")
    loss = cm(**inputs, labels=inputs["input_ids"] if labels is None else labels).loss
    loss.backward()
    results += [loss.detach(), *(p.grad for p in cm.store.parameters())]
    cm.eval()
    if not classifier:
        prompt = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
        results.append(cm.generate(**prompt, max_new_tokens=3, do_sample=False))
    return results


FAST_FAMILIES = ("t5", "bart")  # encoder-decoders: their caches and encoder outputs


@pytest.mark.parametrize(
    "name", [n if n in FAST_FAMILIES else pytest.param(n, marks=pytest.mark.slow) for n in FAMILIES]
)
def test_transformers_families_run_as_one_graph_like_plain_regions(name):
    """Eval, a train step with labels, and generate(): the same numbers as plain regions, with
    the whole model one graph and nothing refused."""
    results = []
    for specialise in (True, False):
        torch.manual_seed(0)
        cm = surgeon.compile(
            tiny_family(name).eval(), surgeon.LoRA(targets="all-linear"), specialise=specialise
        )
        randomize(cm)
        results.append(_family_calls(cm, name))
        if specialise:
            assert cm.graph.refused() == [], cm.graph.refused()
            assert cm.graph.regions_per_layer() == 1.0
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_new_lengths_reuse_the_variant_and_batch_one_gets_its_own():
    cm, plain = _pair("gpt2")
    root = cm.graph.region("")
    for batch, length in [(2, 6), (3, 9), (2, 4), (1, 5)]:
        inputs = _no_cache("gpt2", padded_ids(batch, length, padded=False))
        torch.testing.assert_close(logits(cm(**inputs)), logits(plain(**inputs)), rtol=0, atol=1e-6)
    (variants,) = [v for v in root.variants.values() if isinstance(v, list)]
    # the first sizes are traced as they are; sizes that then change are traced symbolically,
    # and that graph serves every later size > 1; a size of 1 is specialised (0/1 guards)
    assert len(variants) == 3
    assert "2 <= L['t0'].size()[1]" in variants[1].guards and "== 1" in variants[2].guards


def _cache_tensors(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def test_a_cache_made_inside_the_forward_is_rebuilt_per_call_and_decoding_goes_on():
    cm, plain = _pair("llama")
    inputs = padded_ids()
    got, expected = cm(**inputs, use_cache=True), plain(**inputs, use_cache=True)
    torch.testing.assert_close(logits(got), logits(expected), rtol=0, atol=1e-6)
    assert cm.graph.refused() == [] and cm.graph.regions_per_layer() == 1.0
    cache = got.past_key_values
    assert type(cache) is type(expected.past_key_values) and cache.get_seq_length() == 6
    for a, b in zip(_cache_tensors(cache), _cache_tensors(expected.past_key_values), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    again = cm(**inputs, use_cache=True).past_key_values
    assert again is not cache and again.layers[0] is not cache.layers[0]
    # decoding goes on from each model's own cache
    step = {
        "input_ids": torch.tensor([[5], [7]]),
        "attention_mask": F.pad(inputs["attention_mask"], (0, 1), value=1),
    }
    got = cm(**step, past_key_values=cache)
    expected = plain(**step, past_key_values=expected.past_key_values)
    torch.testing.assert_close(logits(got), logits(expected), rtol=0, atol=1e-6)
    assert got.past_key_values is cache and cache.get_seq_length() == 7


class _Holder:
    pass


def test_rebuilt_objects_are_fresh_and_keep_what_they_share_shared():
    from surgeon.rebuild import Rebuild, _Slot

    module = nn.Linear(2, 2)
    inner = _Holder()
    inner.tensor, inner.sizes, inner.module = _Slot(0), [1, 2], module
    for shared in (False, True):
        outer = _Holder()
        outer.first, outer.second = inner, inner if shared else _Holder()
        rebuild = Rebuild(outer, [module])
        values = torch.ones(3)
        made, again = rebuild(values), rebuild(values)
        assert made is not again and made.first is not inner and made.first.sizes is not inner.sizes
        assert made.first.tensor is values and made.first.module is module
        assert made.first.sizes == [1, 2] and (made.second is made.first) is shared


def test_kv_cache_calls_are_guarded_on_the_cache_and_generate_runs_as_one_graph():
    cm, plain = _pair("llama")
    inputs = padded_ids()
    out = cm.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, plain.generate(**inputs, max_new_tokens=4, do_sample=False))
    traced = [v for v in cm.graph.region("").variants.values() if isinstance(v, list)]
    assert len(traced) == 2  # prefill (empty cache) and decoding steps (a filled one)
    assert any("L['t" in (v.guards or "") and v.describe.count("DynamicCache") for (v,) in traced)


class KwargsBlock(nn.Module):
    """Takes ``**kwargs`` (plain FX cannot trace it) and branches on what it is given."""

    def __init__(self, rule: str) -> None:
        super().__init__()
        self.rule = rule
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        h = self.fc1(x)
        if self.rule == "shape" and x.shape[-2] > 4:
            h = F.gelu(h)
        if self.rule == "data" and x.sum() > 0:
            h = -h
        mask = kwargs.get("mask")
        if self.rule == "isinstance" and isinstance(mask, torch.Tensor):
            h = h * mask
        return self.fc2(h)


class KwargsNet(nn.Module):
    def __init__(self, rule: str) -> None:
        super().__init__()
        self.block = KwargsBlock(rule)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.block(x, **kwargs)


def _kwargs_pair(rule: str) -> list:
    return _compiled_both(lambda: KwargsNet(rule), surgeon.LoRA(targets=("fc1", "fc2")))


class NormedBlock(nn.Module):
    """``**kwargs`` (specialised) around a BatchNorm, whose running statistics count calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.norm = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.norm(self.fc(x))


def test_tracing_and_checking_a_call_do_not_count_as_calls():
    """The trace and its check run the forward; buffers it updates are put back, so the first
    call in training leaves BatchNorm's statistics as plain regions leave them."""
    cm, plain = _compiled_both(NormedBlock, surgeon.LoRA(targets=("fc",)), train=True)
    x = torch.randn(4, 6)
    torch.testing.assert_close(cm(x), plain(x), rtol=0, atol=1e-6)
    assert cm.graph.traced()
    assert int(cm.model.norm.num_batches_tracked) == int(plain.model.norm.num_batches_tracked) == 1
    torch.testing.assert_close(cm.model.norm.running_mean, plain.model.norm.running_mean)


def test_a_branch_on_sizes_is_guarded():
    cm, plain = _kwargs_pair("shape")
    for length in (3, 7, 2, 9):
        x = torch.randn(2, length, 6)
        torch.testing.assert_close(cm(x), plain(x), rtol=0, atol=1e-6)
    (variants,) = [v for v in cm.graph.region("").variants.values() if isinstance(v, list)]
    assert len(variants) == 3  # length 3 as it came; then > 4 and <= 4 symbolically
    assert all(v.guards and "size()[1]" in v.guards for v in variants)
    guards = " | ".join(v.guards for v in variants)
    assert "5 <= L['t0'].size()[1]" in guards and "L['t0'].size()[1] <= 4" in guards, guards


def test_a_branch_on_tensor_values_is_refused():
    cm, plain = _kwargs_pair("data")
    for sign in (1, -1):
        x = sign * torch.rand(2, 3, 6)
        torch.testing.assert_close(cm(x), plain(x), rtol=0, atol=1e-6)
    assert not cm.graph.traced()
    assert any("tensor values" in reason for _, _, reason in cm.graph.refused())


def test_a_trace_that_misses_a_decision_is_caught_by_the_first_run_check():
    cm, plain = _kwargs_pair("isinstance")
    x, mask = torch.randn(2, 3, 6), torch.rand(2, 3, 6)
    torch.testing.assert_close(cm(x, mask=mask), plain(x, mask=mask), rtol=0, atol=1e-6)
    assert any("disagrees" in reason for _, _, reason in cm.graph.refused())


def _traced_variants(cm, path: str = "") -> list:
    return [v for vs in cm.graph.region(path).variants.values() if isinstance(vs, list) for v in vs]


def test_config_changes_after_a_trace_are_traced_and_changing_back_reuses_the_first():
    cm, plain = _pair("llama")
    inputs = padded_ids()
    for setting in (True, False, True):
        for model in (cm, plain):
            model.model.config.use_cache = setting
        got, expected = cm(**inputs), plain(**inputs)
        torch.testing.assert_close(logits(got), logits(expected), rtol=0, atol=1e-6)
        assert (got.past_key_values is None) is (expected.past_key_values is None) is (not setting)
    assert len(_traced_variants(cm)) == 2 and cm.graph.refused() == []


def test_hidden_states_asked_for_after_a_trace_match_plain_regions():
    cm, plain = _pair("llama")
    inputs = _no_cache("llama", padded_ids())
    assert cm(**inputs).hidden_states is None
    for model in (cm, plain):
        model.model.config.output_hidden_states = True
    for _ in range(2):  # transformers registers its capturing hooks on the first such call
        got, expected = cm(**inputs), plain(**inputs)
        assert len(got.hidden_states) == len(expected.hidden_states) == 3
        for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_switching_the_attention_implementation_traces_the_new_one():
    cm, plain = _pair("llama")
    inputs = _no_cache("llama", padded_ids())
    cm(**inputs)
    assert "scaled_dot_product_attention" in cm.graph.code("")
    for model in (cm, plain):
        model.model.set_attn_implementation("eager")
    torch.testing.assert_close(logits(cm(**inputs)), logits(plain(**inputs)), rtol=0, atol=1e-6)
    assert "scaled_dot_product_attention" not in cm.graph.code("") and "softmax" in cm.graph.code(
        ""
    )


class ScaledNet(KwargsNet):
    """Reads a setting (``scale``); ``count`` makes its forward update one on every call."""

    def __init__(self, count: bool) -> None:
        super().__init__("none")
        self.scale, self.count, self.calls = 2.0, count, 0

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.count:
            self.calls += 1
        return self.block(x, **kwargs) * self.scale


class LazyNet(KwargsNet):
    """Sets a flag of its own on its first call (a table built once, say)."""

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if not getattr(self, "ready", False):
            self.ready = True
        return self.block(x, **kwargs)


def test_a_flag_a_forward_sets_on_its_first_call_is_traced_from_the_next():
    cm, plain = _compiled_both(lambda: LazyNet("none"), surgeon.LoRA(targets=("fc1", "fc2")))
    x = torch.randn(2, 3, 6)
    for _ in range(3):
        torch.testing.assert_close(cm(x), plain(x), rtol=0, atol=1e-6)
    assert cm.model.ready and cm.graph.region("") in cm.graph.traced()
    assert any("sets ready" in reason for _, _, reason in cm.graph.refused())


def _scaled_pair(count: bool) -> list:
    return _compiled_both(lambda: ScaledNet(count), surgeon.LoRA(targets=("fc1", "fc2")))


def test_a_forward_that_sets_a_setting_runs_its_own_forward():
    cm, plain = _scaled_pair(count=True)
    x = torch.randn(2, 3, 6)
    for _ in range(3):
        torch.testing.assert_close(cm(x), plain(x), rtol=0, atol=1e-6)
    assert cm.model.calls == plain.model.calls == 3
    assert [r.path for r in cm.graph.traced()] == ["block"]  # the block inside sets nothing
    assert any("sets calls" in reason for _, _, reason in cm.graph.refused())


def test_a_setting_deleted_after_a_trace_is_a_new_state():
    cm, plain = _scaled_pair(count=False)
    x = torch.randn(2, 3, 6)
    cm(x)
    for model in (cm, plain):
        del model.model.calls  # not read by the forward: the same outputs, traced anew
    torch.testing.assert_close(cm(x), plain(x), rtol=0, atol=1e-6)
    assert len(_traced_variants(cm)) == 2


def test_settings_that_keep_changing_stop_being_traced():
    cm, plain = _scaled_pair(count=False)
    x = torch.randn(2, 3, 6)
    limit = surgeon.specialise.ModuleState.LIMIT
    for step in range(limit + 3):
        for model in (cm, plain):
            model.model.scale = step / 4  # each a new state, traced while under the limit
        torch.testing.assert_close(cm(x), plain(x), rtol=0, atol=1e-6)
    assert len(_traced_variants(cm)) == limit
    assert any("changed more than" in reason for _, _, reason in cm.graph.refused())
    cm.model.scale = plain.model.scale = 1 / 4  # a state seen before: its variant again
    torch.testing.assert_close(cm(x), plain(x), rtol=0, atol=1e-6)


def test_mixed_batches_and_adapter_switches_use_specialised_regions():
    cm, plain = _pair("gpt2")
    for model in (cm, plain):
        model.add_adapter("other", surgeon.LoRA(targets=("c_attn",), rank=4))
        randomize(model, seed=5)
    inputs = _no_cache("gpt2", padded_ids(3, 6, padded=False))
    names = ["default", "other", "default"]
    torch.testing.assert_close(
        logits(cm(**inputs, adapter_names=names)),
        logits(plain(**inputs, adapter_names=names)),
        rtol=0,
        atol=1e-6,
    )
    for active in ("other", ["default", "other"]):
        cm.set_active(active)
        plain.set_active(active)
        torch.testing.assert_close(logits(cm(**inputs)), logits(plain(**inputs)), rtol=0, atol=1e-6)
    with cm.disabled(), plain.disabled():
        torch.testing.assert_close(logits(cm(**inputs)), logits(plain(**inputs)), rtol=0, atol=1e-6)


def test_merge_and_fusion_keep_specialised_outputs():
    cm, plain = _pair("llama")
    inputs = _no_cache("llama", padded_ids())
    expected = logits(plain(**inputs))
    cm.fuse()
    torch.testing.assert_close(logits(cm(**inputs)), expected, rtol=1e-5, atol=1e-5)
    assert fused_sites(cm.graph.region("").graph) == 2 * 7, cm.graph.code("")
    cm.fuse(False)
    cm.merge()
    torch.testing.assert_close(logits(cm(**inputs)), expected, rtol=1e-4, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(logits(cm(**inputs)), expected, rtol=1e-5, atol=1e-6)


def test_specialise_must_be_a_bool():
    with pytest.raises(surgeon.SpecError, match="specialise"):
        surgeon.compile(ZOO["mlp"].model(), surgeon.LoRA(targets=("head",)), specialise="yes")


@pytest.mark.parametrize("fuse", [False, True])
def test_qlora_layers_in_a_specialised_graph_match_plain_regions(fuse):
    spec = surgeon.QLoRA(targets="all-linear", quant=surgeon.NF4(compute_dtype="float32"))
    compiled = _compiled_both(ZOO["llama"].model, spec, fuse=fuse)
    inputs = _no_cache("llama", padded_ids())
    grads = []
    for model in compiled:
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert compiled[0].graph.traced()
    if fuse:
        assert fused_sites(compiled[0].graph.region("").graph) == 2 * 7
