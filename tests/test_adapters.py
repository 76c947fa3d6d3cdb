"""Several adapters: switching, disabling, mixed batches and hot swap, against PEFT."""

from __future__ import annotations

import pytest
import torch
from zoo import ZOO, add_noise, logits, peft_model

import surgeon

peft = pytest.importorskip("peft")


@pytest.fixture
def pair(tmp_path):
    """PEFT and surgeon with the same two adapters ("a" on q,v rank 2; "b" on q,o rank 3)."""
    entry = ZOO["llama"]
    pm = peft_model(
        entry.model(),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
        seed=None,
        adapter_name="a",
    )
    pm.add_adapter("b", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "o_proj"]))
    # both adapters' factors (PEFT trains only the active adapter's)
    add_noise((p for n, p in pm.named_parameters() if "lora_" in n), seed=0, scale=0.1)
    pm.eval()
    pm.save_pretrained(
        tmp_path
    )  # "a" -> tmp_path/a, "b" -> tmp_path/b (no adapter is named default)
    cm = surgeon.load(entry.model(), tmp_path / "a", name="a")
    cm.load_adapters(tmp_path / "b", name="b")
    return entry, pm, cm


def test_switching_matches_peft(pair):
    entry, pm, cm = pair
    x = entry.example()
    for name in ("a", "b", "a"):
        pm.set_adapter(name)
        cm.set_active(name)
        torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)


def test_disabling_matches_peft(pair):
    entry, pm, cm = pair
    x = entry.example()
    with pm.disable_adapter(), cm.disabled():
        torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits(cm(**x)), logits(entry.model()(**x)))


def test_two_active_adapters_add_up_like_peft(pair):
    entry, pm, cm = pair
    x = entry.example()
    pm.base_model.set_adapter(["a", "b"])
    cm.set_active(["a", "b"])
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "names", [["a", "b", "__base__", "a"], ["b", "b", "b", "b"], ["__base__"] * 4]
)
def test_mixed_batch_rows_equal_single_adapter_runs_and_peft(pair, names):
    _entry, pm, cm = pair
    ids = torch.randint(3, 96, (4, 6))
    mixed = logits(cm(input_ids=ids, adapter_names=names))
    torch.testing.assert_close(
        mixed, logits(pm(input_ids=ids, adapter_names=names)), rtol=1e-5, atol=1e-5
    )
    for row, name in enumerate(names):
        if name == "__base__":
            with cm.disabled():
                single = logits(cm(input_ids=ids[row : row + 1]))
        else:
            cm.set_active(name)
            single = logits(cm(input_ids=ids[row : row + 1]))
        torch.testing.assert_close(mixed[row : row + 1], single, rtol=1e-5, atol=1e-5)
    assert cm.graph.code().count("index_copy") == 0  # the normal graph is back after the call


def test_mixed_batch_graph_gathers_and_scatters(pair):
    _entry, _pm, cm = pair
    cm._install(("a", "b"), mixed=True)
    code = cm.graph.code("model.layers.0.self_attn.q_proj")
    assert code.count("batch_rows(") == 2 and code.count("index_copy(") == 2
    cm._recompile()


def test_mixed_batch_generate(pair):
    _entry, pm, cm = pair
    ids = torch.randint(3, 96, (2, 4))
    names = ["a", "b"]
    ours = cm.generate(
        input_ids=ids, adapter_names=names, max_new_tokens=4, do_sample=False, pad_token_id=0
    )
    theirs = pm.generate(
        input_ids=ids, adapter_names=names, max_new_tokens=4, do_sample=False, pad_token_id=0
    )
    assert torch.equal(ours, theirs)


def test_mixed_batch_errors(pair):
    _entry, _pm, cm = pair
    ids = torch.randint(3, 96, (2, 4))
    with pytest.raises(surgeon.SpecError, match="no adapter named 'c'"):
        cm(input_ids=ids, adapter_names=["a", "c"])
    with pytest.raises(
        surgeon.SpecError, match="adapter_names has 3 entries but the batch has 2 rows"
    ):
        cm(input_ids=ids, adapter_names=["a", "b", "a"])
    with pytest.raises(surgeon.SpecError, match="one adapter name per batch row"):
        cm(input_ids=ids, adapter_names="a")
    torch.testing.assert_close(logits(cm(input_ids=ids)), logits(cm(input_ids=ids)))  # still usable


def test_switching_reuses_rewrites_and_parameters(pair):
    _entry, _pm, cm = pair
    params = [id(p) for p in cm.parameters()]
    cm.set_active("b")
    holders = [r.gm for r in cm.graph.regions]
    cm.set_active("a")
    cm.set_active("b")
    assert [r.gm for r in cm.graph.regions] == holders  # the cached rewrite, not a new one
    assert [id(p) for p in cm.parameters()] == params


def test_hotswap_replaces_weights_in_place(pair, tmp_path):
    entry, _pm, cm = pair
    x = entry.example()
    other = peft_model(
        entry.model(),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
        seed=7,
        scale=0.1,
    )
    other.save_pretrained(tmp_path / "new")
    cm.set_active("a")
    params = {id(p) for p in cm.store.parameters()}
    holders = [r.gm for r in cm.graph.regions]
    cm.hotswap_adapter(tmp_path / "new", "a")
    torch.testing.assert_close(logits(cm(**x)), logits(other(**x)), rtol=1e-5, atol=1e-5)
    assert {id(p) for p in cm.store.parameters()} == params
    assert [r.gm for r in cm.graph.regions] == holders


def test_hotswap_with_another_alpha_recompiles(pair, tmp_path):
    entry, _pm, cm = pair
    other = peft_model(
        entry.model(),
        peft.LoraConfig(r=2, lora_alpha=9, target_modules=["q_proj", "v_proj"]),
        seed=8,
        scale=0.1,
    )
    other.save_pretrained(tmp_path / "new")
    cm.set_active("a")
    cm.hotswap_adapter(tmp_path / "new", "a")
    torch.testing.assert_close(
        logits(cm(**entry.example())), logits(other(**entry.example())), rtol=1e-5, atol=1e-5
    )


def test_hotswap_refuses_a_different_shape_and_keeps_the_adapter(pair, tmp_path):
    entry, _pm, cm = pair
    other = peft_model(
        entry.model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=None
    )
    other.save_pretrained(tmp_path / "new")
    cm.set_active("a")
    before = logits(cm(**entry.example()))
    with pytest.raises(surgeon.SpecError, match=r"differs from adapter 'a' in alpha, rank"):
        cm.hotswap_adapter(tmp_path / "new", "a")
    torch.testing.assert_close(logits(cm(**entry.example())), before)


def test_merging_drops_values_kept_for_eval():
    """A value an adapter keeps between eval calls (DoRA's weight norm here) is not read while
    merged: merging lets memory go of it, and unmerged calls compute it again."""
    from surgeon.adapter import Cached

    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), surgeon.DoRA(rank=4, targets=("q_proj", "v_proj"))).eval()
    add_noise(p for n, p in cm.named_parameters() if p.requires_grad)
    x = entry.example()
    with torch.no_grad():
        before = logits(cm(**x))
    caches = [m for m in cm.modules() if isinstance(m, Cached)]
    assert caches and all(c._kept is not None for c in caches)
    cm.merge()
    assert all(c._kept is None for c in caches)
    cm.unmerge()
    with torch.no_grad():
        torch.testing.assert_close(logits(cm(**x)), before, rtol=1e-5, atol=1e-5)
