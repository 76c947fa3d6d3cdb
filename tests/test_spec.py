"""Specs: LoRA field validation, Spec, spec files (YAML / JSON / TOML) and their round trip."""

from __future__ import annotations

import json
import re

import pytest
import yaml

import surgeon
from surgeon.spec import METHODS, Spec

# -- surgeon.LoRA --------------------------------------------------------------------------------


def test_defaults_are_the_documented_ones():
    lora = surgeon.LoRA()
    assert (lora.rank, lora.alpha, lora.dropout, lora.bias) == (8, 16, 0.0, "none")
    assert (lora.rslora, lora.init, lora.layers) == (False, "default", None)
    assert lora.targets == ("q_proj", "v_proj")
    assert lora.exclude == ()
    assert lora.rank_pattern == {} and lora.alpha_pattern == {}
    assert METHODS["lora"] is surgeon.LoRA
    assert issubclass(surgeon.SpecError, ValueError)


@pytest.mark.parametrize(
    ("field", "given", "stored"),
    [
        ("targets", ["q_proj", "k_proj"], ("q_proj", "k_proj")),
        ("targets", "all-linear", "all-linear"),
        ("targets", "attention", "attention"),
        ("targets", r".*\.(q|v)_proj", r".*\.(q|v)_proj"),
        ("layers", 1, (1,)),
        ("layers", [0, 2], (0, 2)),
        ("exclude", ["o_proj"], ("o_proj",)),
        ("exclude", [], ()),
        ("exclude", r".*\.0\..*", r".*\.0\..*"),
        ("rank_pattern", {"v_proj": 4}, {"v_proj": 4}),
        ("alpha_pattern", {r"layers\.1\..*": 2.5}, {r"layers\.1\..*": 2.5}),
        ("alpha", 0.5, 0.5),
        ("dropout", 0.0, 0.0),
        ("dropout", 0.99, 0.99),
    ],
)
def test_fields_are_normalised(field, given, stored):
    lora = surgeon.LoRA(**{field: given})
    assert getattr(lora, field) == stored
    assert type(getattr(lora, field)) is type(stored)


def test_positional_fields_and_frozen():
    lora = surgeon.LoRA(4, 8, ["q_proj"])
    assert (lora.rank, lora.alpha, lora.targets) == (4, 8, ("q_proj",))
    with pytest.raises(AttributeError):
        lora.rank = 2


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        # misspelled fields: named, with a suggestion and the list of fields
        ({"rnak": 8}, ["'rnak'", "did you mean 'rank'", "fields: rank, alpha, targets"]),
        ({"target": ("q_proj",)}, ["'target'", "'targets'"]),
        ({"lora_alpha": 16}, ["'lora_alpha'", "'alpha'"]),
        # rank
        ({"rank": "8"}, ["LoRA.rank='8'", "integer >= 1"]),
        ({"rank": 0}, ["LoRA.rank=0", "integer >= 1"]),
        ({"rank": -3}, ["LoRA.rank=-3", "integer >= 1"]),
        ({"rank": True}, ["LoRA.rank=True", "integer >= 1"]),
        ({"rank": 8.0}, ["LoRA.rank=8.0", "integer >= 1"]),
        # alpha
        ({"alpha": -1}, ["LoRA.alpha=-1", "number > 0"]),
        ({"alpha": 0}, ["LoRA.alpha=0", "number > 0"]),
        ({"alpha": "16"}, ["LoRA.alpha='16'", "number > 0"]),
        ({"alpha": False}, ["LoRA.alpha=False", "number > 0"]),
        # dropout
        ({"dropout": 1.0}, ["LoRA.dropout=1.0", ">= 0 and < 1"]),
        ({"dropout": -0.1}, ["LoRA.dropout=-0.1", ">= 0 and < 1"]),
        ({"dropout": float("nan")}, ["LoRA.dropout=nan", ">= 0 and < 1"]),
        # choices
        ({"bias": "some"}, ["LoRA.bias='some'", "'none', 'all', 'lora_only'"]),
        ({"bias": None}, ["LoRA.bias=None", "'none', 'all', 'lora_only'"]),
        ({"init": "pisa"}, ["LoRA.init='pisa'", "did you mean 'pissa'", "'gaussian'", "'olora'"]),
        ({"init": True}, ["LoRA.init=True", "'default'"]),
        ({"rslora": "yes"}, ["LoRA.rslora='yes'", "true or false"]),
        ({"rslora": 1}, ["LoRA.rslora=1", "true or false"]),
        # targets
        ({"targets": []}, ["LoRA.targets=[]", "at least one target"]),
        ({"targets": ()}, ["LoRA.targets=", "at least one target"]),
        ({"targets": [1]}, ["LoRA.targets=[1]", "module-name suffixes", "all-linear"]),
        ({"targets": ["q_proj", ""]}, ["LoRA.targets=['q_proj', '']", "module-name suffixes"]),
        ({"targets": None}, ["LoRA.targets=None", "a regex", "preset"]),
        ({"targets": 3}, ["LoRA.targets=3", "a regex"]),
        ({"targets": ""}, ["LoRA.targets=''", "a regex", "attention, mlp, all-linear"]),
        ({"targets": "("}, ["LoRA.targets='('", "not a valid regular expression"]),
        ({"targets": "q_proj["}, ["LoRA.targets='q_proj['", "not a valid regular expression"]),
        # layers
        ({"layers": [-1]}, ["LoRA.layers=[-1]", "indices >= 0"]),
        ({"layers": -1}, ["LoRA.layers=-1", "indices >= 0"]),
        ({"layers": []}, ["LoRA.layers=[]", "non-empty list"]),
        ({"layers": [True]}, ["LoRA.layers=[True]", "indices >= 0"]),
        ({"layers": "1"}, ["LoRA.layers='1'", "indices >= 0"]),
        ({"layers": [0.5]}, ["LoRA.layers=[0.5]", "indices >= 0"]),
        # exclude
        ({"exclude": "("}, ["LoRA.exclude='('", "not a valid regular expression"]),
        ({"exclude": [2]}, ["LoRA.exclude=[2]", "module-name suffixes"]),
        ({"exclude": None}, ["LoRA.exclude=None", "module-name suffixes"]),
        # rank_pattern / alpha_pattern
        ({"rank_pattern": {"q_proj": 0}}, ["LoRA.rank_pattern['q_proj']=0", "integer >= 1"]),
        ({"rank_pattern": {"q_proj": 2.5}}, ["LoRA.rank_pattern['q_proj']=2.5", "integer"]),
        ({"rank_pattern": {"(": 4}}, ["LoRA.rank_pattern['(']", "not a valid regular expression"]),
        ({"rank_pattern": {"": 4}}, ["LoRA.rank_pattern", "key ''", "non-empty module pattern"]),
        ({"rank_pattern": {3: 4}}, ["LoRA.rank_pattern", "key 3", "module pattern"]),
        ({"rank_pattern": [("q_proj", 4)]}, ["LoRA.rank_pattern=[('q_proj', 4)]", "mapping"]),
        ({"alpha_pattern": {"v_proj": -2}}, ["LoRA.alpha_pattern['v_proj']=-2", "number > 0"]),
        ({"alpha_pattern": {"v_proj": "x"}}, ["LoRA.alpha_pattern['v_proj']='x'", "number"]),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_bad_field_names_field_value_and_what_is_allowed(kwargs, fragments):
    with pytest.raises(surgeon.SpecError) as info:
        surgeon.LoRA(**kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_too_many_positional_arguments():
    with pytest.raises(
        surgeon.SpecError, match=r"LoRA takes at most 15 positional arguments, got 16"
    ):
        surgeon.LoRA(*range(1, 17))


def test_replace_validates_too():
    lora = surgeon.LoRA(rank=4)
    assert lora.replace(rank=2) == surgeon.LoRA(rank=2)
    assert lora.rank == 4
    with pytest.raises(surgeon.SpecError, match=r"LoRA\.rank=0"):
        lora.replace(rank=0)
    with pytest.raises(surgeon.SpecError, match=r"'rnak'.*did you mean 'rank'"):
        lora.replace(rnak=2)


def test_equality_follows_normalisation():
    assert surgeon.LoRA(targets=["q_proj"], layers=1) == surgeon.LoRA(
        targets=("q_proj",), layers=[1]
    )
    assert surgeon.LoRA(rank=4) != surgeon.LoRA(rank=8)


# -- surgeon.Spec --------------------------------------------------------------------------------


def test_spec_holds_named_adapters_in_order():
    a, b = surgeon.LoRA(rank=4), surgeon.LoRA(targets="mlp")
    spec = surgeon.Spec(adapters={"default": a, "mlp-2": b})
    assert list(spec.adapters) == ["default", "mlp-2"]
    assert spec.adapters["default"] is a and spec.adapters["mlp-2"] is b
    assert surgeon.Spec({"x_1": a}) == surgeon.Spec(adapters={"x_1": surgeon.LoRA(rank=4)})


@pytest.mark.parametrize("name", ["", "1st", "a b", "a.b", "a/b", "ä", 3, None])
def test_spec_rejects_bad_adapter_names(name):
    with pytest.raises(surgeon.SpecError) as info:
        surgeon.Spec(adapters={name: surgeon.LoRA()})
    message = str(info.value)
    assert f"adapter name {name!r} is not allowed" in message
    assert "letters, digits" in message


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        ({"method": "lora"}, "dict"),
        ("lora", "str"),
        (surgeon.LoRA, "ValidatingMeta"),
        (None, "NoneType"),
    ],
)
def test_spec_rejects_values_that_are_not_methods(value, type_name):
    with pytest.raises(surgeon.SpecError) as info:
        surgeon.Spec(adapters={"default": surgeon.LoRA(), "bad": value})
    message = str(info.value)
    assert "Spec.adapters['bad']" in message
    assert "surgeon.LoRA(...)" in message
    assert f"got {type_name}" in message


@pytest.mark.parametrize("adapters", [{}, [], None, [surgeon.LoRA()]])
def test_spec_rejects_empty_or_non_mapping_adapters(adapters):
    with pytest.raises(surgeon.SpecError, match=r"Spec\.adapters: expected a non-empty mapping"):
        surgeon.Spec(adapters=adapters)


def test_spec_with_no_arguments_is_an_error():
    with pytest.raises(surgeon.SpecError, match="non-empty mapping"):
        surgeon.Spec()


def test_to_dict_lists_every_field():
    spec = surgeon.Spec({"a": surgeon.LoRA(rank=4, targets=["q_proj"], layers=1)})
    assert spec.to_dict() == {
        "adapters": {
            "a": {
                "method": "lora",
                "rank": 4,
                "alpha": 16,
                "targets": ["q_proj"],
                "dropout": 0.0,
                "bias": "none",
                "rslora": False,
                "init": "default",
                "layers": [1],
                "exclude": [],
                "rank_pattern": {},
                "alpha_pattern": {},
                "lora_bias": False,
                "init_config": {},
                "target_parameters": [],
                "trainable_tokens": [],
                "modules_to_save": [],
            }
        }
    }
    assert Spec.from_dict(spec.to_dict()) == spec


# -- spec files ----------------------------------------------------------------------------------

SINGLE = {
    ".yaml": "method: lora\nrank: 4\nalpha: 8\ntargets: [query, value]\ndropout: 0.1\n",
    ".yml": "method: lora\nrank: 4\nalpha: 8\ntargets: [query, value]\ndropout: 0.1\n",
    ".json": '{"method": "lora", "rank": 4, "alpha": 8, "targets": ["query", "value"], "dropout": 0.1}',
    ".toml": 'method = "lora"\nrank = 4\nalpha = 8\ntargets = ["query", "value"]\ndropout = 0.1\n',
}
SINGLE_EXPECTED = Spec(
    {"default": surgeon.LoRA(rank=4, alpha=8, targets=("query", "value"), dropout=0.1)}
)

MULTI = {
    ".yaml": (
        "adapters:\n"
        "  attn:\n    method: lora\n    rank: 2\n    targets: attention\n    layers: [1]\n"
        "  ffn:\n    method: LoRA\n    targets: '.*\\.mlp\\..*'\n    rank_pattern: {down_proj: 4}\n"
    ),
    ".json": json.dumps(
        {
            "adapters": {
                "attn": {"method": "lora", "rank": 2, "targets": "attention", "layers": [1]},
                "ffn": {
                    "method": "LoRA",
                    "targets": r".*\.mlp\..*",
                    "rank_pattern": {"down_proj": 4},
                },
            }
        }
    ),
    ".toml": (
        '[adapters.attn]\nmethod = "lora"\nrank = 2\ntargets = "attention"\nlayers = [1]\n\n'
        "[adapters.ffn]\nmethod = \"LoRA\"\ntargets = '.*\\.mlp\\..*'\n"
        "rank_pattern = { down_proj = 4 }\n"
    ),
}
MULTI_EXPECTED = Spec(
    {
        "attn": surgeon.LoRA(rank=2, targets="attention", layers=[1]),
        "ffn": surgeon.LoRA(targets=r".*\.mlp\..*", rank_pattern={"down_proj": 4}),
    }
)


@pytest.mark.parametrize("suffix", sorted(SINGLE))
def test_single_method_file_gives_the_default_adapter(tmp_path, suffix):
    path = tmp_path / f"spec{suffix}"
    path.write_text(SINGLE[suffix], encoding="utf-8")
    spec = surgeon.load_spec(path)
    assert spec == SINGLE_EXPECTED
    assert list(spec.adapters) == ["default"]
    assert surgeon.load_spec(str(path)) == spec  # str paths too


@pytest.mark.parametrize("suffix", sorted(MULTI))
def test_adapters_file_gives_named_adapters_in_order(tmp_path, suffix):
    path = tmp_path / f"spec{suffix}"
    path.write_text(MULTI[suffix], encoding="utf-8")
    spec = surgeon.load_spec(path)
    assert spec == MULTI_EXPECTED
    assert list(spec.adapters) == ["attn", "ffn"]


def test_upper_case_suffix_is_accepted(tmp_path):
    path = tmp_path / "SPEC.YAML"
    path.write_text(SINGLE[".yaml"], encoding="utf-8")
    assert surgeon.load_spec(path) == SINGLE_EXPECTED


def test_example_spec_loads():
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "lora.yaml"
    if not example.exists():
        pytest.skip("examples/lora.yaml is not in this checkout")
    spec = surgeon.load_spec(example)
    assert list(spec.adapters) == ["default"]
    assert isinstance(spec.adapters["default"], surgeon.LoRA)


BAD_FILES = [
    # unknown method, with a suggestion and the known methods
    (
        "s.yaml",
        "method: lorra\nrank: 4\n",
        ["unknown method 'lorra'", "did you mean 'lora'", "known: "],
    ),
    ("s.json", '{"method": "lorra"}', ["unknown method 'lorra'", "did you mean 'lora'"]),
    ("s.toml", 'method = "lorra"\n', ["unknown method 'lorra'", "did you mean 'lora'"]),
    (
        "s.yaml",
        "adapters:\n  a:\n    method: lorra\n",
        ["adapters.a", "unknown method 'lorra'", "did you mean 'lora'"],
    ),
    # misspelled and bad fields
    ("s.yaml", "method: lora\nrnak: 4\n", ["LoRA has no field 'rnak'", "did you mean 'rank'"]),
    ("s.toml", 'method = "lora"\nrnak = 4\n', ["'rnak'", "did you mean 'rank'"]),
    (
        "s.json",
        '{"adapters": {"a": {"method": "lora", "rnak": 4}}}',
        ["adapters.a", "'rnak'", "'rank'"],
    ),
    ("s.yaml", "method: lora\nrank: '8'\n", ["LoRA.rank='8'", "integer >= 1"]),
    ("s.yaml", "method: lora\ninit: pisa\n", ["LoRA.init='pisa'", "did you mean 'pissa'"]),
    ("s.json", '{"method": "lora", "targets": []}', ["LoRA.targets=[]", "at least one"]),
    # structure
    ("s.yaml", "rank: 4\n", ["missing 'method'", "lora"]),
    ("s.yaml", "- method: lora\n", ["expected a table at the top level, got list"]),
    ("s.yaml", "", ["expected a table at the top level, got NoneType"]),
    ("s.json", "[1, 2]", ["expected a table at the top level, got list"]),
    ("s.yaml", "adapters: [lora]\n", ["'adapters' must be a table"]),
    ("s.yaml", "adapters:\n  a: lora\n", ["adapters.a", "expected a table of fields, got str"]),
    ("s.yaml", "adapters: {}\n", ["Spec.adapters", "non-empty mapping"]),
    (
        "s.yaml",
        "adapters:\n  a: {method: lora}\nrank: 4\n",
        ["unexpected top-level key(s) ['rank']", "allowed: 'adapters'"],
    ),
    ("s.yaml", "adapters:\n  1st: {method: lora}\n", ["adapter name '1st' is not allowed"]),
    ("s.toml", '[adapters."a b"]\nmethod = "lora"\n', ["adapter name 'a b' is not allowed"]),
    # malformed files
    ("s.yaml", "method: lora\nrank: [4\n", ["malformed YAML"]),
    ("s.yml", "method: lora\n  rank: 4\n bad", ["malformed YML"]),
    ("s.json", '{"method": "lora", "rank": 4,}', ["malformed JSON"]),
    ("s.toml", "method = lora\n", ["malformed TOML"]),
    ("s.toml", 'method = "lora"\nrank = 4\nrank = 5\n', ["malformed TOML"]),
    # file types
    (
        "s.ini",
        "method = lora\n",
        ["unsupported spec file type '.ini'", ".yaml, .yml, .json or .toml"],
    ),
    ("spec", "method: lora\n", ["unsupported spec file type ''"]),
]


@pytest.mark.parametrize(
    ("name", "text", "fragments"), BAD_FILES, ids=[f"{n}:{t[:24]!r}" for n, t, _ in BAD_FILES]
)
def test_bad_spec_files_name_the_file(tmp_path, name, text, fragments):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(surgeon.SpecError) as info:
        surgeon.load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(surgeon.SpecError) as info:
        surgeon.load_spec(path)
    assert f"cannot read spec file {path}" in str(info.value)
    assert "No such file" in str(info.value)


def test_directory_is_not_a_spec_file(tmp_path):
    with pytest.raises(surgeon.SpecError, match="cannot read spec file"):
        surgeon.load_spec(tmp_path)


# -- round trip ----------------------------------------------------------------------------------

ROUND_TRIP = Spec(
    {
        "default": surgeon.LoRA(
            rank=4,
            alpha=12.5,
            targets=("q_proj", "v_proj", "body.0"),
            dropout=0.05,
            bias="lora_only",
            rslora=True,
            init="gaussian",
            layers=[0, 3],
            exclude=("o_proj",),
            rank_pattern={"v_proj": 2, r"layers\.3\..*q_proj": 6},
            alpha_pattern={r"model\.layers\.0\.self_attn\.q_proj": 1.5},
        ),
        "second-one": surgeon.LoRA(targets=r".*\.(gate|up)_proj", exclude=r".*\.0\..*"),
        "preset_2": surgeon.LoRA(targets="all-linear", bias="all", init="pissa"),
    }
)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(value)


def _to_toml(data: dict) -> str:
    """Just enough of a TOML writer for Spec.to_dict() (TOML has no null: None fields are left out)."""
    lines = []
    for name, fields in data["adapters"].items():
        lines.append(f"[adapters.{json.dumps(name)}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in fields.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


WRITERS = {
    ".yaml": lambda d: yaml.safe_dump(d, sort_keys=False),
    ".yml": lambda d: yaml.safe_dump(d, default_flow_style=True, sort_keys=False),
    ".json": lambda d: json.dumps(d, indent=2),
    ".toml": _to_toml,
}


@pytest.mark.parametrize("suffix", sorted(WRITERS))
def test_round_trip_through_files(tmp_path, suffix):
    data = ROUND_TRIP.to_dict()
    path = tmp_path / f"spec{suffix}"
    path.write_text(WRITERS[suffix](data), encoding="utf-8")
    loaded = surgeon.load_spec(path)
    assert loaded == ROUND_TRIP
    assert list(loaded.adapters) == list(ROUND_TRIP.adapters)
    assert loaded.to_dict() == data


def test_toml_writer_leaves_out_none():
    text = _to_toml(ROUND_TRIP.to_dict())
    assert "layers = [0, 3]" in text
    assert len(re.findall(r"^layers = ", text, flags=re.M)) == 1  # the other two are None


def test_round_trip_through_dicts():
    assert Spec.from_dict(ROUND_TRIP.to_dict()) == ROUND_TRIP
    for name, method in ROUND_TRIP.adapters.items():
        assert surgeon.MethodSpec.from_dict(method.to_dict(), name) == method
        assert (
            surgeon.LoRA.from_dict({k: v for k, v in method.to_dict().items() if k != "method"})
            == method
        )
