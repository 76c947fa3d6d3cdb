"""Lowering and ONNX export, checked against onnxruntime on inputs of other sizes."""

from __future__ import annotations

import contextlib
import logging
import re

import pytest
import torch
from torch import nn
from zoo import ZOO, logits, randomize

import surgeon
from surgeon.export import default_axes, lowered

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


SLOW_EXPORTS = ("bert", "llama")


@pytest.mark.parametrize(
    "name",
    # slow: Llama's exports are verified in
    # test_onnx_output_equals_the_unmerged_model_on_new_inputs, BERT's (all-MiniLM-L6-v2,
    # adapted) by the demo and the export example
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_EXPORTS else n for n in sorted(ZOO)],
)
def test_exports_every_zoo_model_verified_and_lowered(name, tmp_path):
    entry, cm = _compiled(name)
    x = entry.example()
    before = logits(cm(**x))
    report = surgeon.export_onnx(cm, tmp_path / "model.onnx", x)
    assert report.provider == "CPUExecutionProvider"
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    # verification ran on other sizes than the example, along every dynamic axis
    for name, shape in report.verified_shapes.items():
        assert shape != tuple(x[name].shape)
    assert report.static_axes == {}  # each zoo model takes other sizes on every default axis
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


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_bfloat16_without_kernels_is_a_clear_error_and_leaves_nothing(name, tmp_path):
    """onnxruntime's CPU provider lacks bfloat16 matmuls (a missing kernel) and convolutions
    (an invalid type); the bfloat16 inputs themselves reach it (numpy has no bfloat16)."""
    entry, cm = _compiled(name, dtype=torch.bfloat16)
    x = {k: v.to(torch.bfloat16) for k, v in entry.example().items()}
    with pytest.raises(surgeon.ExportError, match="no bfloat16 kernel"):
        surgeon.export_onnx(cm, tmp_path / "m.onnx", x)
    assert list(tmp_path.iterdir()) == []
    report = surgeon.export_onnx(cm, tmp_path / "m.onnx", x, verify=False)
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
        ({"dynamic": {"x": {2: "b"}}}, r"dynamic\['x'\] names axis 2, but x has 2 axes"),
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


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    return ViTForImageClassification(config), "attention", {"pixel_values": (2, 3, 16, 16)}


def _clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return CLIPVisionModel(config), ("q_proj", "v_proj"), {"pixel_values": (2, 3, 16, 16)}


def _whisper_config(**extra):
    from transformers import WhisperConfig

    return WhisperConfig(
        num_mel_bins=8,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=8,  # the encoder takes exactly 2 * 8 mel frames
        max_target_positions=16,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        **extra,
    )


def _whisper_audio_classification():
    from transformers import WhisperForAudioClassification

    model = WhisperForAudioClassification(_whisper_config(num_labels=3))
    return model, ("q_proj", "v_proj"), {"input_features": (2, 8, 16)}


def _whisper_encoder():
    from transformers import WhisperModel

    model = WhisperModel(_whisper_config()).get_encoder()
    return model, ("q_proj", "v_proj"), {"input_features": (2, 8, 16)}


def _resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    return ResNetForImageClassification(config), ("convolution",), {"pixel_values": (2, 3, 32, 32)}


def _compiled_with_inputs(build):
    torch.manual_seed(0)
    model, targets, shapes = build()
    cm = surgeon.compile(model.eval(), surgeon.LoRA(rank=2, targets=targets))
    randomize(cm)
    return cm, {name: torch.randn(shape) for name, shape in shapes.items()}


@pytest.fixture(scope="module")
def vit():
    return _compiled_with_inputs(_vit)


def test_vision_model_exports_with_its_image_size_static(vit, tmp_path, caplog):
    import onnx

    cm, x = vit
    with caplog.at_level(logging.DEBUG, logger="surgeon.export"):
        report = surgeon.export_onnx(cm, tmp_path / "vit.onnx", x)
    assert report.max_abs_diff < 1e-4 and report.verified_shapes == {"pixel_values": (3, 3, 16, 16)}
    dims = onnx.load(str(tmp_path / "vit.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 16, 16]
    # ViT refuses other image sizes: both spatial axes stay static, with the model's reason
    assert list(report.static_axes) == ["pixel_values"]
    reasons = report.static_axes["pixel_values"]
    assert sorted(reasons) == [2, 3]
    assert all(r.startswith("ValueError: Input image size") for r in reasons.values())
    assert f"pixel_values axis 2 static ({reasons[2]})" in str(report)
    logged = [r.getMessage() for r in caplog.records if r.name == "surgeon.export"]
    assert f"export_onnx: pixel_values axis 3 stays static: {reasons[3]}" in logged


def test_a_dynamic_axis_the_model_refuses_is_a_clear_error(vit, tmp_path):
    cm, x = vit
    dynamic = {"pixel_values": {0: "batch", 2: "height", 3: "width"}}
    with pytest.raises(surgeon.ExportError) as caught:
        surgeon.export_onnx(cm, tmp_path / "vit.onnx", x, dynamic=dynamic)
    message = str(caught.value)
    assert message.startswith(
        "export_onnx: pixel_values axis 2 ('height') cannot be dynamic: ValueError: Input image "
        "size (18*16) doesn't match model (16*16); pixel_values axis 3 ('width') cannot be"
    )
    assert message.endswith("Pass dynamic={'pixel_values': {0: 'batch'}} instead")
    assert not isinstance(caught.value.__cause__, surgeon.ExportError)
    assert list(tmp_path.iterdir()) == []


class _LengthSwitch(nn.Module):
    """Takes any length, but its code branches on it: torch.export fixes that axis."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.proj(self.embed(ids))
        return hidden.sum(1) if ids.shape[1] == 6 else hidden.mean(1)


def test_an_axis_torch_export_fixes_stays_static_or_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    cm = surgeon.compile(_LengthSwitch().eval(), surgeon.LoRA(rank=2, targets=("proj",)))
    randomize(cm)
    x = {"ids": torch.randint(0, 10, (2, 6))}
    report = surgeon.export_onnx(cm, tmp_path / "m.onnx", x)
    assert report.static_axes == {"ids": {1: "torch.export fixed it at 6 while tracing"}}
    assert report.verified_shapes == {"ids": (3, 6)} and report.max_abs_diff < 1e-4
    asked = {"ids": {0: "batch", 1: "sequence"}}
    with pytest.raises(
        surgeon.ExportError,
        match=re.escape(
            "ids axis 1 ('sequence') cannot be dynamic: torch.export fixed it at 6 while "
            "tracing. Pass dynamic={'ids': {0: 'batch'}} instead"
        ),
    ):
        surgeon.export_onnx(cm, tmp_path / "asked.onnx", x, dynamic=asked)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


class _TwoBatches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.proj(x).sum(0) + self.proj(y).sum(0)


def test_torch_export_refusing_the_axes_names_them(tmp_path):
    cm = surgeon.compile(_TwoBatches().eval(), surgeon.LoRA(rank=2, targets=("proj",)))
    x = {"x": torch.randn(3, 4), "y": torch.randn(5, 4)}
    one_label = {"x": {0: "n"}, "y": {0: "n"}}  # sizes 3 and 5 cannot share a dimension
    with pytest.raises(surgeon.ExportError) as caught:
        surgeon.export_onnx(cm, tmp_path / "m.onnx", x, dynamic=one_label)
    assert str(caught.value) == (
        "export_onnx: torch.onnx.export failed: UserError: L['y'].size()[0] = 5 is not equal to "
        "L['x'].size()[0] = 3; it names the dynamic axes {'x': {0: 'n'}, 'y': {0: 'n'}}: "
        "pass dynamic=False to keep them static"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("build", "static"),
    [
        (_clip_vision, {"pixel_values": [2, 3]}),
        (_whisper_audio_classification, {"input_features": [2]}),
        (_whisper_encoder, {"input_features": [2]}),
        (_resnet, {}),  # a conv net takes other image sizes: they stay dynamic
    ],
    ids=["clip-vision", "whisper-classification", "whisper-encoder", "resnet"],
)
def test_the_default_axes_fit_each_model(build, static, tmp_path):
    cm, x = _compiled_with_inputs(build)
    report = surgeon.export_onnx(cm, tmp_path / "m.onnx", x)
    assert report.max_abs_diff < 1e-4
    assert {name: sorted(spec) for name, spec in report.static_axes.items()} == static
    for name, shape in report.verified_shapes.items():
        grown = [a for a, (new, old) in enumerate(zip(shape, x[name].shape)) if new != old]
        assert grown == [a for a in default_axes(x)[name] if a not in static.get(name, [])]


def test_large_models_keep_weights_in_a_side_file(tmp_path, monkeypatch):
    monkeypatch.setattr("surgeon.export._needs_external_data", lambda model: True)
    entry, cm = _compiled("mlp")
    report = surgeon.export_onnx(cm, tmp_path / "m.onnx", entry.example())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert report.file_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())
