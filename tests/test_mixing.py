"""One spec, different methods on different modules: both run, both show in the graph and report."""

from __future__ import annotations

import torch
from zoo import ZOO, logits, randomize

import surgeon


def test_lora_on_attention_and_ia3_on_the_mlp(tmp_path):
    entry = ZOO["llama"]
    spec = surgeon.Spec(
        {
            "attn": surgeon.LoRA(rank=2, targets="attention"),
            "mlp": surgeon.IA3(targets=("up_proj", "down_proj"), feedforward=("down_proj",)),
        }
    )
    cm = surgeon.compile(entry.model(), spec)
    randomize(cm)
    x = entry.example()
    both = logits(cm(**x))
    table = str(cm.inspect())
    assert "model.layers.0.self_attn.q_proj" in table and "lora" in table
    assert "model.layers.0.mlp.down_proj" in table and "ia3" in table
    mlp_code = cm.graph.code("model.layers.0.mlp")
    assert "adapters.mlp.down_proj.ia3_l" in mlp_code and "lora_A" not in mlp_code
    assert "adapters.attn.lora_A" in cm.graph.code("model.layers.0.self_attn.q_proj")
    # each adapter alone changes the output; together they are what runs
    cm.set_active("attn")
    only_attn = logits(cm(**x))
    cm.set_active("mlp")
    only_mlp = logits(cm(**x))
    assert not torch.allclose(only_attn, both) and not torch.allclose(only_mlp, both)
    cm.set_active(["attn", "mlp"])
    cm.merge()
    torch.testing.assert_close(logits(cm(**x)), both, rtol=1e-4, atol=1e-4)
    cm.unmerge()
    cm.save_adapters(tmp_path)
    back = surgeon.load(entry.model(), tmp_path / "attn", name="attn")
    back.load_adapters(tmp_path / "mlp", name="mlp")
    back.set_active(["attn", "mlp"])
    torch.testing.assert_close(logits(back(**x)), both, rtol=1e-5, atol=1e-5)
