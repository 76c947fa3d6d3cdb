"""Target selection: suffixes, regexes, presets, layers, exclude, rank/alpha patterns, errors, PEFT parity."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from zoo import ZOO, logits, peft_model

import surgeon
from surgeon.targets import layer_index


def _paths(entry: str, **lora) -> list[str]:
    cm = surgeon.compile(ZOO[entry].model(), surgeon.LoRA(**lora))
    return cm.store.paths["default"]


def _error(entry: str, **lora) -> str:
    with pytest.raises(surgeon.SpecError) as info:
        surgeon.compile(ZOO[entry].model(), surgeon.LoRA(**lora))
    return str(info.value)


def _llama(names, layers=(0, 1)) -> list[str]:
    where = {
        "q_proj": "self_attn",
        "k_proj": "self_attn",
        "v_proj": "self_attn",
        "o_proj": "self_attn",
    }
    return [f"model.layers.{i}.{where.get(n, 'mlp')}.{n}" for i in layers for n in names]


def _gpt2(names, layers=(0, 1)) -> list[str]:
    return [f"transformer.h.{i}.{n}" for i in layers for n in names]


def _bert(names, layers=(0, 1)) -> list[str]:
    return [f"bert.encoder.layer.{i}.{n}" for i in layers for n in names]


LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")
GPT2_ATTN = ("attn.c_attn", "attn.c_proj")
GPT2_MLP = ("mlp.c_fc", "mlp.c_proj")
BERT_ATTN = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
)
BERT_MLP = ("intermediate.dense", "output.dense")


# -- name suffixes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "targets", "expected"),
    [
        ("mlp", ("head",), ["head"]),
        ("mlp", ("body.0", "head"), ["body.0", "head"]),
        ("mlp", ("head", "body.3", "body.0"), ["body.0", "body.3", "head"]),  # model order
        ("mlp", ("0",), ["body.0"]),  # a suffix is a whole path component
        ("cnn", ("conv1", "seq"), ["conv1", "seq"]),
        ("cnn", ("conv1", "conv1"), ["conv1"]),  # repeated selectors select once
        ("llama", ("q_proj", "v_proj"), _llama(["q_proj", "v_proj"])),
        ("llama", ("self_attn.q_proj",), _llama(["q_proj"])),
        ("llama", ("layers.1.self_attn.q_proj",), _llama(["q_proj"], [1])),
        ("llama", ("model.layers.0.mlp.down_proj",), _llama(["down_proj"], [0])),  # a full path
        ("llama", ("embed_tokens", "down_proj"), ["model.embed_tokens", *_llama(["down_proj"])]),
        ("llama", ("lm_head",), ["lm_head"]),  # named explicitly, the output head is fine
        ("gpt2", ("c_attn",), _gpt2(["attn.c_attn"])),
        ("gpt2", ("c_proj",), _gpt2(["attn.c_proj", "mlp.c_proj"])),
        ("gpt2", ("mlp.c_proj", "wte"), ["transformer.wte", *_gpt2(["mlp.c_proj"])]),
        ("bert", ("query", "value"), _bert(["attention.self.query", "attention.self.value"])),
        (
            "bert",
            ("dense",),
            [
                *_bert(["attention.output.dense", "intermediate.dense", "output.dense"]),
                "bert.pooler.dense",
            ],
        ),
        ("bert", ("output.dense",), _bert(["attention.output.dense", "output.dense"])),
    ],
)
def test_name_suffixes(entry, targets, expected):
    assert _paths(entry, targets=targets) == expected


# -- regexes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "regex", "expected"),
    [
        ("mlp", r"body\.[03]", ["body.0", "body.3"]),
        ("mlp", "head", ["head"]),
        ("cnn", "conv.", ["conv1", "conv2"]),
        ("llama", r".*\.(q|v)_proj", _llama(["q_proj", "v_proj"])),
        ("llama", r".*layers\.1\.self_attn\.(q|k)_proj", _llama(["q_proj", "k_proj"], [1])),
        ("llama", r"model\.layers\.0\.mlp\..*_proj", _llama(LLAMA_MLP, [0])),
        ("llama", r".*_proj", _llama(LLAMA_ATTN + LLAMA_MLP)),
        ("gpt2", r"transformer\.h\.\d\.attn\.c_attn", _gpt2(["attn.c_attn"])),
        ("bert", r".*self\.(query|key)", _bert(["attention.self.query", "attention.self.key"])),
    ],
)
def test_regex_is_fullmatched_against_the_path(entry, regex, expected):
    assert _paths(entry, targets=regex) == expected


@pytest.mark.parametrize(
    ("entry", "regex"),
    [
        ("llama", "q_proj"),
        ("llama", r"self_attn\.q_proj"),
        ("llama", r"model\.layers\.0"),
        ("mlp", "body"),
    ],
)
def test_regex_needs_the_whole_path(entry, regex):
    message = _error(entry, targets=regex)
    assert f"LoRA.targets={regex!r}" in message


# -- presets ---------------------------------------------------------------------------------------

PRESETS = {
    ("mlp", "all-linear"): [
        "body.0",
        "body.3",
        "head",
    ],  # not a transformers model: no head to skip
    ("cnn", "all-linear"): ["fc"],
    ("llama", "all-linear"): _llama(LLAMA_ATTN + LLAMA_MLP),  # without lm_head
    ("llama", "attention"): _llama(LLAMA_ATTN),
    ("llama", "mlp"): _llama(LLAMA_MLP),
    ("gpt2", "all-linear"): _gpt2(GPT2_ATTN + GPT2_MLP),  # Conv1D counts, lm_head does not
    ("gpt2", "attention"): _gpt2(GPT2_ATTN),
    ("gpt2", "mlp"): _gpt2(GPT2_MLP),
    # a classifier is no output embedding: PEFT keeps it too (unless task_type=SEQ_CLS)
    ("bert", "all-linear"): [*_bert(BERT_ATTN + BERT_MLP), "bert.pooler.dense", "classifier"],
    ("bert", "attention"): _bert(BERT_ATTN),
    ("bert", "mlp"): _bert(BERT_MLP),
}


@pytest.mark.parametrize(("entry", "preset"), list(PRESETS), ids=[f"{e}-{p}" for e, p in PRESETS])
def test_presets(entry, preset):
    assert _paths(entry, targets=preset) == PRESETS[(entry, preset)]


@pytest.mark.parametrize(
    ("entry", "preset"), [("mlp", "attention"), ("cnn", "mlp"), ("mlp", "mlp")]
)
def test_preset_that_finds_nothing_is_an_error(entry, preset):
    assert f"LoRA.targets={preset!r} matches no module" in _error(entry, targets=preset)


def test_preset_whose_every_layer_the_method_cannot_adapt_is_an_error():
    """GPT-2's linear layers are Conv1D, which OSF (nn.Linear only, as PEFT) cannot adapt:
    all-linear must not compile to a model with no adapter."""
    model = ZOO["gpt2"].model()
    with pytest.raises(surgeon.SpecError) as err:
        surgeon.compile(model, surgeon.OSF(targets="all-linear"))
    assert "OSF.targets='all-linear' selects only layers OSF cannot adapt (Conv1D" in str(err.value)
    assert all(p.requires_grad for p in model.parameters())


# -- layers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "lora", "expected"),
    [
        (
            "llama",
            {"targets": ("q_proj", "v_proj"), "layers": [1]},
            _llama(["q_proj", "v_proj"], [1]),
        ),
        ("llama", {"targets": ("q_proj",), "layers": 0}, _llama(["q_proj"], [0])),
        ("llama", {"targets": ("q_proj",), "layers": [1, 0]}, _llama(["q_proj"])),
        ("llama", {"targets": ("q_proj",), "layers": [1, 7]}, _llama(["q_proj"], [1])),
        ("llama", {"targets": "mlp", "layers": [0]}, _llama(LLAMA_MLP, [0])),
        ("llama", {"targets": r".*\.(q|v)_proj", "layers": [1]}, _llama(["q_proj", "v_proj"], [1])),
        # modules outside the decoder layers have no layer index and drop out
        (
            "llama",
            {"targets": ("embed_tokens", "down_proj"), "layers": [1]},
            _llama(["down_proj"], [1]),
        ),
        (
            "gpt2",
            {"targets": ("c_attn", "c_fc"), "layers": [1]},
            _gpt2(["attn.c_attn", "mlp.c_fc"], [1]),
        ),
        ("bert", {"targets": ("query",), "layers": [1]}, _bert(["attention.self.query"], [1])),
        ("bert", {"targets": "all-linear", "layers": [0]}, _bert(BERT_ATTN + BERT_MLP, [0])),
    ],
)
def test_layers_keep_modules_in_those_layers(entry, lora, expected):
    assert _paths(entry, **lora) == expected


@pytest.mark.parametrize(
    ("path", "index"),
    [
        ("model.layers.1.self_attn.q_proj", 1),
        ("transformer.h.0.attn.c_attn", 0),
        ("bert.encoder.layer.12.output.dense", 12),
        ("h.3.mlp", 3),
        ("model.layers.2", 2),
        ("encoder.block.1.layer.0.SelfAttention.q", 1),  # T5: the first index is the layer
        ("model.layers.1.mlp.experts.3.w1", 1),
        ("body.0", None),
        ("model.embed_tokens", None),
        ("model.hidden.1.fc", None),
        ("model.layers_extra.1.fc", None),
    ],
)
def test_layer_index(path, index):
    assert layer_index(path) == index


class _Sublayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    def forward(self, x):
        for sub in self.layer:
            x = sub(x)
        return x


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList([_Sublayers() for _ in range(3)])

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return x


class T5Like(nn.Module):
    """T5's nesting: encoder.block.<layer>.layer.<sublayer>."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _Stack()

    def forward(self, x):
        return self.encoder(x)


def test_layers_use_the_outer_index_of_nested_containers():
    cm = surgeon.compile(T5Like(), surgeon.LoRA(targets=("layer.0", "layer.1"), layers=[1]))
    assert cm.store.paths["default"] == ["encoder.block.1.layer.0", "encoder.block.1.layer.1"]


@pytest.mark.parametrize(
    ("entry", "lora", "fragments"),
    [
        (
            "llama",
            {"layers": [5]},
            ["LoRA.layers=[5]", "no targeted module lies in those layers", "[0, 1]"],
        ),
        (
            "llama",
            {"targets": ("embed_tokens",), "layers": [0]},
            ["LoRA.layers=[0]", "no layer index"],
        ),
        ("mlp", {"targets": ("head",), "layers": [0]}, ["LoRA.layers=[0]", "no layer index"]),
        ("gpt2", {"targets": ("c_fc",), "layers": 2}, ["LoRA.layers=[2]", "[0, 1]"]),
    ],
)
def test_layers_that_keep_nothing_are_an_error(entry, lora, fragments):
    message = _error(entry, **lora)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# -- exclude ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "lora", "expected"),
    [
        (
            "llama",
            {"targets": "all-linear", "exclude": ("o_proj", "mlp.up_proj")},
            _llama(["q_proj", "k_proj", "v_proj", "gate_proj", "down_proj"]),
        ),
        ("llama", {"targets": "attention", "exclude": r".*\.0\..*"}, _llama(LLAMA_ATTN, [1])),
        (
            "llama",
            {"targets": ("q_proj", "v_proj"), "exclude": ("layers.0.self_attn.v_proj",)},
            [*_llama(["q_proj"], [0]), *_llama(["q_proj", "v_proj"], [1])],
        ),
        ("gpt2", {"targets": ("c_proj",), "exclude": ("mlp.c_proj",)}, _gpt2(["attn.c_proj"])),
        (
            "bert",
            {"targets": "all-linear", "exclude": ("classifier", "pooler.dense")},
            _bert(BERT_ATTN + BERT_MLP),
        ),
        ("mlp", {"targets": "all-linear", "exclude": ["head"]}, ["body.0", "body.3"]),
    ],
)
def test_exclude(entry, lora, expected):
    assert _paths(entry, **lora) == expected


@pytest.mark.parametrize(
    ("lora", "fragment"),
    [
        (
            {"targets": ("q_proj",), "exclude": ("k_proj",)},
            "LoRA.exclude=['k_proj'] matches none of the targeted modules",
        ),
        (
            {"targets": ("q_proj",), "exclude": "q_proj"},
            "LoRA.exclude='q_proj' matches none of the targeted modules",
        ),
        (
            {"targets": ("q_proj",), "exclude": ("q_proj",)},
            "LoRA.exclude=['q_proj'] excludes every targeted module",
        ),
        (
            {"targets": "attention", "exclude": r".*"},
            "LoRA.exclude='.*' excludes every targeted module",
        ),
    ],
)
def test_exclude_errors(lora, fragment):
    assert fragment in _error("llama", **lora)


def test_exclude_accepts_a_preset():
    assert _paths("llama", targets="all-linear", exclude="attention") == _llama(LLAMA_MLP)


# -- rank_pattern / alpha_pattern ------------------------------------------------------------------


def _ranks_and_scales(cm) -> dict[str, tuple[int, float]]:
    out = {}
    for path, layer in cm.store.items("default"):
        assert layer.lora_A.shape[0] == layer.rank, path
        assert layer.lora_B.shape[1] == layer.rank, path
        out[path] = (layer.rank, layer.scale)
    return out


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_and_alpha_patterns(rslora):
    lora = surgeon.LoRA(
        rank=4,
        alpha=8,
        targets=("q_proj", "v_proj", "down_proj"),
        rslora=rslora,
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"q_proj": 3, "mlp.down_proj": 5},
    )
    cm = surgeon.compile(ZOO["llama"].model(), lora)
    got = _ranks_and_scales(cm)

    def scale(alpha, rank):
        return alpha / (math.sqrt(rank) if rslora else rank)

    expected = {
        "model.layers.0.self_attn.q_proj": (4, scale(3, 4)),
        "model.layers.0.self_attn.v_proj": (2, scale(8, 2)),
        "model.layers.0.mlp.down_proj": (4, scale(5, 4)),
        "model.layers.1.self_attn.q_proj": (6, scale(3, 6)),
        "model.layers.1.self_attn.v_proj": (2, scale(8, 2)),
        "model.layers.1.mlp.down_proj": (4, scale(5, 4)),
    }
    assert got.keys() == expected.keys()
    for path, (rank, sc) in expected.items():
        assert got[path][0] == rank, path
        assert got[path][1] == pytest.approx(sc), path
    # lora_A is (rank, in), lora_B is (out, rank)
    layer = dict(cm.store.items("default"))["model.layers.1.self_attn.q_proj"]
    assert tuple(layer.lora_A.shape) == (6, 32) and tuple(layer.lora_B.shape) == (32, 6)


def test_first_matching_pattern_key_wins():
    lora = surgeon.LoRA(rank=4, targets=("q_proj",), rank_pattern={"q_proj": 2, r".*\.q_proj": 3})
    got = _ranks_and_scales(surgeon.compile(ZOO["llama"].model(), lora))
    assert {rank for rank, _ in got.values()} == {2}


def test_gpt2_conv1d_pattern_shapes():
    lora = surgeon.LoRA(
        rank=2, alpha=4, targets=("c_attn",), rank_pattern={r"h\.1\.attn\.c_attn": 5}
    )
    cm = surgeon.compile(ZOO["gpt2"].model(), lora)
    layers = dict(cm.store.items("default"))
    assert tuple(layers["transformer.h.0.attn.c_attn"].lora_A.shape) == (2, 32)
    assert tuple(layers["transformer.h.1.attn.c_attn"].lora_A.shape) == (5, 32)
    assert tuple(layers["transformer.h.1.attn.c_attn"].lora_B.shape) == (96, 5)
    assert layers["transformer.h.1.attn.c_attn"].scale == pytest.approx(4 / 5)


@pytest.mark.parametrize(
    ("field", "key"),
    [("rank_pattern", "proj"), ("rank_pattern", "k_proj"), ("alpha_pattern", r"layers\.2\..*")],
)
def test_pattern_key_that_matches_no_target_is_an_error(field, key):
    message = _error("llama", targets=("q_proj", "v_proj"), **{field: {key: 2}})
    assert f"LoRA.{field}: key {key!r} matches no targeted module" in message


# -- targets that match nothing, or the wrong thing ------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "targets", "fragments"),
    [
        (
            "llama",
            ("q_prj",),
            ["LoRA.targets: 'q_prj' matches no module", "closest module names", "q_proj"],
        ),
        ("llama", ("q_proj", "gate_prj"), ["'gate_prj' matches no module", "gate_proj"]),
        ("llama", ("proj",), ["'proj' matches no module", "_proj"]),
        ("llama", r".*\.q_prj", ["LoRA.targets='.*\\\\.q_prj' matches no module"]),
        ("gpt2", ("c_att",), ["'c_att' matches no module", "c_attn"]),
        ("bert", ("quer",), ["'quer' matches no module", "query"]),
        ("mlp", ("body.4",), ["'body.4' matches no module", "body.3"]),
        ("mlp", ("zzzz",), ["'zzzz' matches no module", "module names include", "head"]),
    ],
)
def test_target_that_matches_nothing_names_it_and_suggests(entry, targets, fragments):
    message = _error(entry, targets=targets)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize(
    ("entry", "targets", "fragments"),
    [
        (
            "llama",
            ("mlp",),
            ["LoRA.targets=['mlp']", "model.layers.0.mlp (LlamaMLP)", "cannot adapt"],
        ),
        ("llama", ("self_attn", "q_proj"), ["(LlamaAttention)", "cannot adapt"]),
        (
            "llama",
            r".*self_attn",
            ["LoRA.targets='.*self_attn'", "(LlamaAttention)", "cannot adapt"],
        ),
        ("llama", ("norm",), ["model.norm (LlamaRMSNorm)", "cannot adapt"]),
        ("llama", ("layers",), ["model.layers (ModuleList)", "target the layers inside instead"]),
        ("gpt2", ("attn",), ["transformer.h.0.attn (GPT2Attention)", "cannot adapt"]),
        ("mlp", ("body",), ["body (Sequential)", "cannot adapt"]),
        ("mlp", ("1",), ["body.1 (GELU)", "cannot adapt"]),
        ("mlp", r"body\.\d", ["body.1 (GELU), body.2 (Dropout)", "cannot adapt"]),
    ],
)
def test_target_that_matches_an_unsupported_module_is_an_error(entry, targets, fragments):
    message = _error(entry, targets=targets)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# -- a failed compile changes nothing --------------------------------------------------------------


def _snapshot(model: nn.Module):
    return (
        {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
        [n for n, m in model.named_modules() if "forward" in m.__dict__],
    )


def _assert_unchanged(model: nn.Module, before, entry: str, out_before: torch.Tensor) -> None:
    params, training, patched = _snapshot(model)
    assert {n: f for n, (f, _) in params.items()} == {n: f for n, (f, _) in before[0].items()}
    for name, (_, value) in before[0].items():
        assert torch.equal(params[name][1], value), name
    assert training == before[1]
    assert patched == before[2] == []
    torch.testing.assert_close(logits(model(**ZOO[entry].example())), out_before, rtol=0, atol=0)


class _LinearThenEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.emb = nn.Embedding(10, 6)

    def forward(self, x):
        return self.fc(self.emb(x))


@pytest.mark.parametrize(
    ("entry", "spec"),
    [
        ("llama", surgeon.LoRA(targets=("q_prj",))),
        ("llama", surgeon.LoRA(targets=("mlp",))),
        ("llama", surgeon.LoRA(layers=[5])),
        ("llama", surgeon.LoRA(targets=("q_proj",), exclude=("k_proj",))),
        ("llama", surgeon.LoRA(rank_pattern={"proj": 2})),
        # the first adapter builds (and freezes the base) before the second one fails
        ("llama", surgeon.Spec({"a": surgeon.LoRA(), "b": surgeon.LoRA(targets=("q_prj",))})),
        (
            "llama",
            surgeon.Spec(
                {"a": surgeon.LoRA(), "b": surgeon.LoRA(init="pissa", targets=("embed_tokens",))}
            ),
        ),
        ("gpt2", surgeon.LoRA(targets=("attn",))),
        ("bert", surgeon.LoRA(targets="all-linear", exclude=".*")),
    ],
    ids=lambda v: None,
)
def test_failed_compile_leaves_the_model_unchanged(entry, spec):
    model = ZOO[entry].model()
    for p in list(model.parameters())[:2]:
        p.requires_grad_(False)  # mixed flags must come back as they were
    before = _snapshot(model)
    with torch.no_grad():
        out_before = logits(model(**ZOO[entry].example()))
    with pytest.raises(surgeon.SpecError):
        surgeon.compile(model, spec)
    with torch.no_grad():
        _assert_unchanged(model, before, entry, out_before)


def test_failed_residual_init_restores_rewritten_weights():
    torch.manual_seed(0)
    model = _LinearThenEmbedding().eval()
    weight = model.fc.weight.detach().clone()
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        out_before = model(x)
    with pytest.raises(surgeon.SpecError, match=r"init='pissa'.*emb is Embedding"):
        surgeon.compile(model, surgeon.LoRA(rank=2, init="pissa", targets=("fc", "emb")))
    assert torch.equal(model.fc.weight, weight)  # PiSSA rewrote fc before emb failed
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), out_before, rtol=0, atol=0)


# -- the same modules as PEFT ----------------------------------------------------------------------

peft = pytest.importorskip("peft")

PEFT_CASES = [
    ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"]}),
    ("llama", {"target_modules": ["self_attn.o_proj", "model.layers.0.mlp.up_proj"]}),
    ("llama", {"target_modules": r".*\.1\..*(q|k)_proj"}),
    ("llama", {"target_modules": "all-linear"}),
    ("llama", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}),
    ("llama", {"target_modules": ["q_proj", "embed_tokens"], "layers_to_transform": 0}),
    ("llama", {"target_modules": "all-linear", "exclude_modules": ["o_proj", "gate_proj"]}),
    ("llama", {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r".*\.0\..*"}),
    ("gpt2", {"target_modules": ["c_attn", "c_fc", "wte"]}),
    ("gpt2", {"target_modules": ["c_proj"]}),
    ("gpt2", {"target_modules": r"transformer\.h\.0\..*c_proj"}),
    ("gpt2", {"target_modules": "all-linear"}),
    ("gpt2", {"target_modules": ["c_attn", "c_fc"], "layers_to_transform": [1]}),
    ("bert", {"target_modules": ["query", "value", "dense"]}),
    ("bert", {"target_modules": r".*\.attention\..*(query|dense)"}),
    ("bert", {"target_modules": "all-linear"}),
    ("bert", {"target_modules": ["query", "dense"], "layers_to_transform": [0]}),
    ("bert", {"target_modules": "all-linear", "exclude_modules": ["classifier"]}),
]


def _peft_paths(model: nn.Module, **config) -> tuple[list[str], dict[str, tuple[int, float]]]:
    pm = peft_model(model, peft.LoraConfig(**config), seed=None)
    prefix = "base_model.model."
    paths, ranks = [], {}
    for name, module in pm.named_modules():
        if hasattr(module, "lora_A"):
            path = name.removeprefix(prefix)
            paths.append(path)
            ranks[path] = (module.r["default"], module.scaling["default"])
    return paths, ranks


def _surgeon_lora(config: dict) -> surgeon.LoRA:
    names = {
        "target_modules": "targets",
        "layers_to_transform": "layers",
        "exclude_modules": "exclude",
        "r": "rank",
        "lora_alpha": "alpha",
        "use_rslora": "rslora",
        "rank_pattern": "rank_pattern",
        "alpha_pattern": "alpha_pattern",
    }
    fields = {names[k]: v for k, v in config.items()}
    for key in ("targets", "exclude"):
        if isinstance(fields.get(key), list):
            fields[key] = tuple(fields[key])
    return surgeon.LoRA(**fields)


@pytest.mark.parametrize(("entry", "config"), PEFT_CASES, ids=[f"{e}-{c}" for e, c in PEFT_CASES])
def test_same_modules_as_peft(entry, config):
    expected, _ = _peft_paths(ZOO[entry].model(), **config)
    cm = surgeon.compile(ZOO[entry].model(), _surgeon_lora(config))
    assert sorted(cm.store.paths["default"]) == sorted(expected)
    assert expected  # the case selects something


def test_t5_like_layers_match_peft():
    config = {"target_modules": ["layer.0", "layer.1"], "layers_to_transform": [1, 2]}
    expected, _ = _peft_paths(T5Like(), **config)
    assert sorted(
        surgeon.compile(T5Like(), _surgeon_lora(config)).store.paths["default"]
    ) == sorted(expected)


@pytest.mark.parametrize("rslora", [False, True])
def test_same_ranks_and_scales_as_peft(rslora):
    config = {
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": rslora,
        "rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6, "q_proj": 3},
        "alpha_pattern": {"down_proj": 5, r"model\.layers\.0\..*v_proj": 7},
    }
    _, expected = _peft_paths(ZOO["llama"].model(), **config)
    got = _ranks_and_scales(surgeon.compile(ZOO["llama"].model(), _surgeon_lora(config)))
    assert got.keys() == expected.keys()
    for path, (rank, scale) in expected.items():
        assert got[path][0] == rank, path
        assert got[path][1] == pytest.approx(scale), path
