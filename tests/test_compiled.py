"""The compiled model: merging, adapter sets, pass-through, graph views, inspect."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from zoo import ZOO, logits, randomize

import surgeon


def _compiled(entry_name="llama", **lora):
    entry = ZOO[entry_name]
    cm = surgeon.compile(
        entry.model(), surgeon.LoRA(**{"rank": 2, "targets": entry.targets, **lora})
    )
    randomize(cm)
    return entry, cm


def _untied_targets(entry):
    return tuple(t for t in entry.targets if t != "wte")  # GPT-2 ties wte to lm_head


def test_unmerged_equals_merged_equals_unloaded(zoo_entry):
    cm = surgeon.compile(
        zoo_entry.model(), surgeon.LoRA(rank=2, targets=_untied_targets(zoo_entry))
    )
    randomize(cm)
    x = zoo_entry.example()
    unmerged = logits(cm(**x))
    cm.merge()
    assert cm.merged == ["default"]
    torch.testing.assert_close(logits(cm(**x)), unmerged, rtol=1e-4, atol=1e-4)
    cm.unmerge()
    torch.testing.assert_close(logits(cm(**x)), unmerged, rtol=1e-5, atol=1e-5)
    plain = cm.merge_and_unload()
    assert type(plain) is type(zoo_entry.model())
    assert not any("forward" in vars(m) for m in plain.modules())
    torch.testing.assert_close(logits(plain(**x)), unmerged, rtol=1e-4, atol=1e-4)
    assert set(plain.state_dict()) == set(zoo_entry.model().state_dict())


def test_merging_into_tied_weights_is_refused():
    entry, cm = _compiled("gpt2")
    x = entry.example()
    before = logits(cm(**x))
    with pytest.raises(
        surgeon.SpecError, match=r"transformer.wte.weight is tied to lm_head.weight"
    ):
        cm.merge()
    assert cm.merged == []
    torch.testing.assert_close(logits(cm(**x)), before)


def test_unmerge_restores_base_weights():
    _, cm = _compiled()
    before = {k: v.clone() for k, v in cm.model.state_dict().items()}
    cm.merge()
    assert not torch.equal(
        cm.model.model.layers[0].self_attn.q_proj.weight,
        before["model.layers.0.self_attn.q_proj.weight"],
    )
    cm.unmerge()
    for k, v in cm.model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-6, atol=1e-6)


def test_state_dict_keys_of_the_base_model_are_unchanged():
    entry = ZOO["llama"]
    model = entry.model()
    keys = set(model.state_dict())
    surgeon.compile(model, surgeon.LoRA(targets=("q_proj",)))
    assert set(model.state_dict()) == keys


def test_disabled_runs_the_base_model_and_restores():
    entry, cm = _compiled()
    x = entry.example()
    adapted = logits(cm(**x))
    base = logits(entry.model()(**x))
    with cm.disabled():
        torch.testing.assert_close(logits(cm(**x)), base)
    torch.testing.assert_close(logits(cm(**x)), adapted)
    cm.merge()
    with cm.disabled():
        torch.testing.assert_close(logits(cm(**x)), base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(cm(**x)), adapted, rtol=1e-4, atol=1e-4)


def test_adapter_sets_add_switch_and_delete():
    entry = ZOO["mlp"]
    model = entry.model()
    x = entry.example()
    base = model(**x)
    cm = surgeon.compile(model, surgeon.LoRA(rank=2, targets=("head",)), name="a")
    cm.add_adapter("b", surgeon.LoRA(rank=3, targets=("body.0",)))
    randomize(cm)
    assert cm.adapters == ["a", "b"] and cm.active == ["a"]
    only_a = cm(**x)
    cm.set_active("b")
    only_b = cm(**x)
    cm.set_active(["a", "b"])
    both = cm(**x)
    assert not torch.allclose(only_a, only_b)
    cm.set_active(None)
    torch.testing.assert_close(cm(**x), base)
    cm.set_active(["a", "b"])
    cm.delete_adapter("b")
    assert cm.adapters == ["a"] and cm.active == ["a"]
    torch.testing.assert_close(cm(**x), only_a)
    assert not torch.allclose(both, only_a)
    with pytest.raises(surgeon.SpecError, match="no adapter named 'c'"):
        cm.set_active("c")
    with pytest.raises(surgeon.SpecError, match="already exists"):
        cm.add_adapter("a", surgeon.LoRA(targets=("head",)))


def test_recompiling_keeps_parameter_objects():
    entry, cm = _compiled()
    before = [id(p) for p in cm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad])
    cm.set_active(None)
    cm.set_active("default")
    cm.merge()
    cm.unmerge()
    assert [id(p) for p in cm.parameters() if p.requires_grad] == before
    logits(cm(**entry.example())).sum().backward()
    optimizer.step()


def test_to_dtype_recompiles_the_casts():
    entry, cm = _compiled()
    x = entry.example()
    expected = logits(cm(**x))
    cm.to(torch.bfloat16)
    assert "to(" not in cm.graph.code()  # adapters are bf16 too now: no casts needed
    torch.testing.assert_close(logits(cm(**x)).float(), expected, rtol=0.1, atol=0.1)


def test_attributes_and_module_protocol_pass_through():
    _, cm = _compiled()
    assert cm.config.hidden_size == 32
    assert cm.get_input_embeddings() is cm.model.model.embed_tokens
    assert "store" in dict(cm.named_children())
    with pytest.raises(AttributeError):
        _ = cm.no_such_attribute


def test_num_trainable_counts_adapters_only():
    _, cm = _compiled("gpt2", targets=("c_attn",))
    # c_attn is Conv1D(32 -> 96): A is 2 x 32, B is 96 x 2, in each of 2 layers
    assert cm.num_trainable() == 2 * (2 * 32 + 96 * 2)


def test_inspect_table_lists_targets():
    _, cm = _compiled("llama", targets=("q_proj",))
    report = cm.inspect()
    text = str(report)
    header = text.splitlines()[0].split()
    assert header == ["target", "method", "adapter", "rank", "params", "region"]
    assert (
        "model.layers.1.self_attn.q_proj  lora    default     2     128  model.layers.1.self_attn.q_proj"
        in text
    )
    assert f"trainable params: {cm.num_trainable():,}" in text
    assert len(report.rows) == 2 and report.breaks


def test_inspect_counts_parameters_layers_share_once():
    """VB-LoRA's bank serves every layer: it is one row of its own, and the rows add up to the
    trainable count."""
    spec = surgeon.VBLoRA(rank=2, num_vectors=4, vector_length=4, targets=("body.0", "body.3"))
    cm = surgeon.compile(ZOO["mlp"].model(), spec)
    rows = cm.inspect().rows
    assert [r.target for r in rows][-1] == "(shared by 2 layers)" and rows[-1].params == 4 * 4
    assert sum(r.params for r in rows) == cm.num_trainable()


def test_graph_views():
    _, cm = _compiled("mlp", targets=("head",))
    g = cm.graph.to_networkx()
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    inserted = [n for n, d in g.nodes(data=True) if d["adapter"] == "default"]
    assert len(inserted) == 6  # lora_A, lora_B, two linears, mul, add
    assert nx.has_path(g, "<root>::head", "<root>::add")
    dot = cm.graph.to_dot()
    assert dot.startswith("digraph surgeon {") and dot.count("fillcolor") == 6
    assert "def forward" in cm.graph.code() and "lora_A" in cm.graph.code("")


def test_compile_refuses_bad_arguments():
    entry = ZOO["mlp"]
    with pytest.raises(surgeon.SpecError, match=r"expected a torch\.nn\.Module"):
        surgeon.compile("model", surgeon.LoRA())
    with pytest.raises(surgeon.SpecError, match=r"expected a surgeon\.Spec"):
        surgeon.compile(entry.model(), 42)
    cm = surgeon.compile(entry.model(), surgeon.LoRA(targets=("head",)))
    with pytest.raises(surgeon.SpecError, match="already compiled"):
        surgeon.compile(cm, surgeon.LoRA(targets=("head",)))


def test_failed_compile_leaves_the_model_unchanged():
    entry = ZOO["llama"]
    model = entry.model()
    before = logits(model(**entry.example()))
    spec = surgeon.Spec(
        {
            "ok": surgeon.LoRA(targets=("q_proj",), init="pissa"),
            "bad": surgeon.LoRA(targets=("q_proj", "nope")),
        }
    )
    with pytest.raises(surgeon.SpecError, match="'nope' matches no module"):
        surgeon.compile(model, spec)
    assert all(p.requires_grad for p in model.parameters())
    assert not any("forward" in vars(m) for m in model.modules())
    torch.testing.assert_close(logits(model(**entry.example())), before)


def test_a_failed_compile_leaves_no_hook_of_an_earlier_prompt_adapter():
    entry = ZOO["llama"]
    model = entry.model()
    spec = surgeon.Spec(
        {"prompt": surgeon.PromptTuning(num_virtual_tokens=2), "bad": surgeon.LoRA(targets=("no",))}
    )
    with pytest.raises(surgeon.SpecError, match="'no' matches no module"):
        surgeon.compile(model, spec)
    assert not model._forward_pre_hooks


def test_compile_selects_and_snapshots_each_adapter_once(monkeypatch):
    """Residual inits clone the targeted weights to undo a failed compile: once per adapter."""
    calls = {"select": 0, "snapshot_base": 0}
    for name in calls:
        original = getattr(surgeon.LoRA, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(surgeon.LoRA, name, counted)
    spec = {"a": surgeon.LoRA(targets=("q_proj",), init="pissa"), "b": surgeon.LoRA()}
    surgeon.compile(ZOO["llama"].model(), surgeon.Spec(spec))
    assert calls == {"select": 2, "snapshot_base": 2}


def test_spec_dict_compiles_like_objects():
    entry = ZOO["mlp"]
    a = surgeon.compile(entry.model(), {"method": "lora", "rank": 3, "targets": ["head"]})
    assert a.spec("default") == surgeon.LoRA(rank=3, targets=("head",))
