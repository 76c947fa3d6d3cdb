"""Region tracing: sound regions, recorded breaks, one trace per structure."""

from __future__ import annotations

import torch
from torch import nn
from zoo import ZOO, FunctionalDropoutMLP, OptionalMaskBlock, logits, randomize

import surgeon
from surgeon.trace import trace_regions


def test_a_whole_traceable_model_is_one_region():
    result = trace_regions(ZOO["mlp"].model())
    assert [(r.path, r.leaf) for r in result.regions] == [("", False)]
    assert result.breaks == []


def test_a_graph_that_freezes_the_training_flag_is_a_break():
    result = trace_regions(FunctionalDropoutMLP())
    (brk,) = result.breaks
    assert brk.path == "" and "training flag" in brk.reason
    assert sorted(r.path for r in result.regions) == ["fc1", "fc2"]
    assert all(r.leaf for r in result.regions)


def test_functional_dropout_still_follows_train_and_eval():
    torch.manual_seed(0)
    model = FunctionalDropoutMLP()
    cm = surgeon.compile(model, surgeon.LoRA(rank=2, targets=("fc1", "fc2")))
    randomize(cm)
    x = torch.randn(16, 6)
    cm.eval()
    torch.testing.assert_close(cm(x), cm(x))
    cm.train()
    assert not torch.allclose(cm(x), cm(x))


def test_a_graph_that_freezes_an_optional_argument_is_a_break():
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = OptionalMaskBlock()

        def forward(self, x, mask=None):
            return self.block(x, mask)

    torch.manual_seed(0)
    model = Outer()
    result = trace_regions(model)
    assert {b.path for b in result.breaks} == {"", "block"}
    assert all("mask" in b.reason and "None" in b.reason for b in result.breaks)
    cm = surgeon.compile(model, surgeon.LoRA(rank=2, targets=("proj",)))
    randomize(cm)
    x, mask = torch.randn(3, 6), torch.rand(3, 6)
    ((_, adapter),) = cm.store.items("default")

    for args, h in (((x, mask), x * mask), ((x,), x)):
        want = h @ model.block.proj.weight.T + model.block.proj.bias
        want = want + adapter.scale * (h @ adapter.lora_A.T @ adapter.lora_B.T)
        torch.testing.assert_close(cm(*args), want)


def test_hf_models_break_with_reasons_and_keep_every_target_reachable(zoo_entry):
    model = zoo_entry.model()
    cm = surgeon.compile(model, surgeon.LoRA(rank=2, targets=zoo_entry.targets))
    for brk in cm.graph.breaks:
        assert brk.reason and brk.module_type
    adapted = {p for r in cm.graph.regions for p in r.adapted}
    assert adapted == set(cm.store.paths["default"])
    cm.graph.check()


def test_identical_layers_share_one_traced_graph():
    result = trace_regions(ZOO["llama"].model())
    mlps = [r for r in result.regions if r.path.endswith(".mlp")]
    assert len(mlps) == 2 and mlps[0].base is mlps[1].base


def test_regions_per_decoder_layer_is_reported(zoo_entry):
    cm = surgeon.compile(zoo_entry.model(), surgeon.LoRA(rank=2, targets=zoo_entry.targets))
    per_layer = cm.graph.regions_per_layer()
    report = cm.inspect()
    if zoo_entry.hf:
        assert per_layer is not None and per_layer >= 1
        assert f"{per_layer:.1f} per decoder layer" in str(report)
    else:
        assert per_layer is None


def test_root_object_and_generate_survive():
    entry = ZOO["llama"]
    model = entry.model()
    cm = surgeon.compile(model, surgeon.LoRA(rank=2, targets=("q_proj", "v_proj")))
    randomize(cm)
    assert cm.config is model.config and isinstance(cm.model, type(model))
    ids = entry.example()["input_ids"][:1, :4]
    out = cm.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    # greedy decoding with the adapter equals greedy decoding step by step with the adapter
    step = ids
    for _ in range(5):
        nxt = logits(cm(input_ids=step))[:, -1].argmax(-1, keepdim=True)
        step = torch.cat([step, nxt], dim=1)
    assert torch.equal(out, step)


def test_keyword_arguments_pass_through():
    entry = ZOO["bert"]
    cm = surgeon.compile(entry.model(), surgeon.LoRA(rank=2, targets=("query", "value")))
    randomize(cm)
    ids = entry.example()["input_ids"]
    mask = torch.ones_like(ids)
    mask[:, -2:] = 0
    full = cm(
        input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), return_dict=True
    )
    assert not torch.allclose(full.logits, cm(input_ids=ids).logits)
    labels = torch.tensor([0, 2])
    assert cm(input_ids=ids, labels=labels).loss.ndim == 0
