"""Lowering and ONNX export, checked against onnxruntime on inputs of other sizes."""

from __future__ import annotations

import contextlib

import pytest
import torch
from zoo import ZOO, logits, randomize

import surgeon
from surgeon.export import lowered

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _compiled(name: str, dtype=torch.float32, **lora):
    entry = ZOO[name]
    targets = tuple(t for t in entry.targets if t != "wte")  # GPT-2 ties wte to lm_head
    cm = surgeon.compile(
        entry.model().to(dtype), surgeon.LoRA(**{"rank": 2, "targets": targets, **lora})
    )
    randomize(cm)
    return entry, cm


def _node_count_of_base_model(entry, tmp_path) -> int:
    plain = surgeon.compile(entry.model())
    return surgeon.export_onnx(plain, tmp_path / "base.onnx", entry.example(), verify=False).nodes


def test_exports_every_zoo_model_verified_and_lowered(zoo_entry, tmp_path):
    entry, cm = _compiled(zoo_entry.name)
    x = entry.example()
    before = logits(cm(**x))
    report = surgeon.export_onnx(cm, tmp_path / "model.onnx", x)
    assert report.provider == "CPUExecutionProvider"
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    # verification ran on other sizes than the example, along every dynamic axis
    for name, shape in report.verified_shapes.items():
        assert shape != tuple(x[name].shape)
    # the lowered graph holds only the base model's ops
    assert report.nodes == _node_count_of_base_model(entry, tmp_path)
    # and the compiled model is exactly as before
    torch.testing.assert_close(logits(cm(**x)), before, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.onnx", "model.onnx"]


def test_onnx_output_equals_the_unmerged_model_on_new_inputs(tmp_path):
    import onnxruntime as ort

    entry, cm = _compiled("llama")
    surgeon.export_onnx(cm, tmp_path / "m.onnx", entry.example())
    ids = torch.randint(3, 96, (4, 13))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        want = logits(cm(input_ids=ids))
    assert not torch.allclose(
        want, logits(entry.model()(input_ids=ids)), atol=1e-3
    )  # adapters matter
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


def test_lowering_leaves_the_original_parameters_untouched():
    entry, cm = _compiled("mlp")
    params = {n: (p, p.detach().clone()) for n, p in cm.model.named_parameters()}
    x = entry.example()
    unmerged = cm(**x)
    with lowered(cm) as plain:
        assert not any("forward" in vars(m) for m in plain.modules())
        torch.testing.assert_close(plain(**x), unmerged, rtol=1e-5, atol=1e-5)
    for name, p in cm.model.named_parameters():
        original, value = params[name]
        assert p is original and torch.equal(p, value)


def test_several_active_adapters_all_fold_in(tmp_path):
    entry = ZOO["mlp"]
    cm = surgeon.compile(
        entry.model(),
        surgeon.Spec(
            {"a": surgeon.LoRA(targets=("head",)), "b": surgeon.LoRA(targets=("head", "body.0"))}
        ),
    )
    randomize(cm)
    report = surgeon.export_onnx(cm, tmp_path / "m.onnx", entry.example())
    assert report.max_abs_diff < 1e-4


def test_half_precision_exports(tmp_path):
    entry, cm = _compiled("llama", dtype=torch.float16)
    report = surgeon.export_onnx(cm, tmp_path / "m.onnx", entry.example())
    assert report.max_abs_diff < 2e-2


def test_bfloat16_without_kernels_is_a_clear_error_and_leaves_nothing(tmp_path):
    entry, cm = _compiled("llama", dtype=torch.bfloat16)
    with pytest.raises(surgeon.ExportError, match="bfloat16"):
        surgeon.export_onnx(cm, tmp_path / "m.onnx", entry.example())
    assert list(tmp_path.iterdir()) == []
    report = surgeon.export_onnx(cm, tmp_path / "m.onnx", entry.example(), verify=False)
    assert report.max_abs_diff is None and (tmp_path / "m.onnx").exists()


def test_failed_verification_names_the_output_and_leaves_nothing(tmp_path, monkeypatch):
    entry, cm = _compiled("bert")
    monkeypatch.setattr("surgeon.export.lowered", _lowered_without_adapters)
    with pytest.raises(surgeon.ExportError, match=r"output 'logits' differs from PyTorch by up to"):
        surgeon.export_onnx(cm, tmp_path / "m.onnx", entry.example())
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def _lowered_without_adapters(cm):
    """A deliberately wrong lowering: drops the adapters instead of folding them."""
    with cm.disabled():
        yield cm.model


def test_fixed_shapes_and_named_axes(tmp_path):
    import onnx

    entry, cm = _compiled("bert")
    x = entry.example()
    fixed = surgeon.export_onnx(cm, tmp_path / "fixed.onnx", x, dynamic=False)
    assert fixed.verified_shapes == {"input_ids": tuple(x["input_ids"].shape)}
    named = surgeon.export_onnx(cm, tmp_path / "named.onnx", x, dynamic={"input_ids": {0: "n"}})
    dims = onnx.load(str(tmp_path / "named.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "n" and dims[1].dim_value == x["input_ids"].shape[1]
    assert named.verified_shapes["input_ids"][1] == x["input_ids"].shape[1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"path": "model.bin"}, "should end in .onnx"),
        ({"example_inputs": [1, 2]}, "must be a dict"),
        ({"example_inputs": {"x": [1.0]}}, r"example_inputs\['x'\] is list"),
        ({"dynamic": {"y": {0: "b"}}}, "dynamic names inputs"),
    ],
)
def test_bad_arguments_are_spec_errors(tmp_path, kwargs, match):
    entry, cm = _compiled("mlp")
    args = {"path": tmp_path / "m.onnx", "example_inputs": entry.example(), **kwargs}
    if isinstance(args["path"], str):
        args["path"] = tmp_path / args["path"]
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.export_onnx(cm, **args)
    assert list(tmp_path.iterdir()) == []


def test_encoder_decoder_exports_with_separate_sequence_axes(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
    )
    cm = surgeon.compile(
        T5ForConditionalGeneration(config).eval(), surgeon.LoRA(rank=2, targets=("q", "v"))
    )
    randomize(cm)
    x = {
        "input_ids": torch.randint(1, 64, (2, 7)),
        "decoder_input_ids": torch.randint(1, 64, (2, 5)),
    }
    report = surgeon.export_onnx(cm, tmp_path / "t5.onnx", x)
    assert report.outputs[0] == "logits" and report.max_abs_diff < 1e-4
    assert report.verified_shapes["input_ids"][1] != report.verified_shapes["decoder_input_ids"][1]


def test_vision_model_exports(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    cm = surgeon.compile(
        ViTForImageClassification(config).eval(), surgeon.LoRA(rank=2, targets="attention")
    )
    randomize(cm)
    report = surgeon.export_onnx(
        cm,
        tmp_path / "vit.onnx",
        {"pixel_values": torch.randn(2, 3, 16, 16)},
        dynamic={"pixel_values": {0: "batch"}},
    )
    assert report.max_abs_diff < 1e-4 and report.verified_shapes == {"pixel_values": (3, 3, 16, 16)}


def test_large_models_keep_weights_in_a_side_file(tmp_path, monkeypatch):
    monkeypatch.setattr("surgeon.export._needs_external_data", lambda model: True)
    entry, cm = _compiled("mlp")
    report = surgeon.export_onnx(cm, tmp_path / "m.onnx", entry.example())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert report.file_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())
