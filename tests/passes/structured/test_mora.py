"""MoRA's card (its formula) and what is its own: the size of M, both variants' compression and
decompression on layers whose sizes leave padded inputs, cut or repeated outputs and groups wider
than the input, dropout, half precision, files (this project's own PEFT type, PEFT's loader
refusing them), spec and config errors, training through `surgeon.train` with exact resumption.
PEFT has no MoRA: the conformance suite runs the rest against the formula alone."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from zoo import (
    ZOO,
    One,
    gpt2_conv1d,
    load_with_changed_config,
    mlp_samples,
    mlp_without_dropout,
    plain_output,
    randomize,
    resume_config,
    train_and_resume_spec,
    trained_and_moved,
)

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.structured.mora import MoRA, MoRALayer
from surgeon.spec import METHODS


def _side(spec, fan_in: int, fan_out: int) -> int:
    """r̂: ``sqrt((in + out) · r)`` rounded to the nearest integer (the authors' code), even for
    rotation."""
    side = math.floor(math.sqrt((fan_in + fan_out) * spec.rank) + 0.5)
    return side - side % 2 if spec.variant == "rotation" else side


def _rotation(index: int, side: int) -> torch.Tensor:
    """RoPE's rotation matrix of group ``index`` (0-based): pair ``k`` is features ``k`` and
    ``k + side/2``, turned by ``index · 10000^(-2k/side)``."""
    half = side // 2
    rotation = torch.zeros(side, side, dtype=torch.float64)
    for k in range(half):
        angle = index * 10000 ** (-2 * k / side)
        c, s = math.cos(angle), math.sin(angle)
        rotation[k, k], rotation[k, k + half] = c, -s
        rotation[k + half, k], rotation[k + half, k + half] = s, c
    return rotation


def _update(spec, m: torch.Tensor, fan_in: int, fan_out: int) -> torch.Tensor:
    """ΔW (out x in) of the paper's eqs. 6 and 9, entry by entry. The input is padded to ``g``
    whole groups of r̂ by repeating it from its start (padded feature ``p`` is input feature
    ``p mod in``). Sharing: output ``o`` reads ``M``'s row ``o mod r̂`` applied to the sum of
    the groups; rotation: output ``o`` is feature ``o mod (g r̂)`` of the groups' outputs laid
    end to end, group ``i`` giving ``M R_i x_i``."""
    side = m.shape[0]
    groups = -(-fan_in // side)
    m = m.detach().double()
    blocks = [m @ _rotation(i, side) for i in range(groups)]
    delta = torch.zeros(fan_out, fan_in, dtype=torch.float64)
    for o in range(fan_out):
        for p in range(groups * side):
            if spec.variant == "sharing":
                delta[o, p % fan_in] += m[o % side, p % side]
            else:
                q = o % (groups * side)
                if q // side == p // side:
                    delta[o, p % fan_in] += blocks[p // side][q % side, p % side]
    return delta


def _out_in(base: nn.Module) -> torch.Tensor:
    return base.weight if isinstance(base, nn.Linear) else base.weight.t()


def formula(spec, adapter, base, x):
    """MoRA (Jiang et al., 2024, eqs. 6-9): ``W x + b + f_decomp(M f_comp(x))``, the layer with
    ``W + ΔW`` as its weight."""
    fan_out, fan_in = _out_in(base).shape
    adapted = _out_in(base).double() + _update(spec, adapter.mora_M, fan_in, fan_out)
    weight = adapted if isinstance(base, nn.Linear) else adapted.t()
    return plain_output(base, x, weight.to(x.dtype))


peft = pytest.importorskip("peft")


def _adapter(cm, name: str = "default") -> MoRALayer:
    (_, adapter), *_ = cm.store.items(name)
    return adapter


# -- the square matrix and the maps ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "rank", "side"),
    [("sharing", 8, 66), ("rotation", 8, 66), ("sharing", 1, 23), ("rotation", 1, 22)],
)
def test_m_has_the_parameters_of_a_rank_r_lora_rounded_as_the_authors(variant, rank, side):
    # (256 + 288) · 8 = 4352, sqrt 65.97; 544 · 1: sqrt 23.32; rotation keeps an even side
    layer = nn.Linear(256, 288)
    cm = surgeon.compile(One(layer), MoRA(rank=rank, variant=variant, targets=("layer",)))
    adapter = _adapter(cm)
    assert [n for n, _ in adapter.named_parameters()] == ["mora_M"]
    assert adapter.mora_M.shape == (side, side)
    assert torch.count_nonzero(adapter.mora_M) == 0
    assert set(adapter.peft_tensors()) == {"mora_M"}


SHAPES = [(5, 6, 1), (5, 6, 15), (12, 24, 1), (24, 5, 1), (7, 3, 4), (9, 20, 2)]
"""(in, out, rank): inputs padded or not, outputs cut or repeated, r̂ above the input (rank 15 on
5 -> 6: r̂ 13, wider than two copies of the input) and a single group."""


@pytest.mark.parametrize("variant", ["sharing", "rotation"])
@pytest.mark.parametrize(("fan_in", "fan_out", "rank"), SHAPES)
def test_outputs_and_merged_weights_are_the_papers_on_every_shape(variant, fan_in, fan_out, rank):
    torch.manual_seed(0)
    model = One(nn.Linear(fan_in, fan_out))
    spec = MoRA(rank=rank, variant=variant, targets=("layer",))
    cm = surgeon.compile(model, spec).eval()
    randomize(cm, scale=0.5)
    adapter = _adapter(cm)
    assert adapter.mora_M.shape[0] == _side(spec, fan_in, fan_out)
    x = torch.randn(3, 2, fan_in)
    torch.testing.assert_close(cm(x), formula(spec, adapter, model.layer, x))
    expected = _update(spec, adapter.mora_M, fan_in, fan_out).float()
    torch.testing.assert_close(adapter.delta_weight(), expected)


def test_gpt2_conv1d_gets_the_update_in_its_in_by_out_layout():
    torch.manual_seed(0)
    model = One(gpt2_conv1d(9, 20))
    spec = MoRA(rank=2, targets=("layer",))
    cm = surgeon.compile(model, spec).eval()
    randomize(cm, scale=0.5)
    adapter = _adapter(cm)
    x = torch.randn(2, 4, 9)
    expected = formula(spec, adapter, model.layer, x)
    torch.testing.assert_close(cm(x), expected)
    assert adapter.delta_weight().shape == (9, 20)
    cm.merge()
    torch.testing.assert_close(cm(x), expected)


def test_training_with_dropout_drops_the_updates_input_only():
    torch.manual_seed(0)
    model = One(nn.Linear(12, 24))
    spec = MoRA(rank=2, variant="sharing", dropout=0.5, targets=("layer",))
    cm = surgeon.compile(model, spec)
    randomize(cm, scale=0.5)
    adapter = _adapter(cm)
    x = torch.randn(8, 12)
    cm.train()
    torch.manual_seed(3)
    got = cm(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True)
    with torch.no_grad():
        update = _update(spec, adapter.mora_M, 12, 24).float()
        expected = model.layer(x) + dropped @ update.t()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    cm.eval()
    torch.testing.assert_close(cm(x), formula(spec, adapter, model.layer, x))


@pytest.mark.parametrize("variant", ["sharing", "rotation"])
def test_half_precision_bases_keep_m_and_the_rotation_in_float32(variant):
    torch.manual_seed(0)
    model = One(nn.Linear(16, 8)).to(torch.bfloat16)
    cm = surgeon.compile(model, MoRA(rank=2, variant=variant, targets=("layer",)))
    adapter = _adapter(cm)
    assert adapter.mora_M.dtype == torch.float32
    assert all(b.dtype == torch.float32 for b in adapter.buffers())
    assert cm(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


# -- files ----------------------------------------------------------------------------------------


MLP_TARGETS = ("body.0", "head")
"""The zoo MLP's Linear(12, 24) and Linear(24, 5)."""


def test_files_hold_m_under_our_own_type_and_load_back(tmp_path):
    spec = MoRA(rank=2, variant="sharing", dropout=0.1, targets=MLP_TARGETS)
    cm = surgeon.compile(mlp_without_dropout(), spec).eval()
    randomize(cm, scale=0.5)
    x = ZOO["mlp"].example()
    expected = cm(**x)
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "SURGEON_MORA"
    assert (config["r"], config["mora_type"], config["lora_dropout"]) == (2, 1, 0.1)
    assert "lora_alpha" not in config
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert set(saved) == {"base_model.model.body.0.mora_M", "base_model.model.head.mora_M"}
    assert saved["base_model.model.body.0.mora_M"].shape == (8, 8)  # sqrt(36 · 2) = 8.49
    assert saved["base_model.model.head.mora_M"].shape == (8, 8)  # sqrt(29 · 2) = 7.62
    loaded = surgeon.load(mlp_without_dropout(), tmp_path).eval()
    assert loaded.spec("default") == spec
    torch.testing.assert_close(loaded(**x), expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mora")
    surgeon.compile(mlp_without_dropout(), MoRA(rank=2, targets=MLP_TARGETS)).save_adapters(folder)
    return folder


def _copy(saved, tmp_path):
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_the_default_rotation_is_saved_as_the_forks_mora_type_6(saved):
    assert json.loads((saved / CONFIG_NAME).read_text())["mora_type"] == 6


def test_the_forks_keys_it_ignores_or_defaults_load(saved, tmp_path):
    # the fork scales MoRA by 1 whatever lora_alpha says; without mora_type it is sharing (1)
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / CONFIG_NAME).read_text())
    del config["mora_type"]
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "lora_alpha": 64}))
    # at rank 2 sharing has rotation's sides here (8: sqrt(36 · 2) = 8.49, sqrt(29 · 2) = 7.62)
    loaded = surgeon.load(mlp_without_dropout(), folder)
    assert loaded.spec("default") == MoRA(rank=2, variant="sharing", targets=MLP_TARGETS)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"mora_type": 2}, r"mora_type=2 is not supported \(supported: 1, 6\)"),
        ({"mora_type": "rotation"}, "mora_type='rotation': expected an integer"),
        ({"bias": "all"}, "bias='all'"),
        ({"use_dora": True}, "use_dora=True"),
        ({"target_modules": None}, "target_modules is missing"),
        ({"r": 0}, r"MoRA.rank=0: expected an integer >= 1 \(adapter_config.json key 'r'\)"),
        ({"lora_dropout": 1.5}, "adapter_config.json key 'lora_dropout'"),
        ({"r": 3}, r"mora_M has shape"),
    ],
)
def test_configs_surgeon_cannot_honour_are_refused_naming_the_key(change, match, saved, tmp_path):
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(mlp_without_dropout(), _copy(saved, tmp_path), change)


# -- the spec -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"MoRA.rank=0: expected an integer >= 1"),
        ({"variant": "rope"}, r"MoRA.variant='rope': expected one of 'sharing', 'rotation'"),
        ({"dropout": 1.0}, r"MoRA.dropout=1.0: expected a number >= 0 and < 1"),
        ({"targets": ()}, r"MoRA.targets=\[\]: expected at least one target"),
        ({"alpha": 16}, r"MoRA has no field 'alpha'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        MoRA(**fields)


def test_registered_under_its_name_with_its_own_peft_type():
    assert METHODS["mora"] is MoRA is surgeon.MoRA
    assert MoRA.peft_type == "SURGEON_MORA"
    assert MoRA().variant == "rotation" and MoRA().rank == 8
    spec = surgeon.MethodSpec.from_dict({"method": "mora", "rank": 4, "targets": ["q_proj"]})
    assert spec == MoRA(rank=4, targets=("q_proj",))


def test_a_rotation_with_no_pair_of_features_is_refused_naming_the_layer():
    # Linear(1, 1) at rank 1: sqrt(2) rounds to 1, and rotation needs an even side
    with pytest.raises(surgeon.SpecError, match=r"MoRA.rank=1 on layer: M would be 0 x 0"):
        surgeon.compile(One(nn.Linear(1, 1)), MoRA(rank=1, targets=("layer",)))
    surgeon.compile(One(nn.Linear(1, 1)), MoRA(rank=1, variant="sharing", targets=("layer",)))


@pytest.mark.parametrize(
    ("layer", "name"), [(nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")]
)
def test_other_layers_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which MoRA cannot adapt"):
        surgeon.compile(One(layer), MoRA(targets=("layer",)))


# -- training -------------------------------------------------------------------------------------


def test_surgeon_train_moves_m_only_and_resumes_exactly(tmp_path):
    spec = MoRA(rank=2, dropout=0.2, targets=MLP_TARGETS)
    config = resume_config()
    _, whole, _, before = train_and_resume_spec(
        spec, mlp_without_dropout, tmp_path, data=mlp_samples(), config=config
    )
    trained, moved = trained_and_moved(whole, before)
    assert trained and all(n.endswith("mora_M") for n in trained)
    assert moved == trained
