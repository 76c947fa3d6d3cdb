"""Arrow's card (its formula) and what is its own: the same outputs as PEFT's
``create_arrow_model`` from the same LoRA folders (with and without GenKnowSub, seeded
prototypes, rsLoRA and rank patterns), the prototypes as the top right-singular vectors of the
subtracted updates, the file holding everything without the folders, PEFT's own router file
refused, the router as a node of the graph, the errors. PEFT cannot load an Arrow router back,
so the file is of this project's own type; the conformance suite runs the rest against the
formula, with experts drawn from a seed."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from zoo import ZOO, One, logits, plain_output, qv_pair, randomize, write_lora_expert

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.lowrank.lora import LoRA
from surgeon.passes.routed.arrow import Arrow, ArrowLayer
from surgeon.spec import METHODS

peft = pytest.importorskip("peft")
ArrowConfig, create_arrow_model = peft.ArrowConfig, peft.create_arrow_model


def formula(spec, adapter, base, x):
    """Arrow (arXiv 2405.11157, §4): per token, ``|p_i · x|`` against each expert's prototype,
    the ``top_k`` best kept, softmax at temperature τ over them, ``Σ_i c_i s_i B_i A_i x``."""
    prototypes = adapter.router.prototypes
    scores = (x @ prototypes.t()).abs()
    threshold = scores.sort(dim=-1, descending=True).values[..., spec.top_k - 1 : spec.top_k]
    weights = torch.softmax(
        scores.masked_fill(scores < threshold, float("-inf")) / spec.temperature, -1
    )
    factors = zip(adapter.arrow_experts_A, adapter.arrow_experts_B, adapter.arrow_expert_scales)
    update = sum(
        weights[..., i, None] * scale * (x @ a.t()) @ b.t()
        for i, (a, b, scale) in enumerate(factors)
    )
    return plain_output(base, x) + update


# -- experts from LoRA folders, against PEFT -------------------------------------------------------


@pytest.fixture
def tasks(tmp_path) -> list[str]:
    return [
        write_lora_expert(tmp_path / "t0", 1, rank=2, alpha=3),
        write_lora_expert(tmp_path / "t1", 2, rank=2, alpha=5, rslora=True),
        write_lora_expert(tmp_path / "t2", 3, rank=2, alpha=2, alpha_pattern={"v_proj": 7}),
    ]


@pytest.fixture
def generals(tmp_path) -> list[str]:
    return [write_lora_expert(tmp_path / f"g{i}", 10 + i, rank=2, alpha=1) for i in range(2)]


def _peft_arrow(tasks: list[str], generals: list[str] | None, **arrow):
    config = ArrowConfig(use_gks=bool(generals), **arrow)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_arrow_model(qv_pair(), tasks, config, general_adapter_paths=generals)


@pytest.mark.parametrize("gks", [False, True], ids=["arrow", "genknowsub"])
def test_the_outputs_are_peft_create_arrow_models(tasks, generals, gks):
    """Seeded prototypes (PEFT's rng_seed): the same start, the same power iteration."""
    generals = generals if gks else []
    x = torch.randn(2, 7, 6)
    expected = _peft_arrow(tasks, generals or None, top_k=2, router_temperature=0.7, rng_seed=4)(x)
    spec = Arrow.from_folders(tasks, generals, top_k=2, temperature=0.7, seed=4)
    got = surgeon.compile(qv_pair(), spec)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_name, targets, dtype",
    [("gpt2", ("c_attn", "c_fc"), torch.bfloat16), ("llama", ("q_proj", "v_proj"), torch.float32)],
)
def test_the_outputs_are_peft_ones_on_transformers_models(tmp_path, model_name, targets, dtype):
    """GPT-2's Conv1D experts (stored transposed by PEFT's fan_in_fan_out) and a bf16 base
    (float32 experts, as PEFT's autocast keeps them), with GenKnowSub."""
    entry = ZOO[model_name]
    folders = []
    for i in range(3):
        cm = surgeon.compile(entry.model(), LoRA(rank=2, alpha=4, targets=targets))
        randomize(cm, seed=i, scale=0.5)
        cm.save_adapters(tmp_path / str(i))
        folders.append(str(tmp_path / str(i)))
    x = entry.example()
    config = ArrowConfig(top_k=1, rng_seed=3, use_gks=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = create_arrow_model(entry.model().to(dtype), folders[:2], config, folders[2:])
    spec = Arrow.from_folders(folders[:2], folders[2:], top_k=1, seed=3)
    got = logits(surgeon.compile(entry.model().to(dtype), spec)(**x))
    torch.testing.assert_close(got, logits(pm(**x)), rtol=1e-5, atol=1e-5)


def test_unseeded_prototypes_converge_to_peft_ones(tasks):
    """Without rng_seed both draw the start from the global generator (PEFT at its first
    forward): the prototypes agree to the convergence of the iteration, up to their sign."""
    x = torch.randn(2, 7, 6)
    pm = _peft_arrow(tasks, None, top_k=3)
    pm(x)
    cm = surgeon.compile(qv_pair(), Arrow.from_folders(tasks, top_k=3))
    for path, adapter in cm.store.items("default"):
        theirs = pm.base_model.model.get_submodule(path).lora_arrow["arrow_router"].prototypes
        cosines = (adapter.router.prototypes * theirs).sum(-1).abs()
        torch.testing.assert_close(cosines, torch.ones(3), rtol=0, atol=1e-4)


def test_the_prototypes_are_the_top_right_singular_vectors_after_genknowsub(tasks, generals):
    cm = surgeon.compile(qv_pair(), Arrow.from_folders(tasks, generals, seed=0))
    general = [surgeon.load(qv_pair(), g).store for g in generals]
    for path, adapter in cm.store.items("default"):
        mean_a = sum(dict(g.items("default"))[path].lora_A for g in general) / 2
        mean_b = sum(dict(g.items("default"))[path].lora_B for g in general) / 2
        for i, folder in enumerate(tasks):
            lora = dict(surgeon.load(qv_pair(), folder).store.items("default"))[path]
            a, b = lora.lora_A - mean_a, lora.lora_B - mean_b
            torch.testing.assert_close(adapter.arrow_experts_A[i], a)
            _, _, vh = torch.linalg.svd(b @ a)
            cosine = (adapter.router.prototypes[i] @ vh[0]).abs()
            torch.testing.assert_close(cosine, torch.tensor(1.0), rtol=0, atol=1e-4)


def test_from_folders_takes_the_first_experts_targets(tmp_path):
    only_q = [
        write_lora_expert(tmp_path / f"q{i}", i, rank=2, targets=("q_proj",)) for i in range(2)
    ]
    spec = Arrow.from_folders(only_q, top_k=1)
    assert spec.targets == ("q_proj",) and list(spec.task_experts) == ["q0", "q1"]
    cm = surgeon.compile(qv_pair(), spec)
    assert [path for path, _ in cm.store.items("default")] == ["q_proj"]


def test_the_file_holds_the_routed_experts_and_loads_without_the_folders(tasks, generals, tmp_path):
    cm = surgeon.compile(qv_pair(), Arrow.from_folders(tasks, generals, top_k=2, seed=1))
    x = torch.randn(3, 6)
    expected = cm(x)
    cm.save_adapters(tmp_path / "arrow")
    for folder in (*tasks, *generals):
        shutil.rmtree(folder)
    config = json.loads((tmp_path / "arrow" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "SURGEON_ARROW" and config["task_experts"] == ["t0", "t1", "t2"]
    assert config["general_experts"] == ["g0", "g1"] and config["rng_seed"] == 1
    assert str(tmp_path) not in json.dumps(config)
    tensors = load_file(tmp_path / "arrow" / WEIGHTS_NAME)
    prefix = "base_model.model.q_proj."
    assert tensors[prefix + "arrow_experts_A"].shape == (3, 2, 6)
    assert tensors[prefix + "arrow_experts_B"].shape == (3, 5, 2)
    assert tensors[prefix + "arrow_prototypes"].shape == (3, 6)
    torch.testing.assert_close(
        tensors[prefix + "arrow_expert_scales"], torch.tensor([1.5, 5 / 2**0.5, 1.0])
    )
    loaded = surgeon.load(qv_pair(), tmp_path / "arrow")
    assert loaded.spec("default").general_experts == {"g0": None, "g1": None}
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_peft_router_file_is_refused_not_misread(tasks, tmp_path):
    """PEFT saves its router as a LoRA with arrow_config, without the experts (and cannot load
    it back itself): surgeon refuses it rather than load a plain LoRA."""
    _peft_arrow(tasks, None, top_k=2).save_pretrained(tmp_path)
    with pytest.raises(surgeon.SpecError, match="arrow_config"):
        surgeon.load(qv_pair(), tmp_path / "arrow_router")


def test_the_router_is_a_node_of_the_graph():
    cm = surgeon.compile(One(nn.Linear(5, 6)), Arrow.examples(("layer",))["default"])
    code = cm.graph.code()
    assert "expert_outputs" in code and "mix" in code
    assert "adapters_default_layer_router(" in code.replace(".", "_")


def test_frozen_experts_train_nothing_and_trained_ones_keep_their_prototypes():
    spec = Arrow.examples(("layer",))["gks-sharp-top1"]
    cm = surgeon.compile(One(nn.Linear(5, 6)), spec)
    assert not any(p.requires_grad for p in cm.parameters())
    cm = surgeon.compile(One(nn.Linear(5, 6)), spec.replace(train_experts=True))
    ((_, adapter),) = cm.store.items("default")
    prototypes = adapter.router.prototypes.clone()
    cm(torch.randn(4, 5)).square().sum().backward()
    assert adapter.arrow_experts_A.grad is not None and adapter.arrow_experts_B.grad is not None
    assert isinstance(adapter, ArrowLayer) and torch.equal(adapter.router.prototypes, prototypes)


# -- errors ---------------------------------------------------------------------------------------


def test_a_folder_of_another_method_is_refused(tmp_path, tasks):
    cm = surgeon.compile(qv_pair(), METHODS["ia3"](targets=("q_proj",), feedforward=()))
    cm.save_adapters(tmp_path / "ia3")
    with pytest.raises(
        surgeon.SpecError, match=r"task_experts\['ia3'\].*holds a ia3 adapter, not a LoRA"
    ):
        Arrow(task_experts={"t0": tasks[0], "ia3": str(tmp_path / "ia3")}, top_k=1)


def test_experts_of_different_ranks_are_refused(tmp_path, tasks):
    wide = write_lora_expert(tmp_path / "wide", 7, rank=3)
    with pytest.raises(surgeon.SpecError, match="ranks on q_proj differ"):
        surgeon.compile(qv_pair(), Arrow(task_experts=[tasks[0], wide], top_k=1))


def test_a_general_expert_without_factors_is_refused_not_skipped(tasks):
    spec = Arrow(task_experts=tasks, general_experts={"g": None}, top_k=1)
    with pytest.raises(surgeon.SpecError, match=r"experts \['g'\] have neither a folder"):
        surgeon.compile(qv_pair(), spec)


def test_an_expert_that_misses_a_targeted_layer_is_refused(tmp_path, tasks):
    only_q = write_lora_expert(tmp_path / "only_q", 6, rank=2, targets=("q_proj",))
    spec = Arrow(task_experts=[tasks[0]], general_experts=[only_q], top_k=1)
    with pytest.raises(
        surgeon.SpecError, match=r"general_experts\['only_q'\].*does not adapt v_proj"
    ):
        surgeon.compile(qv_pair(), spec)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({}, "task_experts: expected at least 1"),
        ({"task_experts": "folder"}, "expected a mapping of expert name"),
        ({"task_experts": {"a": None, "b": None}}, "top_k=3: there are only 2 task experts"),
        ({"task_experts": {"a": None}, "top_k": 1}, "expert_rank: needed when no expert"),
        (
            {"task_experts": {"a": None}, "general_experts": {"a": None}, "top_k": 1},
            r"\['a'\] name both task and general experts",
        ),
        ({"task_experts": {"a": None}, "top_k": 1, "expert_rank": 2, "temperature": 0}, "temp"),
    ],
)
def test_bad_fields_are_spec_errors(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        Arrow(**fields)


@pytest.mark.parametrize("layer", [nn.Embedding(5, 4), nn.Conv1d(2, 2, 1)])
def test_other_layers_are_refused(layer):
    with pytest.raises(surgeon.SpecError, match="Arrow cannot adapt"):
        surgeon.compile(One(layer), Arrow.examples(("layer",))["default"])
