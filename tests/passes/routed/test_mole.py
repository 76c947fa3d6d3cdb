"""MoLE's card (its formula) and what is its own: experts read from LoRA folders (ranks, rsLoRA
and rank patterns as the LoRAs themselves compute), the file holding everything without the
folders, the errors for folders that do not fit, the gate as a node of the graph, the
balancing loss, training that moves the gates only and resumes exactly. PEFT has no MoLE: the
conformance suite runs the rest against the formula alone, with experts drawn from a seed."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from zoo import (
    One,
    plain_output,
    qv_pair,
    randomize,
    train_and_resume_spec,
    trained_and_moved,
    write_lora_expert,
)

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.routed.mole import MoLE, MoLELayer
from surgeon.spec import METHODS


def _expert_outputs(adapter: MoLELayer, x: torch.Tensor) -> list[torch.Tensor]:
    """``E_i(x) = s_i B_i A_i x`` for each expert (padding rows are zero: they add nothing)."""
    factors = zip(adapter.mole_experts_A, adapter.mole_experts_B, adapter.mole_expert_scales)
    return [scale * (x @ a.t()) @ b.t() for a, b, scale in factors]


def _gate(spec: MoLE, adapter: MoLELayer, outputs: list[torch.Tensor]) -> torch.Tensor:
    """The paper's gate (§3): the experts' outputs concatenated, normalised, projected by the
    gate's weight, softmax at temperature τ."""
    joined = torch.cat(outputs, dim=-1)
    mean = joined.mean(-1, keepdim=True)
    var = joined.var(-1, unbiased=False, keepdim=True)
    normed = (joined - mean) / torch.sqrt(var + 1e-5)
    return torch.softmax(normed @ adapter.gate.weight.t() / spec.temperature, dim=-1)


def formula(spec, adapter, base, x):
    """MoLE (arXiv 2404.13628, §3): ``W0 x + Σ_i ε_i(x) E_i(x)`` per token."""
    outputs = _expert_outputs(adapter, x)
    weights = _gate(spec, adapter, outputs)
    return plain_output(base, x) + sum(weights[..., i, None] * e for i, e in enumerate(outputs))


# -- experts from LoRA folders ---------------------------------------------------------------------


def _lora_update(folder: str, layer: str, x: torch.Tensor) -> torch.Tensor:
    """``scale · B A x`` of the LoRA saved in ``folder`` on ``layer``, from its files alone."""
    config = json.loads((Path(folder) / CONFIG_NAME).read_text())
    tensors = load_file(Path(folder) / WEIGHTS_NAME)
    rank = (config["rank_pattern"] or {}).get(layer, config["r"])
    scale = config["lora_alpha"] / (math.sqrt(rank) if config["use_rslora"] else rank)
    a, b = (tensors[f"base_model.model.{layer}.lora_{f}.weight"] for f in "AB")
    assert a.shape[0] == rank
    return scale * x @ a.t() @ b.t()


@pytest.fixture
def folders(tmp_path) -> dict[str, str]:
    return {
        "plain": write_lora_expert(tmp_path / "plain", 1, rank=2, alpha=3),
        "rs": write_lora_expert(
            tmp_path / "rs", 2, rank=3, rslora=True, rank_pattern={"v_proj": 4}
        ),
    }


def test_the_experts_are_the_loras_of_the_folders_evenly_mixed_at_first(folders):
    x = torch.randn(3, 6)
    spec = MoLE(experts=folders, targets=("q_proj", "v_proj"))
    assert spec.expert_rank == 4  # the largest rank, rank_pattern included
    cm = surgeon.compile(qv_pair(), spec)
    # a zero gate mixes evenly; each expert's update read from its folder
    base = qv_pair()
    with torch.no_grad():
        q_mix = sum(_lora_update(f, "q_proj", x) for f in folders.values()) / 2
        hidden = torch.tanh(base.q_proj(x) + q_mix)
        v_mix = sum(_lora_update(f, "v_proj", hidden) for f in folders.values()) / 2
        expected = base.v_proj(hidden) + v_mix
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-6)


def test_listed_folders_are_named_after_them(folders):
    spec = MoLE(experts=list(folders.values()), targets=("q_proj",))
    assert list(spec.experts) == ["plain", "rs"]


def test_the_file_holds_gates_and_experts_and_loads_without_the_folders(folders, tmp_path):
    cm = surgeon.compile(qv_pair(), MoLE(experts=folders, targets=("q_proj", "v_proj")))
    randomize(cm, seed=3, scale=0.5)
    x = torch.randn(3, 6)
    expected = cm(x)
    cm.save_adapters(tmp_path / "mole")
    for folder in folders.values():
        shutil.rmtree(folder)
    config = json.loads((tmp_path / "mole" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "SURGEON_MOLE" and config["experts"] == ["plain", "rs"]
    assert config["expert_rank"] == 4 and str(tmp_path) not in json.dumps(config)
    tensors = load_file(tmp_path / "mole" / WEIGHTS_NAME)
    prefix = "base_model.model.q_proj."
    assert tensors[prefix + "mole_experts_A"].shape == (2, 4, 6)
    assert tensors[prefix + "mole_experts_B"].shape == (2, 5, 4)
    assert tensors[prefix + "mole_gate.weight"].shape == (2, 10)
    scales = tensors[prefix + "mole_expert_scales"]
    torch.testing.assert_close(scales, torch.tensor([3 / 2, 16 / math.sqrt(3)]))  # rsLoRA
    loaded = surgeon.load(qv_pair(), tmp_path / "mole")
    assert loaded.spec("default").experts == {"plain": None, "rs": None}
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_the_gate_is_a_node_of_the_graph():
    cm = surgeon.compile(One(nn.Linear(5, 6)), MoLE.examples(("layer",))["default"])
    code = cm.graph.code()
    assert "expert_outputs" in code and "mix" in code
    assert "adapters_default_layer_gate(" in code.replace(".", "_")


def test_merging_is_refused_with_the_reason():
    cm = surgeon.compile(One(nn.Linear(5, 6)), MoLE.examples(("layer",))["default"])
    with pytest.raises(surgeon.SpecError, match="weigh its experts anew for every token"):
        cm.merge()


# -- errors ---------------------------------------------------------------------------------------


def test_a_missing_folder_is_named(tmp_path, folders):
    with pytest.raises(surgeon.SpecError, match=r"experts\['gone'\] \(.*gone\): no such folder"):
        MoLE(experts={**folders, "gone": str(tmp_path / "gone")})


def test_a_pickled_file_is_refused(tmp_path, folders):
    folder = tmp_path / "pickled"
    shutil.copytree(folders["plain"], folder)
    (folder / WEIGHTS_NAME).rename(folder / "adapter_model.bin")
    spec = MoLE(experts={"plain": folders["plain"], "pickled": str(folder)})
    with pytest.raises(surgeon.SpecError, match=r"experts\['pickled'\].*a pickle.*never unpickles"):
        surgeon.compile(qv_pair(), spec)


def test_a_folder_of_another_method_is_refused(tmp_path, folders):
    cm = surgeon.compile(qv_pair(), METHODS["ia3"](targets=("q_proj",), feedforward=()))
    cm.save_adapters(tmp_path / "ia3")
    with pytest.raises(
        surgeon.SpecError, match=r"experts\['ia3'\].*holds a ia3 adapter, not a LoRA"
    ):
        MoLE(experts={"plain": folders["plain"], "ia3": str(tmp_path / "ia3")})


@pytest.mark.parametrize(
    "fields, what",
    [({"bias": "lora_only"}, "a trained base bias"), ({"lora_bias": True}, "a bias on B")],
)
def test_loras_that_carry_more_than_factors_are_refused(tmp_path, folders, fields, what):
    folder = write_lora_expert(tmp_path / "odd", 4, rank=2, **fields)
    with pytest.raises(surgeon.SpecError, match=rf"experts\['odd'\].*has {what}"):
        MoLE(experts={"plain": folders["plain"], "odd": folder})


def test_an_expert_of_another_model_is_refused(tmp_path, folders):
    other = write_lora_expert(tmp_path / "wide", 5, width=7, rank=2)
    spec = MoLE(experts={"plain": folders["plain"], "wide": other})
    with pytest.raises(
        surgeon.SpecError, match=r"experts\['wide'\].*shape \(2, 7\), q_proj needs \(2, 6\)"
    ):
        surgeon.compile(qv_pair(), spec)


def test_an_expert_that_misses_a_targeted_layer_is_refused(tmp_path, folders):
    only_q = write_lora_expert(tmp_path / "only_q", 6, rank=2, targets=("q_proj",))
    spec = MoLE(experts={"plain": folders["plain"], "only_q": only_q}, targets=("q_proj", "v_proj"))
    with pytest.raises(surgeon.SpecError, match=r"experts\['only_q'\].*does not adapt v_proj"):
        surgeon.compile(qv_pair(), spec)
    with pytest.warns(
        UserWarning, match=r"experts\['plain'\].*v_proj are not among MoLE's targets"
    ):
        surgeon.compile(qv_pair(), spec.replace(targets=("q_proj",)))


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"experts": {"a": None}}, "got 1 expert"),
        ({"experts": "folder"}, "expected a mapping of expert name"),
        ({"experts": {"a": None, "b": 3}}, r"experts\['b'\]=3"),
        ({"experts": {"a": None, "b": None}}, "expert_rank: needed when no expert has a folder"),
        ({"experts": {"a": None, "b": None}, "expert_rank": 2, "temperature": 0}, "temperature"),
        ({"experts": {"a": None, "b": None}, "expert_rank": 2, "balance_weight": -1}, ">= 0"),
    ],
)
def test_bad_fields_are_spec_errors(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        MoLE(**fields)


def test_an_expert_rank_below_the_folders_is_refused(folders):
    with pytest.raises(surgeon.SpecError, match="expert_rank=2: the experts' largest rank is 4"):
        MoLE(experts=folders, expert_rank=2)


@pytest.mark.parametrize("layer", [nn.Embedding(5, 4), nn.Conv2d(2, 2, 1)])
def test_other_layers_are_refused(layer):
    with pytest.raises(surgeon.SpecError, match="MoLE cannot adapt"):
        surgeon.compile(One(layer), MoLE.examples(("layer",))["default"])


def test_a_file_with_repeated_expert_names_is_refused(tmp_path):
    cm = surgeon.compile(One(nn.Linear(5, 6)), MoLE.examples(("layer",))["sharp-balanced"])
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "experts": ["a", "a"]}))
    with pytest.raises(surgeon.SpecError, match="the names repeat"):
        surgeon.load(One(nn.Linear(5, 6)), tmp_path)


def test_a_file_whose_factors_do_not_fit_is_refused(tmp_path):
    cm = surgeon.compile(One(nn.Linear(5, 6)), MoLE.examples(("layer",))["sharp-balanced"])
    cm.save_adapters(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["base_model.model.layer.mole_experts_A"] = torch.zeros(2, 3, 5)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(surgeon.SpecError, match=r"mole_experts_A has shape \(2, 3, 5\)"):
        surgeon.load(One(nn.Linear(5, 6)), tmp_path)


# -- the balancing loss and training ---------------------------------------------------------------


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(6, 6)
        self.v_proj = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(torch.relu(self.q_proj(x)))


SPEC = MoLE(
    experts=dict.fromkeys(("a", "b", "c")),
    expert_rank=2,
    seed=3,
    balance_weight=0.5,
    temperature=0.7,
)


def test_the_balancing_loss_is_minus_the_log_of_the_mean_shares():
    torch.manual_seed(0)
    cm = surgeon.compile(Stack(), SPEC)
    randomize(cm, seed=1, scale=0.5)
    x = torch.randn(4, 3, 6)
    cm.train()
    cm(x)
    inputs = {"q_proj": x, "v_proj": torch.relu(_q_out(cm, x))}
    shares = []
    for path, adapter in cm.store.items("default"):
        outputs = _expert_outputs(adapter, inputs[path])
        shares.append(_gate(SPEC, adapter, outputs).reshape(-1, 3).mean(0))
    expected = -0.5 * torch.stack(shares).mean(0).log().sum()
    term = cm.regularization_loss()
    torch.testing.assert_close(term, expected)
    term.backward()
    assert all(p.grad is not None for p in cm.store.parameters())
    assert cm.regularization_loss() is None  # each forward's gates count once
    cm.eval()
    cm(x)
    assert cm.regularization_loss() is None  # evaluation keeps nothing
    assert surgeon.compile(Stack(), SPEC.replace(balance_weight=0.0)).regularization_loss() is None


def _q_out(cm, x: torch.Tensor) -> torch.Tensor:
    """q_proj's adapted output, from the formula."""
    adapter = dict(cm.store.items("default"))["q_proj"]
    return formula(SPEC, adapter, cm.model.q_proj, x)


def test_surgeon_train_moves_the_gates_only_and_resumes_exactly(tmp_path):
    _, whole, _, before = train_and_resume_spec(SPEC, Stack, tmp_path)
    assert all(torch.equal(b, before[n]) for n, b in whole.store.named_buffers())
    gates, moved = trained_and_moved(whole, before)
    assert gates and all(n.endswith("gate.weight") for n in gates)
    assert moved == gates
