"""OFT beyond the conformance suite: the formula and merge per layer kind and option (every
Neumann cut, shared blocks, COFT), merges of stacked rotations in the graph's order, unmerge
by the exact inverse, block sizes and counts derived as PEFT derives them, PEFT's keys and
shapes, PEFT parity both ways for options the examples lack, module dropout live in training
only, COFT writing the parameter as PEFT does, the eval cache, spec errors and PEFT config
values refused naming their keys, the Conv2d kernels refused and why, a golden graph."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from zoo import (
    ZOO,
    One,
    add_noise,
    graph_code,
    load_with_changed_config,
    logits,
    peft_loaded,
    peft_model,
    plain_output,
)

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.orthogonal.oft import OFT, block_layout, nearest_divisor


def _skew(values: torch.Tensor, size: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(size, size, 1)
    s = torch.zeros(size, size, dtype=values.dtype)
    s[rows, cols] = values
    return s - s.t()


def _block(spec, s: torch.Tensor) -> torch.Tensor:
    """One block's rotation: the Cayley transform ``(I - S)(I + S)^-1``, or PEFT's series for
    ``(I + S)(I - S)^-1 = I + 2S + 2S² + ...`` cut after ``k`` terms: ``I``, ``I + 2S``, then
    ``I + 2S + ... + 2S^(k-2) + S^(k-1)`` (its loop makes 3 terms the 4-term series)."""
    eye = torch.eye(s.shape[0], dtype=s.dtype)
    if not spec.cayley_neumann:
        return (eye - s) @ torch.linalg.inv(eye + s)
    k = 4 if spec.neumann_terms == 3 else spec.neumann_terms
    if k <= 2:
        return eye + 2 * s if k == 2 else eye
    powers = [torch.linalg.matrix_power(s, i) for i in range(1, k)]
    return eye + 2 * sum(powers[:-1]) + powers[-1]


def rotation(spec, adapter) -> torch.Tensor:
    """The full block-diagonal ``R`` (n x n) from the adapter's upper triangles; COFT first
    clips each block's skew matrix to Frobenius norm ``eps / sqrt(stored blocks)``."""
    size = adapter.block_size
    upper = adapter.oft_R.detach().double()
    if spec.coft:
        radius = spec.coft_eps / upper.shape[0] ** 0.5
        norm = 2**0.5 * upper.norm(dim=1, keepdim=True)  # ‖S‖_F: each value appears twice
        upper = torch.where(norm > radius, upper * radius / norm, upper)
    blocks = [_block(spec, _skew(v, size)) for v in upper]
    return torch.block_diag(*(blocks * adapter.blocks if spec.block_share else blocks)).float()


def formula(spec, adapter, base, x):
    """OFT (Qiu et al., 2023) as PEFT 0.21 runs it: the input's features, as row vectors, times
    the block-diagonal orthogonal ``R`` before the layer (``W R^T x + b``); a 1 x 1 convolution
    rotates its channels; an embedding's output rows are rotated instead (``W R``)."""
    r = rotation(spec, adapter)
    if isinstance(base, nn.Embedding):
        return plain_output(base, x) @ r
    if isinstance(base, nn.Conv2d):
        return plain_output(base, torch.einsum("nchw,cd->ndhw", x, r))
    return plain_output(base, x @ r)


peft = pytest.importorskip("peft")


class Net(nn.Module):
    """An embedding, a linear layer and a strided, padded 1 x 1 convolution: every kind OFT
    adapts, 12 features each."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12, padding_idx=0)
        self.lin = nn.Linear(12, 12)
        self.conv = nn.Conv2d(12, 5, 1, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(self.emb(x)))  # (N, 9, 12)
        return self.conv(h.transpose(1, 2).unflatten(-1, (3, 3)))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.conv.bias.normal_()
    return net


def _ids() -> torch.Tensor:
    return torch.randint(0, 20, (2, 9), generator=torch.Generator().manual_seed(1))


TARGETS = ("emb", "lin", "conv")


def _adapters(cm) -> dict[str, nn.Module]:
    return dict(cm.store.items("default"))


# -- the formula and merge -----------------------------------------------------------------------

OPTIONS = {
    "neumann-1": {"neumann_terms": 1},
    "neumann-2": {"neumann_terms": 2},
    "neumann-4": {"neumann_terms": 4},
    "neumann-6": {"neumann_terms": 6},
    "cayley-shared": {"cayley_neumann": False, "block_share": True},
    "neumann-coft-blocks": {"coft": True, "coft_eps": 0.5, "blocks": 3, "block_size": None},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_output_is_the_formula_and_merge_folds_it(options):
    net = _net()
    weights = {n: p.detach().clone() for n, p in net.state_dict().items()}
    spec = OFT(**{"block_size": 4, "targets": TARGETS, **options})
    cm = surgeon.compile(net, spec).eval()
    add_noise(cm.store.parameters())
    layers = _adapters(cm)
    x = _ids()
    with torch.no_grad(), cm.disabled():
        h = formula(spec, layers["emb"], net.emb, x)
        h = torch.tanh(formula(spec, layers["lin"], net.lin, h))
        expected = formula(spec, layers["conv"], net.conv, h.transpose(1, 2).unflatten(-1, (3, 3)))
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.merge()
    assert "oft" not in cm.graph.code()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=1e-6, msg=name)


def test_the_neumann_series_approximates_the_transposed_cayley_transform():
    torch.manual_seed(0)
    cm = surgeon.compile(One(nn.Linear(8, 8)), OFT(block_size=8, targets=("layer",)))
    (adapter,) = _adapters(cm).values()
    with torch.no_grad():
        adapter.oft_R.normal_(std=0.02)
    exact = rotation(OFT(cayley_neumann=False), adapter)
    for terms, error in ((2, 5e-2), (5, 1e-3), (8, 1e-5)):
        series = rotation(OFT(neumann_terms=terms), adapter)
        assert (series - exact.t()).abs().max() < error
    torch.testing.assert_close(exact @ exact.t(), torch.eye(8), rtol=0, atol=1e-6)


def test_unmerge_inverts_a_series_rotation_that_is_not_orthogonal():
    torch.manual_seed(0)
    model = One(nn.Linear(8, 3))
    weight = model.layer.weight.detach().clone()
    cm = surgeon.compile(model, OFT(block_size=4, neumann_terms=2, targets=("layer",)))
    (adapter,) = _adapters(cm).values()
    add_noise([adapter.oft_R], scale=0.5)
    r = rotation(OFT(neumann_terms=2), adapter)
    assert (r @ r.t() - torch.eye(8)).abs().max() > 0.1  # R^T would not undo it
    cm.merge()
    torch.testing.assert_close(model.layer.weight, weight @ r.t(), rtol=1e-5, atol=1e-6)
    cm.unmerge()
    torch.testing.assert_close(model.layer.weight, weight, rtol=0, atol=1e-6)


def test_stacked_rotations_merge_in_the_graph_order_together_or_one_at_a_time():
    """x through a, then b, then W: merged together W R_b^T R_a^T; merged one call at a time,
    a merged runs nearest the weight and the graph agrees with the plain products."""
    torch.manual_seed(0)
    model = One(nn.Linear(8, 4))
    weight = model.layer.weight.detach().clone()
    spec = OFT(block_size=4, targets=("layer",))
    cm = surgeon.compile(model, surgeon.Spec({"a": spec, "b": spec})).eval()
    add_noise(cm.store.parameters())
    cm.set_active(["a", "b"])
    x = torch.randn(5, 8)
    both = cm(x)
    r = {name: rotation(spec, layer) for name in "ab" for _, layer in cm.store.items(name)}
    torch.testing.assert_close(both, x @ r["a"] @ r["b"] @ weight.t() + model.layer.bias)
    cm.merge()
    torch.testing.assert_close(model.layer.weight, weight @ r["b"].t() @ r["a"].t())
    torch.testing.assert_close(cm(x), both, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(model.layer.weight, weight, rtol=0, atol=1e-6)
    cm.merge(["a"])
    torch.testing.assert_close(cm(x), x @ r["b"] @ r["a"] @ weight.t() + model.layer.bias)
    cm.merge(["b"])
    torch.testing.assert_close(model.layer.weight, weight @ r["a"].t() @ r["b"].t())
    cm.unmerge()
    torch.testing.assert_close(model.layer.weight, weight, rtol=0, atol=1e-6)


# -- blocks -------------------------------------------------------------------------------------


def test_block_sizes_and_counts_move_to_divisors_as_peft_moves_them():
    from peft.tuners.oft.layer import OFTLayer as PeftOFTLayer

    for features in range(1, 41):
        for wanted in range(1, 45):
            expected = PeftOFTLayer.adjust_oft_parameters(None, features, wanted)
            if features % wanted == 0 and wanted <= features:
                expected = wanted  # PEFT only adjusts what does not divide
            assert nearest_divisor(features, wanted) == expected, (features, wanted)


@pytest.mark.parametrize(
    ("features", "block_size", "blocks", "layout", "warned"),
    [
        (32, 8, None, (4, 8), False),
        (32, None, 8, (8, 4), False),
        (12, 5, None, (3, 4), True),  # 4 and 6 are as near: the smaller
        (12, 7, None, (2, 6), True),
        (5, 4, None, (1, 5), True),
        (12, None, 5, (4, 3), True),  # 4 blocks, not 6: the smaller again
        (6, 64, None, (1, 6), True),  # larger than the layer: one block
    ],
)
def test_block_layout_from_block_size_or_count(features, block_size, blocks, layout, warned):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert block_layout(features, block_size, blocks, "layer") == layout
    assert bool(caught) is warned
    if warned:
        field = "block_size" if block_size is not None else "blocks"
        assert f"OFT on layer: {field}=" in str(caught[0].message)


def test_block_size_defaults_to_32_and_counts_exclude_it():
    assert OFT().block_size == 32 and OFT().blocks is None
    assert OFT(blocks=4).block_size is None
    with pytest.raises(surgeon.SpecError, match=r"OFT.block_size=8, OFT.blocks=4: set only one"):
        OFT(block_size=8, blocks=4)


def test_parameters_have_peft_keys_and_shapes(tmp_path):
    net = _net()
    cm = surgeon.compile(net, OFT(block_size=4, targets=TARGETS))
    shared = surgeon.compile(_net(), OFT(blocks=2, block_share=True, targets=("lin",)))
    cm.save_adapters(tmp_path / "blocks")
    shared.save_adapters(tmp_path / "shared")
    saved = load_file(tmp_path / "blocks" / WEIGHTS_NAME)
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        "base_model.model.emb.oft_embedding_R.weight": (3, 6),
        "base_model.model.lin.oft_R.weight": (3, 6),
        "base_model.model.conv.oft_R.weight": (3, 6),
    }
    assert all(not v.any() for v in saved.values())  # R = I: the adapter starts as the base
    saved = load_file(tmp_path / "shared" / WEIGHTS_NAME)
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        "base_model.model.lin.oft_R.weight": (1, 15)
    }
    config = json.loads((tmp_path / "shared" / CONFIG_NAME).read_text())
    assert (config["r"], config["oft_block_size"], config["block_share"]) == (2, 0, True)


# -- PEFT parity --------------------------------------------------------------------------------

PARITY = {
    "neumann-coft": {"coft": True, "eps": 0.5},
    "cayley-shared": {"use_cayley_neumann": False, "block_share": True},
    "neumann-6-shared-coft": {
        "num_cayley_neumann_terms": 6,
        "block_share": True,
        "coft": True,
        "eps": 0.5,
    },
    "neumann-2-blocks": {"num_cayley_neumann_terms": 2, "r": 3, "oft_block_size": 0},
    "random-init-bias": {"init_weights": False, "bias": "oft_only"},
    "moved-block-size": {"oft_block_size": 5},
}
"""What the examples lack: COFT with the series, shared blocks with the exact transform or with
COFT, other cuts, counts, random inits and trained biases, a size moved to a divisor, all on
an embedding and a strided 1 x 1 convolution too."""


def _peft_config(change: dict) -> dict:
    return {
        "peft_type": "OFT",
        "peft_version": "0.21.2",
        "target_modules": list(TARGETS),
        "r": 0,
        "oft_block_size": 4,
        **change,
    }


def _with_biases(model: nn.Module, change: dict) -> None:
    if change.get("bias") == "oft_only":
        add_noise([model.get_submodule(t).bias for t in ("lin", "conv")], seed=7)


@pytest.mark.parametrize("change", PARITY.values(), ids=PARITY.keys())
def test_saved_by_surgeon_loads_in_peft_with_same_outputs(change, tmp_path):
    spec = OFT.from_peft_config(_peft_config(change), "here")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = surgeon.compile(_net(), spec).eval()
    add_noise(cm.store.parameters())
    _with_biases(cm.model, change)
    x = _ids()
    expected = cm(x)
    assert not torch.allclose(expected, _net()(x), atol=1e-4)
    cm.save_adapters(tmp_path)
    pm = peft_loaded(_net(), tmp_path)
    torch.testing.assert_close(pm(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", PARITY.values(), ids=PARITY.keys())
def test_saved_by_peft_loads_in_surgeon_with_same_outputs(change, tmp_path):
    config = _peft_config(change)
    pm = peft_model(_net(), peft.get_peft_config(config), seed=2, scale=0.2)
    pm.save_pretrained(tmp_path)
    x = _ids()
    expected = pm(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = surgeon.load(_net(), tmp_path).eval()
    assert cm.spec("default") == OFT.from_peft_config(config, "here").replace(
        targets=cm.spec("default").targets
    )
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    if change.get("coft"):  # both sides clipped their parameters the same way
        ours = dict(cm.adapter_state_dict())
        theirs = {k.replace(".default", ""): v for k, v in pm.state_dict().items() if "oft_" in k}
        for key, value in ours.items():
            torch.testing.assert_close(value, theirs[key], rtol=0, atol=1e-7)


# -- dropout, COFT, the cache --------------------------------------------------------------------


def test_module_dropout_replaces_whole_blocks_in_training_only():
    torch.manual_seed(0)
    model = One(nn.Linear(16, 16, bias=False))
    spec = OFT(block_size=4, module_dropout=0.5, targets=("layer",))
    cm = surgeon.compile(model, spec)
    (adapter,) = _adapters(cm).values()
    add_noise([adapter.oft_R])
    x = torch.eye(16)  # the output's rows are the effective weight's columns: W R^T
    cm.eval()
    torch.testing.assert_close(cm(x), formula(spec, adapter, model.layer, x))
    cm.train()
    full = rotation(spec, adapter)
    seen = set()
    for _ in range(12):
        with torch.no_grad():
            r = torch.linalg.solve(model.layer.weight, cm(x).t()).t()  # x R, x = I
        kept = []
        for i in range(4):
            block = slice(4 * i, 4 * i + 4)
            identity = torch.allclose(r[block, block], torch.eye(4), atol=1e-4)
            assert identity or torch.allclose(r[block, block], full[block, block], atol=1e-4)
            kept.append(not identity)
        assert sum(kept) == 2  # exactly int(0.5 * 4) blocks dropped, as PEFT
        seen.add(tuple(kept))
    assert len(seen) > 1  # a new draw on every call


@pytest.mark.parametrize(
    ("layer", "x", "share"),
    [
        (nn.Linear(8, 8), torch.randn(3, 8), True),
        (nn.Embedding(6, 8), torch.arange(6), False),  # PEFT's OFT has no dropout there
    ],
    ids=["shared-block", "embedding"],
)
def test_module_dropout_leaves_a_shared_block_and_embeddings_alone(layer, x, share):
    model = One(layer)
    spec = OFT(block_size=4, block_share=share, module_dropout=0.9, targets=("layer",))
    cm = surgeon.compile(model, spec)
    (adapter,) = _adapters(cm).values()
    add_noise([adapter.oft_R])
    cm.train()
    torch.testing.assert_close(cm(x), formula(spec, adapter, model.layer, x))


def test_coft_clips_the_parameter_in_place_as_peft():
    spec = OFT(block_size=4, coft=True, coft_eps=0.3, targets=("layer",))
    cm = surgeon.compile(One(nn.Linear(8, 2)), spec).eval()
    (adapter,) = _adapters(cm).values()
    with torch.no_grad():
        adapter.oft_R.copy_(torch.tensor([[0.01] * 6, [1.0] * 6]))
    cm(torch.randn(1, 8))
    skew_norm = 2**0.5 * adapter.oft_R.norm(dim=1)
    radius = 0.3 / 2**0.5  # eps / sqrt(2 stored blocks)
    torch.testing.assert_close(adapter.oft_R[0], torch.full((6,), 0.01))  # inside: untouched
    torch.testing.assert_close(skew_norm[1], torch.tensor(radius))  # outside: onto the sphere


def test_eval_caches_the_rotation_until_the_parameter_changes(monkeypatch):
    cm = surgeon.compile(One(nn.Linear(8, 2)), OFT(block_size=4, targets=("layer",)))
    (adapter,) = _adapters(cm).values()
    calls = []
    compute = adapter.blocks_now
    monkeypatch.setattr(adapter, "blocks_now", lambda: calls.append(1) or compute())
    x = torch.randn(3, 8)
    cm.eval()
    with torch.no_grad():
        first = cm(x)
        cm(x)
        assert len(calls) == 1
        adapter.oft_R.add_(0.1)  # a write bumps the version: the cache is stale
        assert not torch.allclose(cm(x), first)
        assert len(calls) == 2
    out = cm(x)  # gradients flow: no cached (detached) rotation
    out.sum().backward()
    assert adapter.oft_R.grad is not None and len(calls) == 3
    cm.train()
    with torch.no_grad():
        cm(x)
        cm(x)
    assert len(calls) == 5


def test_a_coft_adapter_runs_under_inference_mode():
    spec = OFT(block_size=4, coft=True, coft_eps=0.1, targets=("layer",))
    cm = surgeon.compile(One(nn.Linear(8, 2)), spec).eval()
    add_noise(cm.store.parameters())
    x = torch.randn(3, 8)
    with torch.inference_mode():
        inside = cm(x)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), inside)


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"block_size": 0}, r"OFT.block_size=0: expected an integer >= 1"),
        ({"blocks": 2.5}, r"OFT.blocks=2.5: expected an integer >= 1"),
        ({"block_size": 4, "blocks": 2}, r"set only one"),
        ({"module_dropout": 1.0}, r"OFT.module_dropout=1.0: expected a number >= 0 and < 1"),
        ({"coft": 1}, r"OFT.coft=1: expected true or false"),
        ({"coft_eps": -0.1}, r"OFT.coft_eps=-0.1: expected a number >= 0"),
        ({"block_share": "yes"}, r"OFT.block_share='yes'"),
        ({"cayley_neumann": None}, r"OFT.cayley_neumann=None"),
        ({"neumann_terms": -1}, r"OFT.neumann_terms=-1: expected an integer >= 0"),
        ({"init": "zeros"}, r"OFT.init='zeros': expected one of 'default', 'random'"),
        ({"bias": "lora_only"}, r"OFT.bias='lora_only': expected one of 'none', 'all', 'oft_only'"),
        ({"rank": 4}, r"OFT has no field 'rank'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        OFT(**fields)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"r": 0, "oft_block_size": 0}, r"r=0 and oft_block_size=0: exactly one"),
        ({"r": 2, "oft_block_size": 4}, r"r=2 and oft_block_size=4: exactly one"),
        ({"oft_block_size": None}, r"oft_block_size is missing; OFT files from before PEFT 0.14"),
        ({"bias": "lora_only"}, r"OFT.bias='lora_only'.*key 'bias'"),
        ({"num_cayley_neumann_terms": -1}, r"neumann_terms=-1.*key 'num_cayley_neumann_terms'"),
        ({"eps": -1.0}, r"coft_eps=-1.0.*key 'eps'"),
        ({"module_dropout": 1.0}, r"module_dropout=1.0.*key 'module_dropout'"),
        ({"init_weights": "pissa"}, r"init_weights='pissa': expected true or false"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    surgeon.compile(_net(), OFT(block_size=4, targets=TARGETS)).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(_net(), tmp_path, change)


def test_a_cayley_neumann_file_from_before_peft_0_18_loads_with_peft_warning(tmp_path):
    surgeon.compile(_net(), OFT(block_size=4, targets=TARGETS)).save_adapters(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["peft_version"].startswith("0.21")
    for version in ("0.17.1", None):
        with pytest.warns(UserWarning, match="PEFT 0.18 changed the Cayley-Neumann series"):
            load_with_changed_config(_net(), tmp_path, {"peft_version": version})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_with_changed_config(_net(), tmp_path, {"use_cayley_neumann": False})


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(4, 4, 3),
        nn.Conv2d(4, 4, 1, groups=2),
        nn.Conv2d(4, 4, 1, dilation=2),
        nn.Conv1d(4, 4, 1),
        ZOO["gpt2"].model().transformer.h[0].attn.c_attn,  # PEFT's OFT has no Conv1D
    ],
    ids=["conv2d-3x3", "groups", "dilation", "conv1d", "conv1d_gpt2"],
)
def test_layers_oft_cannot_adapt_are_refused_saying_which_it_can(layer):
    with pytest.raises(surgeon.SpecError, match=r"which OFT cannot adapt.*1 x 1 kernel"):
        surgeon.compile(One(layer), OFT(targets=("layer",)))


def test_peft_own_unmerged_conv_output_disagrees_with_its_merge():
    """Why kernels above 1 x 1 are refused: PEFT 0.21 rotates overlapping patches and sums them
    back, so even a fresh adapter changes the output."""
    torch.manual_seed(0)
    model = One(nn.Conv2d(2, 3, 3, padding=1)).eval()
    x = torch.randn(1, 2, 5, 5)
    expected = model(x)
    config = peft.OFTConfig(target_modules=["layer"], oft_block_size=6, r=0)
    pm = peft_model(model, config, seed=None)
    assert not torch.allclose(pm(x), expected, atol=1e-3)


# -- the graph ----------------------------------------------------------------------------------

GOLDEN = """\
def forward(self, x):
    adapters_default_layer_rotation = self.adapters.default.layer.rotation()
    rotate_blocks = surgeon_passes_orthogonal_common_rotate_blocks(x, adapters_default_layer_rotation, -1);  x = adapters_default_layer_rotation = None
    layer = self.layer(rotate_blocks);  rotate_blocks = None
    return layer"""


def test_golden_graph_rotates_the_input_with_one_block_matmul():
    cm = surgeon.compile(One(nn.Linear(8, 2)), OFT(block_size=4, targets=("layer",)))
    assert graph_code(cm) == GOLDEN


def test_llama_merge_and_unload_gives_the_same_outputs_without_surgeon():
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), OFT(block_size=8, targets=("q_proj", "embed_tokens")))
    add_noise(cm.store.parameters())
    x = entry.example()
    expected = logits(cm(**x))
    plain = cm.merge_and_unload()
    torch.testing.assert_close(logits(plain(**x)), expected, rtol=1e-5, atol=1e-5)
