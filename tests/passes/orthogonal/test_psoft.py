"""PSOFT beyond the conformance suite: the formula (SVD split and rotation written out), the
factors and R exactly as PEFT builds them (full and seeded low-rank SVD, both inits, every
Neumann length, with and without the norm bound), merge and unmerge against the formula, PEFT
parity both ways on options the examples leave out, PEFT keys honoured or refused by name,
spec errors, the meta device."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from zoo import (
    ZOO,
    One,
    gpt2_conv1d,
    load_with_changed_config,
    logits,
    peft_loaded,
    peft_model,
    plain_output,
    randomize,
)

import surgeon
from surgeon.io import CONFIG_NAME
from surgeon.passes.orthogonal.psoft import PEFT_NAMES, PSOFT, Rotation


def _principal(weight: torch.Tensor, spec: PSOFT):
    """The top-r singular triplets of the (out x in) weight, in float32: PSOFT's definition of
    the principal subspace (``svd="lowrank"``: torch's randomized SVD drawn from ``seed``)."""
    w, r = weight.float(), spec.rank
    if spec.svd == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            u, s, v = torch.svd_lowrank(w, q=r, niter=spec.svd_iterations)
        vh = v.T
    return u[:, :r], s[:r], vh[:r]


def _matrix(spec: PSOFT, rotation: Rotation) -> torch.Tensor:
    """R = diag(b) C diag(a): C the Cayley transform (I + Q)(I - Q)^-1 of the skew-symmetric Q,
    or its Neumann series as PEFT truncates it, or the free matrix."""
    r = spec.rank
    eye = torch.eye(r)
    if spec.orthogonal:
        q = torch.zeros(r, r)
        q[tuple(torch.triu_indices(r, r, 1))] = rotation.weight.detach()
        q = q - q.T
        if spec.neumann_terms is None:
            c = (eye + q) @ torch.linalg.inv(eye - q)
        else:
            c = _neumann(q, spec.neumann_terms, spec.neumann_eps)
    else:
        c = rotation.weight.detach()
    b = rotation.scale_out.detach() if spec.scale_out else torch.ones(r)
    a = rotation.scale_in.detach() if spec.scale_in else torch.ones(r)
    return torch.diag(b) @ c @ torch.diag(a)


def _neumann(q: torch.Tensor, terms: int, eps: float | None) -> torch.Tensor:
    """I + 2Q + ... + 2Q^k + Q^(k+1), k = max(2, terms - 2); I + 2Q for 2 terms, I for 1."""
    if eps is not None and torch.linalg.norm(q) > eps:
        q = q * eps / (torch.linalg.norm(q) + 1e-12)
    if terms == 1:
        coefficients = [1]
    elif terms == 2:
        coefficients = [1, 2]
    else:
        coefficients = [1] + [2] * max(2, terms - 2) + [1]
    return sum(c * torch.linalg.matrix_power(q, k) for k, c in enumerate(coefficients))


def _delta(spec: PSOFT, rotation: Rotation, weight: torch.Tensor) -> torch.Tensor:
    """W' - W = U S (R - I) Vh (psoft), U √S (R - I) √S Vh (pissa): alpha cancels out."""
    u, s, vh = _principal(weight, spec)
    turn = _matrix(spec, rotation) - torch.eye(spec.rank)
    if spec.init == "psoft":
        return u @ torch.diag(s) @ turn @ vh
    return u @ torch.diag(s.sqrt()) @ turn @ torch.diag(s.sqrt()) @ vh


def formula(spec, adapter, base, x):
    """PSOFT (Wu et al., 2025): ``W x + b + U_r S_r (R - I) V_rᵀ x``, the rank-r principal part
    of W turned by R."""
    return plain_output(base, x) + x @ _delta(spec, adapter.rotation, base.weight).T


peft = pytest.importorskip("peft")
from peft.tuners.psoft.layer import OrthLayer  # noqa: E402

TARGETS = ("body.0", "body.3", "head")
"""The MLP's Linear layers (12 -> 24 -> 24 -> 5): the zoo's fastest model, for PEFT round trips."""


def _layers(cm, name="default"):
    return dict(cm.store.items(name))


# -- the factors -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "options",
    [
        {"init": "psoft", "svd": "full"},
        {"init": "pissa", "svd": "full", "alpha": 3},
        {"init": "psoft", "svd": "lowrank", "seed": 3, "svd_iterations": 1},
        {"init": "pissa", "svd": "lowrank"},
    ],
    ids=["psoft-full", "pissa-full", "psoft-lowrank", "pissa-lowrank"],
)
def test_factors_are_peft_factors_bit_for_bit(options, dtype):
    """A and B are never saved: a file only means the same if they are recomputed exactly."""
    entry = ZOO["mlp"]
    spec = PSOFT(rank=4, targets=TARGETS, **options)
    pm = peft_model(entry.model().to(dtype), _peft_config(spec, TARGETS), seed=None)
    cm = surgeon.compile(entry.model().to(dtype), spec)
    for path, layer in _layers(cm).items():
        theirs = pm.base_model.model.get_submodule(path)
        assert layer.A.dtype == layer.B.dtype == torch.float32
        assert torch.equal(layer.A, theirs._psoft_A_cache["default"]), path
        assert torch.equal(layer.B, theirs._psoft_B_cache["default"]), path


def _peft_config(spec: PSOFT, targets: tuple[str, ...]) -> peft.PsoftConfig:
    """PEFT's config for ``spec`` (as surgeon writes it) on the module names ``targets``."""
    config = spec.to_peft_config(())
    config.pop("peft_type")
    return peft.PsoftConfig(**{**config, "target_modules": list(targets)})


def test_factors_span_the_principal_subspace():
    torch.manual_seed(0)
    layer = nn.Linear(9, 7)
    spec = PSOFT(rank=3, alpha=6, targets=("layer",))
    (adapter,) = _layers(surgeon.compile(One(layer), spec)).values()
    u, s, vh = torch.linalg.svd(layer.weight.detach(), full_matrices=False)
    torch.testing.assert_close(adapter.A @ adapter.A.T, torch.eye(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(adapter.B * adapter.scale @ adapter.A, u[:, :3] * s[:3] @ vh[:3])


def test_lowrank_svd_draws_from_the_seed_and_leaves_the_global_generator_alone():
    def factors(seed):
        torch.manual_seed(123)
        spec = PSOFT(rank=3, svd="lowrank", svd_iterations=0, seed=seed, targets=TARGETS)
        cm = surgeon.compile(ZOO["mlp"].model(), spec)
        after = torch.rand(3)
        torch.manual_seed(123)
        ZOO["mlp"].model()
        assert torch.equal(after, torch.rand(3))  # compile drew nothing from the global generator
        return [layer.A for layer in _layers(cm).values()]

    first, again, other = factors(4), factors(4), factors(5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # with no power iteration the random projection shows in the factors
    assert not all(torch.allclose(a.abs(), b.abs(), atol=1e-4) for a, b in zip(first, other))


# -- R -------------------------------------------------------------------------------------------

ROTATIONS = [
    {},
    {"scale_in": False},
    {"scale_out": False, "scale_in": False},
    {"orthogonal": False},
    *({"neumann_terms": t} for t in (1, 2, 3, 4, 5, 7)),
    {"neumann_terms": 4, "neumann_eps": 0.5},
    {"neumann_terms": 6, "neumann_eps": 0.99},
]


@pytest.mark.parametrize(
    "options", ROTATIONS, ids=lambda o: "-".join(map(str, o.items())) or "default"
)
def test_rotation_is_peft_matrix_and_the_formula(options):
    spec = PSOFT(rank=5, targets=("layer",), **options)
    rotation = Rotation(spec, torch.device("cpu"), torch.float32)
    theirs = OrthLayer(
        5,
        orth=spec.orthogonal,
        mag_b=spec.scale_out,
        mag_a=spec.scale_in,
        use_cayley_neumann=spec.neumann_terms is not None,
        num_cayley_neumann_terms=spec.neumann_terms or 5,
        cayley_neumann_eps=spec.neumann_eps,
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, mine in rotation.named_parameters():
            mine.add_(torch.randn(mine.shape, generator=generator) * 0.4)
            theirs.get_parameter(PEFT_NAMES[name].removeprefix("psoft_R.")).copy_(mine)
    matrix = rotation()
    assert torch.equal(matrix, theirs.get_matrix())
    torch.testing.assert_close(matrix, _matrix(spec, rotation), rtol=1e-5, atol=1e-6)


def test_cayley_gives_an_orthogonal_matrix_and_neumann_approximates_it():
    exact = Rotation(
        PSOFT(rank=6, scale_in=False, scale_out=False), torch.device("cpu"), torch.float32
    )
    with torch.no_grad():
        exact.weight.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    r = exact()
    torch.testing.assert_close(r @ r.T, torch.eye(6), atol=1e-6, rtol=0)
    assert not torch.allclose(r, torch.eye(6), atol=1e-2)
    series = Rotation(
        PSOFT(rank=6, scale_in=False, scale_out=False, neumann_terms=12),
        torch.device("cpu"),
        torch.float32,
    )
    series.load_state_dict(exact.state_dict())
    torch.testing.assert_close(series(), r, atol=1e-6, rtol=0)


def test_only_r_trains():
    entry = ZOO["mlp"]
    cm = surgeon.compile(entry.model(), PSOFT(rank=4, targets=TARGETS))
    assert not any(n.endswith((".A", ".B")) for n, _ in cm.named_parameters())
    # per layer: r(r-1)/2 entries above Q's diagonal and two r-vectors
    assert cm.num_trainable() == 3 * (4 * 3 // 2 + 2 * 4)
    randomize(cm)
    cm.train()
    logits(cm(**entry.example())).pow(2).mean().backward()
    assert all(layer.A.grad is None for layer in _layers(cm).values())


def test_dropout_is_live_in_train_mode_and_off_in_eval():
    cm = surgeon.compile(ZOO["mlp"].model(), PSOFT(rank=4, targets=("head",), dropout=0.5))
    randomize(cm)
    x = torch.randn(8, 12)
    cm.eval()
    torch.testing.assert_close(cm(x), cm(x))
    cm.train()
    torch.manual_seed(0)
    assert not torch.allclose(cm(x), cm(x))


# -- merge ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"init": "pissa", "neumann_terms": 3}, {"orthogonal": False, "scale_in": False}],
    ids=["cayley", "pissa-neumann", "free"],
)
def test_merge_adds_the_rotated_principal_part_and_unmerge_restores(options):
    torch.manual_seed(0)
    model = One(nn.Linear(8, 6))
    spec = PSOFT(rank=4, alpha=2, targets=("layer",), **options)
    cm = surgeon.compile(model, spec).eval()
    randomize(cm, scale=0.5)
    (adapter,) = _layers(cm).values()
    weight = model.layer.weight.detach().clone()
    x = torch.randn(3, 8)
    expected = formula(spec, adapter, model.layer, x)
    cm.merge()
    torch.testing.assert_close(model.layer.weight, weight + _delta(spec, adapter.rotation, weight))
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(model.layer.weight, weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)


# -- PEFT parity on what the examples leave out -----------------------------------------------

PARITY = {
    "psoft-lowrank-exact": {"svd": "lowrank", "seed": 9, "scale_in": False},
    "pissa-full-neumann": {"init": "pissa", "neumann_terms": 3, "alpha": 2, "dropout": 0.2},
    "free-scaled": {"orthogonal": False, "alpha": 64},
}


@pytest.mark.parametrize("options", PARITY.values(), ids=PARITY.keys())
def test_peft_file_loads_with_peft_outputs_and_ours_loads_in_peft(options, tmp_path):
    entry = ZOO["mlp"]
    spec = PSOFT(rank=5, targets=TARGETS, **options)
    pm = peft_model(entry.model(), _peft_config(spec, TARGETS))
    x = entry.example()
    expected = logits(pm(**x))
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-4)
    pm.save_pretrained(tmp_path / "peft")
    cm = surgeon.load(entry.model(), tmp_path / "peft").eval()
    loaded = cm.spec("default")
    assert set(loaded.targets) == set(TARGETS) and loaded.replace(targets=TARGETS) == spec
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-5)
    cm.save_adapters(tmp_path / "ours")
    again = peft_loaded(entry.model(), tmp_path / "ours")
    torch.testing.assert_close(logits(again(**x)), expected, rtol=1e-5, atol=1e-5)


def test_peft_random_init_of_r_loads_from_the_file(tmp_path):
    """init_weights=False only decides R's first values, which the file holds."""
    entry = ZOO["mlp"]
    config = peft.PsoftConfig(r=3, target_modules=["body.3"], init_weights=False)
    pm = peft_model(entry.model(), config, seed=None)
    pm.save_pretrained(tmp_path)
    x = entry.example()
    cm = surgeon.load(entry.model(), tmp_path)
    assert not torch.allclose(logits(cm(**x)), logits(entry.model()(**x)), atol=1e-4)
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "changes",
    [
        {"fan_in_fan_out": True},  # PEFT turns it off on Linear layers
        {"use_cayley_neumann": False, "num_cayley_neumann_terms": 0, "cayley_neumann_eps": 3.0},
        {"psoft_svd": "full", "psoft_svd_lowrank_niter": 1, "random_seed": 8},
    ],
    ids=["fan-in-fan-out", "neumann-off", "lowrank-options-unused"],
)
def test_keys_peft_ignores_load_with_peft_outputs(changes, tmp_path):
    entry = ZOO["mlp"]
    pm = peft_model(entry.model(), peft.PsoftConfig(r=3, target_modules=["body.0", "head"]))
    pm.save_pretrained(tmp_path)
    x = entry.example()
    expected = logits(pm(**x))
    cm = load_with_changed_config(entry.model(), tmp_path, changes)
    assert cm.spec("default").neumann_terms is None
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-5)
    theirs = peft_loaded(entry.model(), tmp_path)
    torch.testing.assert_close(logits(theirs(**x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"ab_svd_init": "olora_init"}, "ab_svd_init"),
        ({"psoft_svd": "randomized"}, "psoft_svd"),
        ({"use_cayley_neumann": True, "num_cayley_neumann_terms": 0}, "num_cayley_neumann_terms"),
        ({"use_cayley_neumann": True, "cayley_neumann_eps": 1.5}, "cayley_neumann_eps"),
        ({"psoft_dropout": 1.0}, "psoft_dropout"),
        ({"random_seed": -1}, "random_seed"),
        ({"r": 0}, "'r'"),
        ({"psoft_orth": "yes"}, "psoft_orth"),
    ],
)
def test_peft_values_surgeon_cannot_honour_are_refused_naming_the_key(changes, key, tmp_path):
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), PSOFT(rank=3, targets=("head",))).save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, **changes}))
    with pytest.raises(surgeon.SpecError, match=key):
        surgeon.load(entry.model(), tmp_path)


def test_written_config_is_peft_config():
    spec = PSOFT(rank=3, init="pissa", svd="lowrank", neumann_terms=4, neumann_eps=0.8)
    config = spec.to_peft_config(["a.q_proj"])
    assert {k: config[k] for k in ("ab_svd_init", "use_cayley_neumann", "psoft_mag_a")} == {
        "ab_svd_init": "pissa_init",
        "use_cayley_neumann": True,
        "psoft_mag_a": True,
    }
    peft_config = peft.get_peft_config(config)
    assert peft_config.num_cayley_neumann_terms == 4 and peft_config.cayley_neumann_eps == 0.8
    exact = PSOFT().to_peft_config(["a.q_proj"])
    assert exact["use_cayley_neumann"] is False and exact["cayley_neumann_eps"] is None


# -- errors and layers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"PSOFT.rank=0: expected an integer >= 1"),
        ({"init": "olora"}, r"PSOFT.init='olora': expected one of 'psoft', 'pissa'"),
        ({"svd": "randomized"}, r"PSOFT.svd='randomized': expected one of 'full', 'lowrank'"),
        ({"svd_iterations": -1}, r"PSOFT.svd_iterations=-1: expected an integer >= 0"),
        ({"neumann_terms": 0}, r"PSOFT.neumann_terms=0: expected an integer >= 1"),
        ({"neumann_terms": 3, "neumann_eps": 1.0}, r"PSOFT.neumann_eps=1.0: expected a number"),
        ({"neumann_eps": 0.5}, r"PSOFT.neumann_eps=0.5: only applies to the Neumann series"),
        ({"orthogonal": 1}, r"PSOFT.orthogonal=1: expected true or false"),
        ({"scale": True}, r"PSOFT has no field 'scale'"),
    ],
)
def test_bad_fields_are_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        PSOFT(**fields)


def test_layers_psoft_cannot_adapt_are_refused():
    spec = PSOFT(rank=2)
    assert spec.supports(nn.Linear(4, 4))
    for layer in (gpt2_conv1d(), nn.Conv2d(3, 4, 1), nn.Embedding(5, 4)):
        assert not spec.supports(layer)
    with pytest.raises(surgeon.SpecError, match=r"c_attn \(Conv1D\)"):
        surgeon.compile(ZOO["gpt2"].model(), PSOFT(rank=2, targets=("c_attn",)))


def test_a_rank_above_the_layer_size_or_a_double_weight_is_refused():
    with pytest.raises(surgeon.SpecError, match=r"PSOFT.rank=6 on layer: must be at most .* = 5"):
        surgeon.compile(One(nn.Linear(5, 8)), PSOFT(rank=6, targets=("layer",)))
    with pytest.raises(surgeon.SpecError, match=r"torch.float64"):
        surgeon.compile(One(nn.Linear(5, 8).double()), PSOFT(rank=2, targets=("layer",)))


def test_meta_device_gives_factor_shapes():
    with torch.device("meta"):
        model = One(nn.Linear(9, 7))
    spec = PSOFT(rank=3, svd="lowrank", neumann_terms=4, neumann_eps=0.5, targets=("layer",))
    cm = surgeon.compile(model, spec)
    (adapter,) = _layers(cm).values()
    assert adapter.A.is_meta and adapter.A.shape == (3, 9) and adapter.B.shape == (7, 3)
    assert cm(torch.empty(2, 9, device="meta")).shape == (2, 7)
