"""Weighted adapter combinations (`cm.merge_adapters`): PEFT's add_weighted_adapter, matched.

The same two LoRA adapters live in a PEFT model and in a surgeon model (saved by PEFT, loaded by
surgeon); every combination must give the same tensors and outputs on both sides. Outputs match
to 1e-5 for the SVD-based combinations too: both sides build the same deltas with the same ops,
and the CPU SVD of identical inputs is deterministic, so nothing drifts apart.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn
from zoo import ZOO, add_noise, logits, peft_loaded, peft_model, randomize

import surgeon
from surgeon.combine import Options, drop_at_random, mask_drawer, merge_tensors

peft = pytest.importorskip("peft")
lora_model = pytest.importorskip("peft.tuners.lora.model")

ENTRY = ZOO["llama"]
WEIGHTS = {"default": 0.7, "other": -0.4}
SEED = 11
# The two adapters target different layers (v_proj is shared); "mixed" also differs in rank.
DEFAULT = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"]}
OTHERS = {
    "same": {"r": 4, "lora_alpha": 3, "target_modules": ["v_proj", "down_proj"]},
    "mixed": {
        "r": 2,
        "lora_alpha": 3,
        "target_modules": ["v_proj", "down_proj"],
        "rank_pattern": {"down_proj": 3},
    },
}


def _saved_by_peft(directory, other: dict, dtype=torch.float32):
    model = peft_model(ENTRY.model().to(dtype), peft.LoraConfig(**DEFAULT), seed=None)
    model.add_adapter("other", peft.LoraConfig(**other))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    model.save_pretrained(directory)


def _both(directory, dtype=torch.float32):
    pm = peft_loaded(ENTRY.model().to(dtype), directory)
    pm.load_adapter(directory / "other", "other")
    cm = surgeon.load(ENTRY.model().to(dtype), directory)
    cm.load_adapters(directory / "other", "other")
    return pm, cm


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """'same' / 'mixed' -> (PEFT model, surgeon model) holding the adapters default and other."""
    loaded = {}
    for kind, other in OTHERS.items():
        directory = tmp_path_factory.mktemp(kind)
        _saved_by_peft(directory, other)
        loaded[kind] = _both(directory)
    return loaded


@pytest.fixture
def reseed_peft_after_injection(monkeypatch):
    """PEFT draws the new adapter's init from the global RNG before DARE's masks; reseed right
    after that, so its masks come from the stream surgeon's ``seed`` starts."""
    freeze = lora_model._freeze_adapter

    def freeze_then_reseed(*args):
        freeze(*args)
        torch.manual_seed(SEED)

    monkeypatch.setattr(lora_model, "_freeze_adapter", freeze_then_reseed)


@contextlib.contextmanager
def _combined(pm, cm, name: str, how: str, options: dict, weights=WEIGHTS):
    """The combination ``name`` made on both sides and active; removed again afterwards."""
    peft_options = {k: v for k, v in options.items() if k != "seed"}
    pm.add_weighted_adapter(
        list(weights), list(weights.values()), name, combination_type=how, **peft_options
    )
    cm.merge_adapters(weights, name, how=how, **options)
    pm.set_adapter(name)
    cm.set_active(name)
    try:
        yield
    finally:
        pm.set_adapter("default")
        pm.delete_adapter(name)
        cm.set_active("default")
        cm.delete_adapter(name)


def _peft_lora_tensors(pm, name: str) -> dict[str, torch.Tensor]:
    state = peft.get_peft_model_state_dict(pm, adapter_name=name)
    return {k: v for k, v in state.items() if "lora_" in k}


def _assert_same_tensors(theirs: dict, ours: dict, padded: bool) -> None:
    """PEFT pads ``cat`` factors with zeros up to the sum of the configured ranks; surgeon keeps
    each layer's own rank."""
    assert set(theirs) == set(ours)
    for key, mine in ours.items():
        peft_tensor = theirs[key]
        rank_dim = 0 if "_A" in key else 1
        if padded:
            rank, padded_rank = mine.shape[rank_dim], peft_tensor.shape[rank_dim]
            assert not peft_tensor.narrow(rank_dim, rank, padded_rank - rank).any(), key
            peft_tensor = peft_tensor.narrow(rank_dim, 0, rank)
        # PEFT's cat writes into a new adapter of the base's dtype; surgeon keeps float32 adapters
        mine = mine.to(peft_tensor.dtype)
        torch.testing.assert_close(mine, peft_tensor, rtol=1e-5, atol=1e-6, msg=key)


DARE = {"density": 0.5, "seed": SEED}
CASES = [
    ("same", "linear", {}),
    ("same", "ties", {"density": 0.5}),
    ("same", "ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("same", "dare_linear", DARE),
    ("same", "dare_ties", {**DARE, "density": 0.7}),
    ("same", "magnitude_prune", {"density": 0.4}),
    ("mixed", "cat", {}),
    ("mixed", "svd", {}),
    ("mixed", "svd", {"svd_rank": 3, "svd_clamp": 0.9, "svd_full_matrices": False}),
    ("mixed", "ties_svd", {"density": 0.5}),
    ("mixed", "dare_linear_svd", DARE),
    ("mixed", "dare_ties_svd", {**DARE, "majority_sign_method": "frequency"}),
    ("mixed", "magnitude_prune_svd", {"density": 0.4}),
]


@pytest.mark.parametrize(
    ("pair", "how", "options"),
    CASES,
    ids=[f"{how}-{'-'.join(map(str, o.values())) or 'plain'}" for _, how, o in CASES],
)
def test_matches_peft_add_weighted_adapter(pairs, pair, how, options, reseed_peft_after_injection):
    pm, cm = pairs[pair]
    x = ENTRY.example()
    with cm.disabled():
        base = logits(cm(**x))
    with _combined(pm, cm, "ab", how, options):
        ours = logits(cm(**x))
        assert not torch.allclose(ours, base, atol=1e-3)  # the combination matters
        torch.testing.assert_close(ours, logits(pm(**x)), rtol=1e-5, atol=1e-5)
        theirs = _peft_lora_tensors(pm, "ab")
        _assert_same_tensors(theirs, cm.adapter_state_dict("ab"), padded=how == "cat")


def _sources(cm, path: str):
    return [
        (weight, dict(cm.store.items(name))[path])
        for name, weight in WEIGHTS.items()
        if path in cm.store.paths[name]
    ]


@pytest.mark.parametrize(("how", "options"), [("cat", {}), ("svd", {"svd_rank": 7})])
def test_cat_and_full_rank_svd_are_the_weighted_sum_of_the_deltas(pairs, how, options):
    _, cm = pairs["mixed"]
    cm.merge_adapters(WEIGHTS, "sum", how=how, **options)
    try:
        for path, layer in cm.store.items("sum"):
            expected = sum(w * source.delta_weight() for w, source in _sources(cm, path))
            assert layer.scale == 1.0
            torch.testing.assert_close(layer.delta_weight(), expected, rtol=1e-5, atol=1e-6)
    finally:
        cm.delete_adapter("sum")


def test_linear_folds_the_square_root_of_weight_times_scale_into_each_factor(pairs):
    _, cm = pairs["same"]
    cm.merge_adapters(WEIGHTS, "lin", how="linear")
    try:
        for path, layer in cm.store.items("lin"):
            folded = [(w * s.scale, s) for w, s in _sources(cm, path)]
            a = sum(math.copysign(math.sqrt(abs(f)), f) * s.lora_A for f, s in folded)
            b = sum(math.sqrt(abs(f)) * s.lora_B for f, s in folded)
            torch.testing.assert_close(layer.lora_A, a, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(layer.lora_B, b, rtol=1e-6, atol=1e-7)
    finally:
        cm.delete_adapter("lin")


HAND_A = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
HAND_B = torch.tensor([[-2.5, -2.0], [1.0, -4.0]])


@pytest.mark.parametrize(
    ("method", "options", "expected"),
    [
        # top half by magnitude: A keeps 3, 2; B keeps -2.5, -4
        ("magnitude_prune", {}, [[3 - 5.0, 0], [0, 2 - 8.0]]),
        # elected signs (of the sum): +, +, +, -; each entry averages the adapters that agree
        ("ties", {}, [[3.0, 0], [0, -8.0]]),
        # elected signs (by count): all + (ties go to +), so only A's entries stay
        ("ties", {"majority_sign_method": "frequency"}, [[3.0, 0], [0, 2.0]]),
    ],
)
def test_pruning_merges_by_hand(method, options, expected):
    opts = Options(density=0.5, **options)
    merged = merge_tensors(
        method, [HAND_A, HAND_B], torch.tensor([1.0, 2.0]), opts, mask_drawer(None)
    )
    torch.testing.assert_close(merged, torch.tensor(expected))


def test_dare_drops_at_random_and_rescales_to_keep_the_mean():
    tensor = torch.ones(20000)
    kept = drop_at_random(tensor, 0.25, mask_drawer(0))
    assert set(kept.unique().tolist()) == {0.0, 4.0}
    assert abs(kept.mean().item() - 1.0) < 0.05


def test_dare_is_seedable(pairs):
    _, cm = pairs["same"]
    names = {"s1": 1, "s1_again": 1, "s2": 2}
    for name, seed in names.items():
        cm.merge_adapters(WEIGHTS, name, how="dare_ties", density=0.5, seed=seed)
    for name in ("g1", "g1_again"):  # no seed: torch's global RNG, as PEFT
        torch.manual_seed(3)
        cm.merge_adapters(WEIGHTS, name, how="dare_linear", density=0.5)
    try:
        tensors = {n: cm.adapter_state_dict(n) for n in [*names, "g1", "g1_again"]}
        for a, b in [("s1", "s1_again"), ("g1", "g1_again")]:
            for key in tensors[a]:
                assert torch.equal(tensors[a][key], tensors[b][key]), key
        assert any(not torch.equal(tensors["s1"][k], tensors["s2"][k]) for k in tensors["s1"])
    finally:
        for name in [*names, "g1", "g1_again"]:
            cm.delete_adapter(name)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize(
    ("how", "options"),
    [("linear", {}), ("cat", {}), ("svd", {"svd_rank": 1}), ("ties", {"density": 0.2})],
)
def test_one_adapter_at_weight_one_is_that_adapter(how, options, rslora):
    """PEFT combines a single adapter linearly whatever ``how`` says; with rsLoRA sources the
    installed PEFT scales the result by sqrt(rank) (huggingface/peft#3449), surgeon does not."""
    cm = surgeon.compile(ENTRY.model(), surgeon.LoRA(rank=4, alpha=8, rslora=rslora))
    randomize(cm)
    x = ENTRY.example()
    expected = logits(cm(**x))
    cm.merge_adapters({"default": 1.0}, "same", how=how, **options)
    cm.set_active("same")
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-5)


def test_a_combined_adapter_merges_into_the_weights_with_the_same_outputs(pairs):
    _, cm = pairs["mixed"]
    cm.merge_adapters(WEIGHTS, "folded", how="svd")
    cm.set_active("folded")
    x = ENTRY.example()
    try:
        unmerged = logits(cm(**x))
        cm.merge()
        torch.testing.assert_close(logits(cm(**x)), unmerged, rtol=1e-5, atol=1e-5)
    finally:
        cm.unmerge()
        cm.set_active("default")
        cm.delete_adapter("folded")


def test_the_combined_spec_names_its_layers_and_keeps_scale_one(pairs):
    _, cm = pairs["mixed"]
    cm.merge_adapters(WEIGHTS, "spec", how="cat")
    try:
        spec = cm.spec("spec")
        paths = sorted(set(cm.store.paths["default"]) | set(cm.store.paths["other"]))
        assert spec.targets == tuple(paths)
        # q_proj and embed_tokens keep default's rank 4; v_proj has 4 + 2, down_proj other's 3
        assert (spec.rank, spec.alpha, spec.rslora) == (4, 4, False)
        assert spec.rank_pattern == spec.alpha_pattern
        ranks = {p: layer.rank for p, layer in cm.store.items("spec")}
        assert {p.rsplit(".", 1)[-1]: r for p, r in ranks.items()} == {
            "embed_tokens": 4,
            "q_proj": 4,
            "v_proj": 6,
            "down_proj": 3,
        }
        assert all(layer.scale == 1.0 for _, layer in cm.store.items("spec"))
    finally:
        cm.delete_adapter("spec")


@pytest.mark.parametrize("how", ["cat", "dare_ties_svd"])
def test_a_combined_adapter_saves_and_reloads_in_surgeon_and_peft(pairs, how, tmp_path):
    _, cm = pairs["mixed"]
    options = {"density": 0.5, "seed": 1} if how.startswith("dare") else {}
    cm.merge_adapters(WEIGHTS, "saved", how=how, **options)
    cm.set_active("saved")
    x = ENTRY.example()
    try:
        expected = logits(cm(**x))
        cm.save_adapters(tmp_path, names=["saved"])
    finally:
        cm.set_active("default")
        cm.delete_adapter("saved")
    reloaded = surgeon.load(ENTRY.model(), tmp_path / "saved")
    torch.testing.assert_close(logits(reloaded(**x)), expected, rtol=1e-5, atol=1e-5)
    in_peft = peft_loaded(ENTRY.model(), tmp_path / "saved")
    torch.testing.assert_close(logits(in_peft(**x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("how", "options"), [("cat", {}), ("svd", {})])
def test_bfloat16_bases_match_peft(how, options, tmp_path):
    _saved_by_peft(tmp_path, OTHERS["mixed"], torch.bfloat16)
    pm, cm = _both(tmp_path, torch.bfloat16)
    x = ENTRY.example()
    with _combined(pm, cm, "ab", how, options):
        ours = logits(cm(**x))
        assert ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours, logits(pm(**x)), rtol=0, atol=1e-2)
        _assert_same_tensors(
            _peft_lora_tensors(pm, "ab"), cm.adapter_state_dict("ab"), how == "cat"
        )


class Nested(nn.Module):
    """``fc`` is also the end of ``inner.fc``'s path."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.inner = nn.ModuleDict({"fc": nn.Linear(4, 4)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner["fc"](self.fc(x))


def test_a_path_that_ends_another_path_is_targeted_exactly():
    spec = surgeon.Spec(
        {"a": surgeon.LoRA(rank=2, targets="fc"), "b": surgeon.LoRA(rank=2, targets="fc")}
    )
    cm = surgeon.compile(Nested().eval(), spec)
    randomize(cm)
    cm.merge_adapters({"a": 0.5, "b": 0.5}, "ab", how="cat")
    assert cm.store.paths["ab"] == ["fc"]
    assert cm.spec("ab").targets == "fc"  # a regex: the list ["fc"] would select inner.fc too
    x = torch.randn(3, 4)
    cm.set_active(["a", "b"])
    halves = logits(cm(x))
    cm.set_active("ab")
    with cm.disabled():
        base = cm(x)
    # cat of a and b at 0.5 each is half of running both
    torch.testing.assert_close(cm(x) - base, (halves - base) / 2, rtol=1e-5, atol=1e-6)


def test_ranks_that_differ_on_one_layer_are_refused_for_factorwise_combinations(tmp_path):
    spec = surgeon.Spec(
        {
            "a": surgeon.LoRA(rank=4, rank_pattern={"v_proj": 2}),
            "b": surgeon.LoRA(rank=4, rank_pattern={"q_proj": 2}),
        }
    )
    cm = surgeon.compile(ENTRY.model(), spec)
    with pytest.raises(surgeon.SpecError, match=r"q_proj has ranks \[2, 4\].*how='cat'"):
        cm.merge_adapters({"a": 1.0, "b": 1.0}, "ab", how="linear")
    assert cm.adapters == ["a", "b"]


@pytest.mark.parametrize(
    ("weights", "how", "options", "message"),
    [
        (WEIGHTS, "average", {}, r"how='average' is not a combination.*allowed: cat, linear"),
        ({"defualt": 1.0}, "linear", {}, r"no adapter named 'defualt'; did you mean 'default'"),
        ({}, "linear", {}, "weights is empty"),
        (WEIGHTS, "linear", {}, r"'default' has rank 4, 'other' has rank 3.*how='cat'"),
        (WEIGHTS, "ties", {}, r"how='ties'\) needs density"),
        (WEIGHTS, "ties", {"density": 0}, r"density=0: expected a number in \(0, 1\]"),
        (WEIGHTS, "dare_linear", {"density": 1.5}, r"density=1.5: expected a number in \(0, 1\]"),
        (WEIGHTS, "cat", {"density": 0.5}, r"how='cat'\) takes no option 'density'"),
        (WEIGHTS, "ties", {"density": 0.5, "seed": 1}, r"takes no option 'seed'"),
        (WEIGHTS, "ties", {"density": 0.5, "majority_sign_method": "mean"}, "majority_sign"),
        (WEIGHTS, "svd", {"svd_rank": 0}, r"svd_rank=0: expected an integer >= 1"),
        (WEIGHTS, "svd", {"svd_driver": "gesvd"}, "works on CUDA only"),
        ({"default": "high", "other": 1.0}, "cat", {}, r"weights\['default'\]='high'"),
        ({"default": math.nan, "other": 1.0}, "cat", {}, "expected a finite number"),
        (WEIGHTS, "cat", {}, "'other' already exists"),
    ],
)
def test_bad_arguments_raise_spec_errors_and_change_nothing(pairs, weights, how, options, message):
    _, cm = pairs["mixed"]
    name = "other" if message.endswith("already exists") else "new"
    with pytest.raises(surgeon.SpecError, match=message):
        cm.merge_adapters(weights, name, how=how, **options)
    assert cm.adapters == ["default", "other"]


def test_lora_and_ia3_adapters_do_not_combine_with_each_other():
    cm = surgeon.compile(ENTRY.model(), surgeon.LoRA())
    cm.add_adapter("scaled", surgeon.IA3())
    with pytest.raises(
        surgeon.SpecError,
        match="'scaled' is ia3 and 'default' is lora; weighted merging combines adapters of one method",
    ):
        cm.merge_adapters({"default": 1.0, "scaled": 1.0}, "mix", how="cat")
    assert cm.adapters == ["default", "scaled"]


def test_ia3_adapters_combine_linearly_like_peft(tmp_path):
    entry = ZOO["llama"]
    pm = peft_model(
        entry.model(),
        peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        seed=None,
        adapter_name="a",
    )
    pm.add_adapter(
        "b",
        peft.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    # both adapters (PEFT trains only the active one)
    add_noise((p for n, p in pm.named_parameters() if "ia3_l" in n), seed=3, scale=0.2)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path / "a", name="a")
    cm.load_adapters(tmp_path / "b", name="b")
    pm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "ab")
    pm.set_adapter("ab")
    cm.merge_adapters({"a": 0.7, "b": -0.4}, name="ab")
    cm.set_active("ab")
    x = entry.example()
    torch.testing.assert_close(logits(cm(**x)), logits(pm.eval()(**x)), rtol=1e-5, atol=1e-5)
    assert sorted(cm.store.paths["ab"]) == sorted(
        cm.store.paths["a"] + [p for p in cm.store.paths["b"] if p not in cm.store.paths["a"]]
    )
    with pytest.raises(surgeon.SpecError, match="IA3 adapters combine by linear only"):
        cm.merge_adapters({"a": 1.0, "b": 1.0}, name="ties", how="ties", density=0.5)
