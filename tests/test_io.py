"""Adapter files: PEFT parity both ways on every zoo model, atomic saves, refusing bad files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from zoo import FAMILIES, ZOO, logits, padded_ids, peft_loaded, peft_model, randomize, tiny_family

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME

peft = pytest.importorskip("peft")


def _bump_trainable_base(cm) -> None:
    with torch.no_grad():
        for p in cm.model.parameters():
            if p.requires_grad:
                p.add_(0.25)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_saved_by_surgeon_loads_in_peft_with_same_outputs(zoo_entry, bias, tmp_path):
    cm = surgeon.compile(
        zoo_entry.model(), surgeon.LoRA(rank=2, alpha=4, targets=zoo_entry.targets, bias=bias)
    )
    randomize(cm)
    _bump_trainable_base(cm)
    x = zoo_entry.example()
    expected = logits(cm(**x))
    assert not torch.allclose(
        expected, logits(zoo_entry.model()(**x)), atol=1e-3
    )  # adapters matter
    cm.save_adapters(tmp_path)
    loaded = peft_loaded(zoo_entry.model(), tmp_path)
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_saved_by_peft_loads_in_surgeon_with_same_outputs(zoo_entry, bias, tmp_path):
    config = peft.LoraConfig(target_modules=list(zoo_entry.targets), r=3, lora_alpha=5, bias=bias)
    pm = peft_model(zoo_entry.model(), config, scale=0.1)
    x = zoo_entry.example()
    expected = logits(pm(**x))
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(zoo_entry.model(), tmp_path)
    assert not torch.allclose(expected, logits(zoo_entry.model()(**x)), atol=1e-3)
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-5)


def _family(name: str):
    torch.manual_seed(0)
    return tiny_family(name).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_all_linear_peft_files_of_other_families_load_with_same_outputs(name, tmp_path):
    """PEFT's ``all-linear`` picks the same layers as ours on each family (its output head
    left out), and its file gives the same outputs once loaded."""
    pm = peft_model(_family(name), peft.LoraConfig(r=4, target_modules="all-linear"), seed=None)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(n)))
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(_family(name), tmp_path)
    inputs = padded_ids()
    if name in ("t5", "bart"):
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :4].contiguous()
    with torch.no_grad():
        expected = logits(pm(**inputs))
        torch.testing.assert_close(logits(cm(**inputs)), expected, rtol=0, atol=1e-6)
    theirs = {n for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {p for p, _ in cm.store.items("default")} == {
        n.removeprefix("base_model.model.") for n in theirs
    }


@pytest.mark.parametrize(
    "config",
    [
        {"use_rslora": True},
        {"rank_pattern": {"v_proj": 5}, "alpha_pattern": {"q_proj": 3}},
        {"layers_to_transform": [1]},
        {"init_lora_weights": "gaussian"},
    ],
    ids=["rslora", "patterns", "layers", "gaussian"],
)
def test_peft_config_variants_load_with_same_outputs(config, tmp_path):
    entry = ZOO["llama"]
    lora = peft.LoraConfig(target_modules=list(entry.targets), r=4, lora_alpha=8, **config)
    pm = peft_model(entry.model(), lora, scale=0.1)
    x = entry.example()
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path)
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_round_trip_with_peft(init, tmp_path):
    entry = ZOO["llama"]
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init
    )
    pm = peft_model(entry.model(), config, seed=None)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.mul_(1.1)
    x = entry.example()
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path)
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "selection",
    [
        {"targets": "all-linear", "layers": [1]},
        {"targets": "all-linear", "exclude": "attention"},
        {"targets": "mlp"},
        {"targets": r".*\.(q|v)_proj", "exclude": ["layers.0.self_attn.q_proj"]},
    ],
    ids=["regex-with-layers", "preset-exclude", "preset", "regex-exclude"],
)
def test_selectors_peft_lacks_are_saved_as_the_chosen_paths(selection, tmp_path):
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), surgeon.LoRA(rank=2, **selection))
    randomize(cm)
    cm.save_adapters(tmp_path)
    loaded = peft_loaded(entry.model(), tmp_path)
    adapted = sorted(
        n.removeprefix("base_model.model.")
        for n, m in loaded.named_modules()
        if hasattr(m, "lora_A")
    )
    assert adapted == sorted(cm.store.paths["default"])
    x = entry.example()
    torch.testing.assert_close(logits(loaded(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-5)
    back = surgeon.load(entry.model(), tmp_path)
    assert back.store.paths["default"] == cm.store.paths["default"]


def test_surgeon_round_trip_keeps_every_tensor(tmp_path):
    entry = ZOO["gpt2"]
    cm = surgeon.compile(entry.model(), surgeon.LoRA(rank=2, targets=entry.targets))
    randomize(cm)
    cm.save_adapters(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert all(k.startswith("base_model.model.transformer.") for k in saved)
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in saved
    assert "base_model.model.transformer.wte.lora_embedding_A" in saved
    back = surgeon.load(entry.model(), tmp_path)
    for (p1, l1), (p2, l2) in zip(cm.store.items("default"), back.store.items("default")):
        assert p1 == p2
        assert torch.equal(l1.lora_A, l2.lora_A) and torch.equal(l1.lora_B, l2.lora_B)


def test_extra_adapters_go_to_subdirectories(tmp_path):
    entry = ZOO["mlp"]
    cm = surgeon.compile(
        entry.model(),
        surgeon.Spec(
            {
                "default": surgeon.LoRA(targets=("head",)),
                "other": surgeon.LoRA(rank=3, targets=("body.0",)),
            }
        ),
    )
    cm.save_adapters(tmp_path)
    assert (tmp_path / CONFIG_NAME).exists() and (tmp_path / "other" / WEIGHTS_NAME).exists()
    assert json.loads((tmp_path / "other" / CONFIG_NAME).read_text())["r"] == 3
    back = surgeon.load(entry.model(), tmp_path / "other", name="other")
    assert back.adapters == ["other"] and back.store.paths["other"] == ["body.0"]


def _saved(tmp_path, entry_name="mlp"):
    entry = ZOO[entry_name]
    cm = surgeon.compile(entry.model(), surgeon.LoRA(rank=2, targets=entry.targets))
    randomize(cm)
    cm.save_adapters(tmp_path)
    return entry


def _assert_untouched(model, reference_state, entry):
    assert all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference_state[k]), k
    assert not any("forward" in vars(m) for m in model.modules())
    torch.testing.assert_close(
        logits(model(**entry.example())), logits(entry.model()(**entry.example()))
    )


def _load_fails(tmp_path, entry, match):
    model = entry.model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.load(model, tmp_path)
    _assert_untouched(model, state, entry)


def test_pickle_only_directory_is_refused(tmp_path):
    entry = _saved(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _load_fails(tmp_path, entry, "never unpickles")


def test_truncated_weights_are_refused(tmp_path):
    entry = _saved(tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    _load_fails(tmp_path, entry, "truncated or corrupt")


def test_missing_keys_are_refused(tmp_path):
    entry = _saved(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors.pop("base_model.model.head.lora_B.weight")
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    _load_fails(tmp_path, entry, r"missing key\(s\), e.g. base_model.model.head.lora_B.weight")


def test_wrong_shapes_are_refused(tmp_path):
    entry = _saved(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["base_model.model.head.lora_A.weight"] = torch.zeros(2, 7)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    _load_fails(
        tmp_path, entry, r"head.lora_A.weight has shape \(2, 7\), the model needs \(2, 24\)"
    )


def test_adapter_for_another_model_is_refused(tmp_path):
    _saved(tmp_path, "cnn")
    _load_fails(tmp_path, ZOO["mlp"], "matches no module")


def test_malformed_config_is_refused(tmp_path):
    entry = _saved(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    _load_fails(tmp_path, entry, "malformed JSON")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("use_qalora", True, "use_qalora=True selects a variant"),
        ("modules_to_save", ["head"], "is also a target of the method"),
        (
            "init_lora_weights",
            "pissa_niter_x",
            "init_lora_weights='pissa_niter_x' is not supported",
        ),
        ("peft_type", "NO_SUCH_METHOD", "peft_type='NO_SUCH_METHOD' is not supported"),
        ("use_fancy_thing", True, "looks like a variant switch"),
    ],
)
def test_config_fields_that_change_the_math_are_refused(tmp_path, field, value, match):
    entry = _saved(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config[field] = value
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    _load_fails(tmp_path, entry, match)


def test_config_fields_that_do_not_change_the_math_are_ignored(tmp_path):
    entry = _saved(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config.update(
        {
            "task_type": "CAUSAL_LM",
            "megatron_core": "megatron.core",
            "eva_config": None,
            "fan_in_fan_out": True,
            "qalora_group_size": 16,
            "some_future_field": None,
        }
    )
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    surgeon.load(entry.model(), tmp_path)
    config["a_new_harmless_field"] = "x"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        surgeon.load(entry.model(), tmp_path)
    assert any("a_new_harmless_field" in str(w.message) for w in caught)


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    entry = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    cm = surgeon.compile(entry.model(), surgeon.LoRA(rank=2, targets=entry.targets))
    randomize(cm, seed=9)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        cm.save_adapters(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no temporary file left behind either


def test_saved_files_get_the_mode_a_plain_write_gives(tmp_path):
    """The atomic save stages in a private temporary file: the result must not stay private."""
    _saved(tmp_path)
    plain = tmp_path / "plain"
    plain.write_text("x")
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes[CONFIG_NAME] == modes[WEIGHTS_NAME] == modes["plain"]


def test_missing_directory_is_a_clear_io_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        surgeon.load(ZOO["mlp"].model(), tmp_path / "nope")


# -- files saved before ------------------------------------------------------------------------

SAVED_BEFORE = Path(__file__).parent / "data" / "adapters_v0.1"


@pytest.mark.parametrize("name", sorted(p.name for p in SAVED_BEFORE.iterdir()))
def test_files_saved_by_surgeon_0_1_load_with_the_outputs_they_had(name):
    """Adapters saved before the method kit (commit f6c61e5), with the outputs the saving model
    gave: their configs and keys still mean the same."""
    folder = SAVED_BEFORE / name
    saved = load_file(folder / "expected.safetensors")
    expected = saved.pop("expected")
    cm = surgeon.load(ZOO[(folder / "model.txt").read_text().strip()].model(), folder).eval()
    out = cm(**saved)
    torch.testing.assert_close(getattr(out, "logits", out), expected, rtol=1e-5, atol=1e-6)
