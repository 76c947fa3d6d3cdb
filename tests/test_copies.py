"""``modules_to_save``: trained full copies of layers (a new classification head), as in PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from zoo import peft_loaded, peft_model, tiny_bert, tiny_llama

import surgeon

IDS = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])


def bert_pair():
    torch.manual_seed(0)
    model = tiny_bert().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def fresh():
        twin = tiny_bert().eval()
        twin.load_state_dict(state)
        return twin

    return model, fresh


def trained(cm, std=0.3):
    with torch.no_grad():
        for p in cm.store.parameters():
            p.normal_(0, std)
    return cm


def logits(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits


def test_copy_replaces_the_head_while_the_adapter_runs_and_the_original_stays():
    model, _ = bert_pair()
    before = logits(model)
    spec = surgeon.LoRA(rank=2, targets=("query", "value"), modules_to_save=("classifier",))
    cm = surgeon.compile(model, spec).eval()
    torch.testing.assert_close(logits(cm), before)  # the copy starts equal to the original
    trained(cm)
    assert not torch.allclose(logits(cm), before)
    with cm.disabled():
        torch.testing.assert_close(logits(cm), before)
    rows = {r.target: r.method for r in cm.inspect().rows}
    assert (
        rows["classifier"] == "copy" and rows["bert.encoder.layer.0.attention.self.query"] == "lora"
    )


def test_only_the_copy_gets_gradients():
    model, _ = bert_pair()
    cm = surgeon.compile(
        model, surgeon.LoRA(rank=2, targets=("query",), modules_to_save="classifier")
    )
    cm.train()
    cm(input_ids=IDS, labels=torch.tensor([0, 2])).loss.backward()
    assert model.classifier.weight.grad is None and not model.classifier.weight.requires_grad
    copy = dict(cm.store.items("default"))["classifier"].copy
    assert copy.weight.grad is not None and copy.bias.grad is not None


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_peft_sequence_classification_files_load_both_ways(tmp_path, method):
    peft = pytest.importorskip("peft")
    model, fresh = bert_pair()
    config = (
        peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=2)
        if method == "lora"
        else peft.IA3Config(
            task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
            feedforward_modules=["output.dense"],
        )
    )  # fmt: skip
    pm = peft_model(model, config, seed=None)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    want = logits(pm)
    pm.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())[
        "modules_to_save"
    ] == ["classifier", "score"]  # PEFT names every head; this BERT has no "score"

    cm = surgeon.load(fresh(), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(cm), want, atol=1e-6, rtol=1e-5)
    assert cm.spec("default").modules_to_save == ("classifier",)

    cm.save_adapters(tmp_path / "ours")
    back = peft_loaded(fresh(), tmp_path / "ours")
    torch.testing.assert_close(logits(back), want, atol=1e-6, rtol=1e-5)


def test_merge_unmerge_and_unload_fold_the_copy_in():
    model, _ = bert_pair()
    original = model.classifier.weight.detach().clone()
    cm = trained(
        surgeon.compile(
            model, surgeon.LoRA(rank=2, targets=("query",), modules_to_save=["classifier"])
        ).eval()
    )
    want = logits(cm)
    cm.merge()
    torch.testing.assert_close(logits(cm), want, atol=1e-6, rtol=1e-5)
    cm.unmerge()
    assert torch.equal(model.classifier.weight, original)
    plain = cm.merge_and_unload()
    torch.testing.assert_close(logits(plain), want, atol=1e-6, rtol=1e-5)


def test_each_adapter_has_its_own_head_and_mixed_batches_use_each():
    model, _ = bert_pair()
    cm = surgeon.compile(
        model,
        surgeon.Spec(
            adapters={
                "a": surgeon.LoRA(rank=2, targets=("query",), modules_to_save=("classifier",)),
                "b": surgeon.LoRA(rank=2, targets=("query",), modules_to_save=("classifier",)),
            }
        ),
    ).eval()
    trained(cm)
    outs = {}
    for name in ("a", "b"):
        cm.set_active(name)
        outs[name] = logits(cm)
    assert not torch.allclose(outs["a"], outs["b"])
    mixed = logits(cm, adapter_names=["a", "b"])
    torch.testing.assert_close(mixed[0], outs["a"][0])
    torch.testing.assert_close(mixed[1], outs["b"][1])


def test_a_module_with_several_layers_is_copied_layer_by_layer():
    cm = surgeon.compile(
        tiny_llama(), surgeon.LoRA(rank=2, targets=("q_proj",), modules_to_save=("layers.1.mlp",))
    )
    copies = sorted(r.target for r in cm.inspect().rows if r.method == "copy")
    assert copies == [f"model.layers.1.mlp.{n}" for n in ("down_proj", "gate_proj", "up_proj")]


@pytest.mark.parametrize(
    ("modules_to_save", "targets", "message"),
    [
        (("clasifier",), ("query",), "'clasifier' matches no module"),
        (("classifier",), ("query", "classifier"), "is also a target of the method"),
        (("attention.output",), ("query",), "holds parameters outside Linear/Conv/Embedding"),
        ([""], ("query",), "expected a list of module names"),
    ],
)
def test_bad_modules_to_save_are_spec_errors_and_change_nothing(modules_to_save, targets, message):
    model, _ = bert_pair()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(surgeon.SpecError, match=message):
        surgeon.compile(
            model, surgeon.LoRA(rank=2, targets=targets, modules_to_save=modules_to_save)
        )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert "forward" not in vars(model.classifier)


def test_weighted_merging_refuses_adapters_with_copies():
    model, _ = bert_pair()
    spec = surgeon.LoRA(rank=2, targets=("query",), modules_to_save=("classifier",))
    cm = surgeon.compile(model, surgeon.Spec(adapters={"a": spec, "b": spec}))
    with pytest.raises(surgeon.SpecError, match="modules_to_save"):
        cm.merge_adapters({"a": 0.5, "b": 0.5}, name="ab")


def test_spec_files_carry_modules_to_save(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("method: lora\ntargets: [fc]\nmodules_to_save: [fc2]\n")
    assert surgeon.load_spec(path).adapters["default"].modules_to_save == ("fc2",)
