"""What is LoHa's own: its forward paths, the part of the formula the conformance suite
(tests/conformance) does not check, PEFT's shapes, init, spec errors, golden rewritten graphs.
Tests both LyCORIS methods share are written once, in test_common.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import ZOO, One, graph_code, plain_output

import surgeon
from surgeon.passes.lycoris.loha import LoHa


def formula(spec, adapter, base, x):
    """LoHa (FedPara): ``W + (W1a W1b ⊙ W2a W2b) · alpha / r``, each side a CP-factored kernel
    with ``effective_conv``."""
    if adapter.cp:
        w1 = _rebuild(adapter.hada_t1, adapter.hada_w1_a, adapter.hada_w1_b)
        w2 = _rebuild(adapter.hada_t2, adapter.hada_w2_a, adapter.hada_w2_b)
    else:
        w1 = adapter.hada_w1_a @ adapter.hada_w1_b
        w2 = adapter.hada_w2_a @ adapter.hada_w2_b
    scale = spec.alpha_pattern.get("layer", spec.alpha) / adapter.hada_w1_b.shape[0]
    return plain_output(base, x, base.weight + (w1 * w2 * scale).reshape(base.weight.shape))


def _rebuild(core, out_factor, in_factor):
    """A CP kernel written out: K[p, c, h, w] = sum_ij core[i, j, h, w] out[i, p] in[j, c]."""
    return (
        core[:, :, None, None]
        * out_factor[:, None, :, None, None, None]
        * in_factor[None, :, None, :, None, None]
    ).sum((0, 1))


LAYERS = {
    "linear": (lambda: nn.Linear(10, 12), lambda: torch.randn(2, 3, 10)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), lambda: torch.randn(2, 3, 7, 7)),
    "conv2d_1x1": (lambda: nn.Conv2d(6, 4, 1), lambda: torch.randn(2, 6, 5, 5)),
    "conv2d_groups_dilation": (
        lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2),
        lambda: torch.randn(2, 4, 8, 8),
    ),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 9)),
    "conv1d_unbatched": (lambda: nn.Conv1d(3, 4, 3), lambda: torch.randn(3, 9)),
}
EXTRA_KINDS = ("conv1d_unbatched", "conv2d_groups_dilation")
"""Layer kinds the conformance suite's layer set lacks."""
VARIANTS = {
    "rank-1": {"rank": 1},
    "rank-4": {"rank": 4},
    "effective-conv-rank-1": {"rank": 1, "effective_conv": True},
    "effective-conv-rank-4": {"rank": 4, "effective_conv": True},
}
FORMULA_CASES = [(kind, "rank-1") for kind in sorted(LAYERS) if kind not in EXTRA_KINDS] + [
    (kind, variant) for kind in EXTRA_KINDS for variant in sorted(VARIANTS)
]
"""The (kind, variant)s test_common.py checks against the formula: the conformance suite's layer
cases (ranks 2 and 3) build ΔW, in full or from CP kernels; here the factored forward (rank 1) on
its kinds, and every variant on the kinds it lacks."""


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_forward_path_per_layer_kind(kind, variant):
    fields = VARIANTS[variant]
    cm = surgeon.compile(One(LAYERS[kind][0]()), LoHa(alpha=5, targets=("layer",), **fields))
    ((_, adapter),) = cm.store.items("default")
    assert adapter.scale == pytest.approx(5 / fields["rank"])
    cp = fields.get("effective_conv", False) and kind.startswith("conv") and kind != "conv2d_1x1"
    assert adapter.cp == cp
    # rank 1 is cheap enough to run factored (r² (in + out) < in·out); rank 4 builds ΔW
    assert adapter.factored_forward == (fields["rank"] == 1 and not cp and "groups" not in kind)


@pytest.mark.parametrize("effective_conv", [False, True])
def test_shapes_and_keys_are_peft_s(effective_conv):
    cm = surgeon.compile(
        ZOO["cnn"].model(),
        LoHa(rank=2, targets=("conv1", "seq", "fc"), effective_conv=effective_conv),
    )
    shapes = {
        f"{p}.{k}": tuple(t.shape)
        for p, layer in cm.store.items("default")
        for k, t in layer.peft_tensors().items()
    }
    if effective_conv:  # conv1: 3 -> 8, 3x3; seq: 8 -> 8, k=3 (cores are (r, r, k, 1))
        assert shapes["conv1.hada_t1"] == (2, 2, 3, 3) and shapes["conv1.hada_w1_a"] == (2, 8)
        assert shapes["seq.hada_t2"] == (2, 2, 3, 1) and shapes["seq.hada_w2_b"] == (2, 8)
    else:
        assert shapes["conv1.hada_w1_a"] == (8, 2) and shapes["conv1.hada_w1_b"] == (2, 27)
        assert shapes["seq.hada_w2_b"] == (2, 24)
    assert shapes["fc.hada_w1_a"] == (4, 2) and shapes["fc.hada_w2_b"] == (2, 8)


def test_random_init_zeroes_nothing_and_changes_outputs():
    torch.manual_seed(0)
    model = One(nn.Linear(10, 12))
    x = torch.randn(3, 10)
    cm = surgeon.compile(model, LoHa(rank=4, targets=("layer",), init="random"))
    ((_, adapter),) = cm.store.items("default")
    assert all(torch.count_nonzero(t) == t.numel() for t in adapter.peft_tensors().values())
    assert not torch.allclose(cm(x), model.layer(x))


# -- PEFT ---------------------------------------------------------------------------------------


def test_spec_round_trips_through_peft_config():
    spec = LoHa(
        rank=4,
        alpha=2,
        targets=("q_proj",),
        layers=(1,),
        rank_pattern={"q_proj": 2},
        alpha_pattern={"q_proj": 3.0},
        rank_dropout=0.1,
        module_dropout=0.2,
        effective_conv=True,
        init="random",
    )
    config = spec.to_peft_config(["model.layers.1.self_attn.q_proj"])
    assert config["init_weights"] is False and config["use_effective_conv2d"] is True
    # the file's weights replace any init: loaded specs say "default" (hot swaps stay possible)
    assert LoHa.from_peft_config(config, "here") == spec.replace(init="default")


@pytest.mark.parametrize(
    "config, match",
    [
        ({"layers_to_transform": [0], "layers_pattern": "blocks_x"}, "layers_pattern"),
        (
            {"init_weights": "lycoris"},
            r"init_weights='lycoris' is not supported \(supported: true, false\)",
        ),
        ({"target_modules": None}, "target_modules is missing"),
        ({"rank_dropout": 1.0}, "rank_dropout=1.0"),
    ],
)
def test_peft_configs_that_would_load_differently_are_refused(config, match):
    base = {"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": ["q_proj"]}
    with pytest.raises(surgeon.SpecError, match=match):
        LoHa.from_peft_config({**base, **config}, "adapter_config.json")


def test_gpt2_conv1d_is_not_a_loha_layer_as_in_peft():
    with pytest.raises(surgeon.SpecError, match="cannot adapt"):
        surgeon.compile(ZOO["gpt2"].model(), LoHa(targets=("c_attn",)))


# -- spec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("rank", 0, "LoHa.rank=0: expected an integer >= 1"),
        ("alpha", -1, "LoHa.alpha=-1: expected a number > 0"),
        ("rank_dropout", 1.0, r"LoHa.rank_dropout=1.0: expected a number >= 0 and < 1"),
        ("module_dropout", -0.1, "LoHa.module_dropout=-0.1"),
        ("effective_conv", "yes", "LoHa.effective_conv='yes': expected true or false"),
        ("init", "pissa", "LoHa.init='pissa': expected one of 'default', 'random'"),
        ("targets", [], r"LoHa.targets=\[\]: expected at least one target"),
        ("rank_pattern", {"q_proj": 0}, r"LoHa.rank_pattern\['q_proj'\]=0"),
        ("dropout", 0.1, "LoHa has no field 'dropout'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_field_value_and_allowed(field, value, match):
    with pytest.raises(surgeon.SpecError, match=match):
        LoHa(**{field: value})


def test_pattern_keys_must_match_a_target():
    with pytest.raises(surgeon.SpecError, match="rank_pattern: key 'k_proj' matches no targeted"):
        surgeon.compile(ZOO["llama"].model(), LoHa(rank_pattern={"k_proj": 2}))


def test_padding_modes_peft_gets_wrong_are_refused():
    with pytest.raises(surgeon.SpecError, match="padding_mode='reflect'"):
        surgeon.compile(One(nn.Conv2d(3, 4, 3, padding_mode="reflect")), LoHa(targets=("layer",)))


# -- golden graphs ------------------------------------------------------------------------------

GOLDEN_FACTORED = """\
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    body_0 = getattr(self.body, "0")(x);  x = None
    body_1 = getattr(self.body, "1")(body_0);  body_0 = None
    body_2 = getattr(self.body, "2")(body_1);  body_1 = None
    body_3 = getattr(self.body, "3")(body_2)
    adapters_default_body_3_hada_w1_a = self.adapters.default.body_3.hada_w1_a
    adapters_default_body_3_hada_w1_b = self.adapters.default.body_3.hada_w1_b
    adapters_default_body_3_hada_w2_a = self.adapters.default.body_3.hada_w2_a
    adapters_default_body_3_hada_w2_b = self.adapters.default.body_3.hada_w2_b
    row_kron = surgeon_passes_lycoris_loha_row_kron(adapters_default_body_3_hada_w1_a, adapters_default_body_3_hada_w2_a);  adapters_default_body_3_hada_w1_a = adapters_default_body_3_hada_w2_a = None
    column_kron = surgeon_passes_lycoris_loha_column_kron(adapters_default_body_3_hada_w1_b, adapters_default_body_3_hada_w2_b);  adapters_default_body_3_hada_w1_b = adapters_default_body_3_hada_w2_b = None
    mul = torch.mul(column_kron, 2.0);  column_kron = None
    linear = torch._C._nn.linear(body_2, mul);  body_2 = mul = None
    linear_1 = torch._C._nn.linear(linear, row_kron);  linear = row_kron = None
    adapters_default_body_3_rank_dropout = self.adapters.default.body_3.rank_dropout(linear_1);  linear_1 = None
    adapters_default_body_3_module_dropout = self.adapters.default.body_3.module_dropout(body_3, adapters_default_body_3_rank_dropout);  body_3 = adapters_default_body_3_rank_dropout = None
    relu = torch.relu(adapters_default_body_3_module_dropout);  adapters_default_body_3_module_dropout = None
    head = self.head(relu);  relu = None
    return head"""

GOLDEN_MATERIALISED_CONV = """\
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    conv1 = self.conv1(x)
    adapters_default_conv1_hada_t1 = self.adapters.default.conv1.hada_t1
    adapters_default_conv1_hada_w1_a = self.adapters.default.conv1.hada_w1_a
    adapters_default_conv1_hada_w1_b = self.adapters.default.conv1.hada_w1_b
    adapters_default_conv1_hada_t2 = self.adapters.default.conv1.hada_t2
    adapters_default_conv1_hada_w2_a = self.adapters.default.conv1.hada_w2_a
    adapters_default_conv1_hada_w2_b = self.adapters.default.conv1.hada_w2_b
    hadamard_delta_cp = surgeon_passes_lycoris_loha_hadamard_delta_cp(adapters_default_conv1_hada_t1, adapters_default_conv1_hada_w1_a, adapters_default_conv1_hada_w1_b, adapters_default_conv1_hada_t2, adapters_default_conv1_hada_w2_a, adapters_default_conv1_hada_w2_b, 2.0, (8, 3, 3, 3));  adapters_default_conv1_hada_t1 = adapters_default_conv1_hada_w1_a = adapters_default_conv1_hada_w1_b = adapters_default_conv1_hada_t2 = adapters_default_conv1_hada_w2_a = adapters_default_conv1_hada_w2_b = None
    conv2d = torch.conv2d(x, hadamard_delta_cp, None, (1, 1), (1, 1), (1, 1), 1);  x = hadamard_delta_cp = None
    add = torch.add(conv1, conv2d);  conv1 = conv2d = None
    relu = torch.nn.functional.relu(add, inplace = False);  add = None
    conv2 = self.conv2(relu);  relu = None
    relu_1 = torch.nn.functional.relu(conv2, inplace = False);  conv2 = None
    flatten = relu_1.flatten(2);  relu_1 = None
    seq = self.seq(flatten);  flatten = None
    mean = seq.mean(-1);  seq = None
    fc = self.fc(mean);  mean = None
    return fc"""


def test_golden_graph_factored_linear_with_dropouts():
    spec = LoHa(rank=2, alpha=4, targets=("body.3",), rank_dropout=0.1, module_dropout=0.2)
    assert graph_code(surgeon.compile(ZOO["mlp"].model(), spec), "") == GOLDEN_FACTORED


def test_golden_graph_materialised_effective_conv():
    spec = LoHa(rank=2, alpha=4, targets=("conv1",), effective_conv=True)
    assert graph_code(surgeon.compile(ZOO["cnn"].model(), spec), "") == GOLDEN_MATERIALISED_CONV
