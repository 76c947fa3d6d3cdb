"""Multitask prompt tuning beyond the conformance suite: each row gets its task's prompt (also
in generate), task_ids errors, the inits from a source adapter as PEFT's, text init, and the
spec's refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from zoo import (
    ZOO,
    assert_same_generation,
    decode_without_cache,
    generate,
    logits,
    randomize,
)
from zoo import padded_ids as _inputs

import surgeon


def call_inputs(spec, inputs):
    """One task per row, cycling through the spec's tasks."""
    batch = inputs["input_ids"].shape[0]
    return {"task_ids": torch.arange(batch) % spec.num_tasks}


def formula(spec, adapter, model, inputs):
    """MPT (Wang et al., 2023): row b sees ``P* ⊙ (U_t V_t)``, t its task, then its tokens."""
    ids, tasks = inputs["input_ids"], inputs["task_ids"]
    embedded = model.get_input_embeddings()(ids)
    rows = []
    for task in tasks.tolist():
        modulation = adapter.prefix_task_cols[task] @ adapter.prefix_task_rows[task]
        rows.append(adapter.embeddings * modulation)
    prompts = torch.stack(rows).to(embedded.dtype)
    mask = torch.ones(ids.shape[0], prompts.shape[1] + ids.shape[1], dtype=torch.long)
    return model(inputs_embeds=torch.cat([prompts, embedded], 1), attention_mask=mask)


peft = pytest.importorskip("peft")

N = 3  # virtual tokens


def _compiled(**fields) -> surgeon.CompiledModel:
    spec = surgeon.MultitaskPromptTuning(N, num_tasks=3, num_ranks=2, **fields)
    cm = surgeon.compile(ZOO["llama"].model(), spec)
    randomize(cm, scale=0.5)
    return cm.eval()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"init": "sample_vocab"}, "MultitaskPromptTuning.init='sample_vocab'"),
        ({"init": "text"}, "init='text' and init_text"),
        ({"init": "exact_source_task"}, "read a source adapter's file"),
        ({"source_path": "x.safetensors"}, "read a source adapter's file"),
        (
            {"init": "average_source_tasks", "source_path": "x", "num_tasks": 2},
            "MultitaskPromptTuning.num_tasks=2: init='average_source_tasks' gives one task",
        ),
        ({"num_ranks": 0}, "MultitaskPromptTuning.num_ranks=0"),
        ({"source_task": -1}, "MultitaskPromptTuning.source_task=-1"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, message):
    with pytest.raises(surgeon.SpecError, match=message):
        surgeon.MultitaskPromptTuning(**fields)


def test_each_row_gets_its_tasks_prompt():
    cm = _compiled()
    x = _inputs(batch=3, padded=False)
    mixed = logits(cm(**x, task_ids=torch.tensor([2, 0, 1])))
    for row, task in enumerate([2, 0, 1]):
        alone = logits(cm(**x, task_ids=torch.full((3,), task)))
        torch.testing.assert_close(mixed[row], alone[row], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mixed[0], logits(cm(**x, task_ids=torch.zeros(3).long()))[0])


@pytest.mark.parametrize(
    "task_ids, message",
    [
        (None, "pass task_ids="),
        (torch.tensor([0]), r"task_ids has shape \(1,\), expected \(2,\)"),
        (torch.tensor([0, 3]), r"task_ids \[0, 3\] outside 0..2"),
    ],
)
def test_wrong_task_ids_are_clear_errors(task_ids, message):
    cm = _compiled()
    x = _inputs()
    extra = {} if task_ids is None else {"task_ids": task_ids}
    with pytest.raises(surgeon.SpecError, match=message):
        cm(**x, **extra)


def test_generate_takes_task_ids_and_equals_decoding_without_the_cache():
    cm = _compiled()
    x = _inputs()
    tasks = torch.tensor([1, 2])
    got = generate(cm, x["input_ids"], x["attention_mask"], 4, False, task_ids=tasks)
    expected = decode_without_cache(cm, **x, steps=4, sample=False, task_ids=tasks)
    assert_same_generation(got, expected)


def _source(tmp_path, tasks: int = 4) -> tuple[dict[str, torch.Tensor], str]:
    torch.manual_seed(3)
    tensors = {
        "prompt_embeddings": torch.randn(N, 32),
        "prefix_task_cols": torch.randn(tasks, N, 2),
        "prefix_task_rows": torch.randn(tasks, 2, 32),
    }
    path = tmp_path / "adapter_model.safetensors"
    save_file(tensors, str(path))
    return tensors, str(path)


@pytest.mark.parametrize(
    "init", ["average_source_tasks", "exact_source_task", "only_source_shared"]
)
def test_inits_from_a_source_adapter_are_peft_inits(tmp_path, init):
    source, path = _source(tmp_path)
    config = peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=N,
        num_ranks=2,
        num_tasks=1,
        prompt_tuning_init=init.upper(),
        prompt_tuning_init_state_dict_path=path,
        prompt_tuning_init_task=2,
    )
    theirs = peft.get_peft_model(ZOO["llama"].model(), config).prompt_encoder["default"]
    spec = surgeon.MultitaskPromptTuning(
        N, num_ranks=2, init=init, source_path=str(tmp_path), source_task=2
    )
    ours = surgeon.compile(ZOO["llama"].model(), spec).store.calls["default"]
    torch.testing.assert_close(ours.embeddings, source["prompt_embeddings"])
    torch.testing.assert_close(ours.embeddings, theirs.embedding.weight)
    if init != "only_source_shared":
        torch.testing.assert_close(ours.prefix_task_cols, theirs.prefix_task_cols)
        torch.testing.assert_close(ours.prefix_task_rows, theirs.prefix_task_rows)


def test_a_source_that_does_not_fit_or_is_pickled_is_refused(tmp_path):
    _, path = _source(tmp_path, tasks=2)
    spec = surgeon.MultitaskPromptTuning(
        N, num_ranks=2, init="exact_source_task", source_path=path, source_task=5
    )
    with pytest.raises(surgeon.SpecError, match="source_task=5: the source adapter has 2 tasks"):
        surgeon.compile(ZOO["llama"].model(), spec)
    spec = surgeon.MultitaskPromptTuning(4, init="only_source_shared", source_path=path)
    with pytest.raises(surgeon.SpecError, match=r"prompt_embeddings has shape \(3, 32\)"):
        surgeon.compile(ZOO["llama"].model(), spec)
    pickled = tmp_path / "source.bin"
    pickled.write_bytes(b"not read")
    spec = surgeon.MultitaskPromptTuning(N, init="only_source_shared", source_path=str(pickled))
    with pytest.raises(surgeon.SpecError, match=r"only \.safetensors files are read"):
        surgeon.compile(ZOO["llama"].model(), spec)


def test_a_peft_file_trained_from_a_source_loads_without_the_source(tmp_path):
    """The init is a record: the file's weights replace it, so the source need not exist."""
    _, path = _source(tmp_path)
    config = peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=N,
        num_ranks=2,
        prompt_tuning_init="AVERAGE_SOURCE_TASKS",
        prompt_tuning_init_state_dict_path=path,
    )
    pm = peft.get_peft_model(ZOO["llama"].model(), config).eval()
    saved = tmp_path / "saved"
    pm.save_pretrained(saved)
    (tmp_path / "adapter_model.safetensors").unlink()
    x = {**_inputs(), "task_ids": torch.zeros(2).long()}
    cm = surgeon.load(ZOO["llama"].model(), saved).eval()
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)


def test_surgeon_train_takes_task_ids_from_the_samples():
    cm = surgeon.compile(ZOO["llama"].model(), surgeon.MultitaskPromptTuning(N, num_tasks=2))
    rows = _inputs(batch=4, padded=False)["input_ids"].tolist()
    samples = [{"input_ids": r, "labels": r, "task_ids": i % 2} for i, r in enumerate(rows)]
    cols = cm.store.calls["default"].prefix_task_cols.detach().clone()
    config = surgeon.TrainingConfig(
        max_steps=1, batch_size=4, gradient_accumulation_steps=1, warmup_steps=0, progress=False
    )
    surgeon.train(cm, samples, config)
    moved = (cm.store.calls["default"].prefix_task_cols.detach() - cols).abs().amax(dim=(1, 2))
    assert bool((moved > 0).all())  # both tasks' factors trained


@pytest.mark.slow  # an export (prompt tuning's card exports in the default lane)
def test_exports_with_task_ids_as_an_onnx_input(tmp_path):
    cm = _compiled()
    x = {**_inputs(padded=False), "task_ids": torch.tensor([2, 0])}
    report = surgeon.export_onnx(cm, tmp_path / "mpt.onnx", x)
    assert "task_ids" in report.inputs and report.max_abs_diff < 1e-4
    assert report.verified_shapes["task_ids"] != (2,)  # checked at another batch size


def test_a_direct_call_of_the_model_takes_task_ids_too():
    cm = _compiled()
    x = _inputs()
    tasks = torch.tensor([1, 2])
    torch.testing.assert_close(
        logits(cm.model(**x, task_ids=tasks)), logits(cm(**x, task_ids=tasks))
    )
