"""BitFit's card (its formula) and what is its own: the formula and merge on LayerNorm (which the
suite's single layers lack), the ``all-biases`` preset and the refusal of layers without a bias,
gradients equal to those of the base biases, stacking with IA³ (whose merge rescales the bias),
half-precision deltas, files (this project's own PEFT type, which PEFT's loader refuses), spec
and config errors, training through `surgeon.train`. PEFT has no BitFit: the conformance suite
runs the rest against the formula alone."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from zoo import ZOO, One, gpt2_conv1d, load_with_changed_config, logits, randomize

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.vector.bitfit import BitFit
from surgeon.passes.vector.ia3 import IA3
from surgeon.spec import METHODS
from surgeon.train import parameter_groups, trained_parameters


def formula(spec, adapter, base, x):
    """BitFit (Ben Zaken et al., 2022): the layer with its bias ``b`` replaced by ``b + Δb``,
    ``W x + (b + Δb)``."""
    bias = base.bias + adapter.bitfit_delta.to(base.bias.dtype)
    if isinstance(base, nn.LayerNorm):
        return F.layer_norm(x, base.normalized_shape, base.weight, bias, base.eps)
    if isinstance(base, nn.Linear):
        return F.linear(x, base.weight, bias)
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        conv = (F.conv1d, F.conv2d, F.conv3d)[base.weight.dim() - 3]
        return conv(x, base.weight, bias, base.stride, base.padding, base.dilation, base.groups)
    return x @ base.weight + bias  # GPT-2's Conv1D: weight (in, out)


peft = pytest.importorskip("peft")


LAYERS = {
    "linear": (lambda: nn.Linear(5, 6), lambda: torch.randn(3, 5)),
    "conv1d_gpt2": (gpt2_conv1d, lambda: torch.randn(2, 3, 5)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 5, 5)),
    "conv2d_unbatched": (lambda: nn.Conv2d(3, 4, 3), lambda: torch.randn(3, 5, 5)),
    "layer_norm": (lambda: nn.LayerNorm(6), lambda: torch.randn(2, 3, 6)),
    "layer_norm_2d": (lambda: nn.LayerNorm((3, 4)), lambda: torch.randn(2, 3, 4)),
}
"""Layers BitFit adapts, the suite's single layers aside (LayerNorm, an unbatched convolution)."""


def _adapter(cm, name: str = "default"):
    (_, adapter), *_ = cm.store.items(name)
    return adapter


# -- the formula ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_the_output_is_the_formula_and_merge_moves_the_bias_only(kind):
    make_layer, make_input = LAYERS[kind]
    torch.manual_seed(0)
    model = One(make_layer())
    with torch.no_grad():
        model.layer.weight.normal_()
        model.layer.bias.normal_()
    x = make_input()
    before = model(x)
    weight, bias = model.layer.weight.detach().clone(), model.layer.bias.detach().clone()
    cm = surgeon.compile(model, BitFit(targets=("layer",)))
    adapter = _adapter(cm)
    assert adapter.bitfit_delta.shape == bias.shape
    assert torch.count_nonzero(adapter.bitfit_delta) == 0
    assert torch.equal(cm(x), before)  # a fresh adapter changes nothing
    randomize(cm, scale=0.5)
    expected = formula(None, adapter, model.layer, x)
    assert not torch.allclose(expected, before)
    torch.testing.assert_close(cm(x), expected, rtol=1e-6, atol=1e-6)
    cm.merge()
    assert "bitfit_delta" not in cm.graph.code()
    assert torch.equal(model.layer.weight, weight)
    torch.testing.assert_close(model.layer.bias, bias + adapter.bitfit_delta)
    torch.testing.assert_close(cm(x), expected, rtol=1e-6, atol=1e-6)
    cm.unmerge()
    torch.testing.assert_close(model.layer.bias, bias, rtol=0, atol=1e-6)
    torch.testing.assert_close(cm(x), expected, rtol=1e-6, atol=1e-6)


def test_the_bias_gradients_are_those_of_the_base_biases():
    """Training Δb is training b: the gradient of a loss with respect to each delta is that with
    respect to the bias it updates (PEFT's ``bias="all"`` route to BitFit trains those)."""
    entry = ZOO["gpt2"]
    x = entry.example()
    plain = entry.model()
    logits(plain(**x)).pow(2).mean().backward()
    cm = surgeon.compile(entry.model(), BitFit())
    logits(cm(**x)).pow(2).mean().backward()
    biases = {n.removesuffix(".bias"): p for n, p in plain.named_parameters() if n.endswith("bias")}
    layers = dict(cm.store.items("default"))
    assert layers.keys() == biases.keys()  # every bias of GPT-2, its LayerNorms' included
    for path, layer in layers.items():
        torch.testing.assert_close(layer.bitfit_delta.grad, biases[path].grad, msg=path)


@pytest.mark.parametrize("ia3_first", [True, False], ids=["ia3-first", "bitfit-first"])
def test_stacked_with_ia3_on_one_layer_merge_folds_in_order(ia3_first):
    """IA³'s output scaling also rescales the bias when it merges: the merged model must still
    compute the unmerged one whichever adapter comes first."""
    torch.manual_seed(0)
    model = One(nn.Linear(5, 6))
    x = torch.randn(3, 5)
    adapters = {
        "ia3": IA3(targets=("layer",), feedforward=()),
        "bitfit": BitFit(targets=("layer",)),
    }
    order = ("ia3", "bitfit") if ia3_first else ("bitfit", "ia3")
    cm = surgeon.compile(model, surgeon.Spec({n: adapters[n] for n in order}))
    cm.set_active(list(order))
    randomize(cm, scale=0.5)
    ia3, bitfit = _adapter(cm, "ia3"), _adapter(cm, "bitfit")
    with torch.no_grad():
        ia3.ia3_l.add_(1.0)
        scale, delta = ia3.ia3_l.flatten(), bitfit.bitfit_delta
        h = F.linear(x, model.layer.weight, model.layer.bias)
        expected = scale * h + delta if ia3_first else scale * (h + delta)
    bias = model.layer.bias.detach().clone()
    torch.testing.assert_close(cm(x), expected)
    cm.merge()
    torch.testing.assert_close(cm(x), expected)
    cm.unmerge()
    torch.testing.assert_close(model.layer.bias, bias, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cm(x), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bases_get_a_float32_delta_rounded_into_their_dtype(dtype):
    torch.manual_seed(0)
    model = One(nn.Linear(8, 4)).to(dtype)
    x = torch.randn(3, 8, dtype=dtype)
    before = model(x)
    cm = surgeon.compile(model, BitFit(targets=("layer",)))
    adapter = _adapter(cm)
    assert adapter.bitfit_delta.dtype == torch.float32
    assert torch.equal(cm(x), before)
    randomize(cm, scale=0.5)
    out = cm(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, before + adapter.bitfit_delta.to(dtype))
    cm.merge()
    torch.testing.assert_close(cm(x), out, rtol=2e-2, atol=2e-2)


# -- what it adapts ---------------------------------------------------------------------------------


def test_all_biases_selects_every_layer_with_a_bias_and_no_other():
    model = ZOO["gpt2"].model()
    paths = BitFit().select(model)
    kinds = {type(model.get_submodule(p)).__name__ for p in paths}
    assert kinds == {"Conv1D", "LayerNorm"}  # the token embedding and the head have no bias
    assert "transformer.ln_f" in paths and len(paths) == 13
    assert BitFit(exclude=("ln_1", "ln_2", "ln_f")).select(model) == [
        p for p in paths if "ln_" not in p
    ]
    assert BitFit(layers=(1,)).select(model) == [p for p in paths if ".h.1." in p]


def test_presets_skip_layers_without_a_bias():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Linear(4, 6, bias=False)
            self.norm = nn.LayerNorm(6, bias=False)
            self.down = nn.Linear(6, 2)

        def forward(self, x):
            return self.down(self.norm(self.up(x)))

    model = Mixed()
    assert BitFit().select(model) == ["down"]
    assert BitFit(targets="all-linear").select(model) == ["down"]


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (nn.Linear(3, 3, bias=False), r"matches layers without a bias \(layer\)"),
        (nn.LayerNorm(3, bias=False), r"matches layers without a bias \(layer\)"),
        (nn.Conv2d(2, 2, 1, bias=False), r"matches layers without a bias \(layer\)"),
        (nn.Embedding(5, 3), r"layer \(Embedding\), which BitFit cannot adapt"),
        (nn.BatchNorm1d(3), r"layer \(BatchNorm1d\), which BitFit cannot adapt"),
    ],
)
def test_layers_it_cannot_tune_are_refused_when_named(layer, match):
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.compile(One(layer), BitFit(targets=("layer",)))


def test_all_biases_on_a_model_without_biases_is_refused():
    with pytest.raises(surgeon.SpecError, match="LlamaForCausalLM has no layer with a bias"):
        surgeon.compile(ZOO["llama"].model(), BitFit())


# -- files ----------------------------------------------------------------------------------------


def test_files_round_trip_under_its_own_peft_type(tmp_path):
    entry = ZOO["gpt2"]
    spec = BitFit(exclude=("ln_f",))
    cm = surgeon.compile(entry.model(), spec)
    randomize(cm, scale=0.5)
    x = entry.example()
    expected = logits(cm(**x))
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "SURGEON_BITFIT" and config["bias"] == "none"
    assert config["target_modules"] == "all-biases" and config["exclude_modules"] == ["ln_f"]
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert saved["base_model.model.transformer.h.0.ln_1.bitfit_delta"].shape == (32,)
    assert saved["base_model.model.transformer.h.0.attn.c_attn.bitfit_delta"].shape == (96,)
    assert len(saved) == 12 and all(k.endswith(".bitfit_delta") for k in saved)
    loaded = surgeon.load(entry.model(), tmp_path)
    assert loaded.spec("default") == spec
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=0, atol=0)


def test_all_biases_of_some_layers_are_written_as_the_chosen_paths(tmp_path):
    """PEFT refuses a regex target with layers_to_transform: the paths are written instead."""
    entry = ZOO["gpt2"]
    cm = surgeon.compile(entry.model(), BitFit(layers=(0,)))
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["target_modules"] == sorted(BitFit(layers=(0,)).select(entry.model()))
    assert config["layers_to_transform"] is None
    loaded = surgeon.load(entry.model(), tmp_path)
    assert dict(loaded.store.items("default")).keys() == dict(cm.store.items("default")).keys()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bias": "all"}, "bias='all'"),
        ({"target_modules": None}, "target_modules is missing"),
        ({"exclude_modules": 3}, "exclude_modules=3"),
        ({"layers_to_transform": [0], "layers_pattern": "blocks.x"}, "layers_pattern="),
        ({"use_dora": True}, "use_dora=True"),
    ],
)
def test_configs_surgeon_cannot_honour_are_refused_naming_the_key(change, match, tmp_path):
    entry = ZOO["gpt2"]
    surgeon.compile(entry.model(), BitFit()).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


# -- the spec -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"targets": ()}, r"BitFit.targets=\[\]: expected at least one target"),
        ({"layers": -1}, r"BitFit.layers"),
        ({"rank": 4}, r"BitFit has no field 'rank'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        BitFit(**fields)


def test_registered_under_its_name_with_its_own_peft_type():
    assert METHODS["bitfit"] is BitFit is surgeon.BitFit
    assert BitFit.peft_type == "SURGEON_BITFIT"
    assert surgeon.MethodSpec.from_dict({"method": "bitfit"}) == BitFit(targets="all-biases")


# -- training -------------------------------------------------------------------------------------


def test_surgeon_train_moves_the_deltas_only_without_weight_decay():
    cm = surgeon.compile(ZOO["gpt2"].model(), BitFit(targets=("c_attn", "ln_f")))
    trained = trained_parameters(cm)
    config = surgeon.TrainingConfig(
        learning_rate=1e-2,
        batch_size=2,
        gradient_accumulation_steps=1,
        warmup_steps=0,
        max_steps=2,
        weight_decay=0.1,
        progress=False,
        distributed="none",
    )
    assert {n.rsplit(".", 1)[1] for n in trained} == {"bitfit_delta"} and len(trained) == 3
    groups = parameter_groups(cm, trained, config)
    assert all(g.weight_decay == 0 for g in groups if g.names)
    before = {n: t.detach().clone() for n, t in cm.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (4, 7), generator=generator).tolist()
    data = [{"input_ids": row, "attention_mask": [1] * 7, "labels": row} for row in ids]
    result = surgeon.train(cm, data, config)
    assert result.steps == 2
    moved = {n for n, t in cm.named_parameters() if not torch.equal(t, before[n])}
    assert moved == set(trained)
