"""CPT beyond the conformance suite: the context's embeddings and epsilons as PEFT's, CPT's labels
and loss (token types, decay) and the delta's gradient as PEFT's, training steps with the
projection as PEFT's, surgeon.train (projection, loss, exact resume), the spec's and config's
errors."""

from __future__ import annotations

import math

import pytest
import torch
from zoo import (
    ZOO,
    assert_same_generation,
    decode_without_cache,
    generate,
    peft_loaded,
    peft_model,
)

import surgeon
from surgeon.passes.prompt.cpt import decay_weights


def formula(spec, adapter, model, inputs):
    """CPT (Blau et al., 2024, arXiv 2410.17222): the model on ``[E + Π(δ); embed(ids)]``, each
    row of δ scaled by ``min(1, ε_i / ||δ_i||)``; ``ε_i`` is the token type's epsilon (format:
    types 1 and 3 mod 4, input: 2, else 1e-10) times ``sqrt(hidden / 2048)``."""
    ids = inputs["input_ids"]
    width = adapter.delta.shape[1]
    radius = {1: spec.format_epsilon, 3: spec.format_epsilon, 2: spec.epsilon}
    epsilons = torch.tensor(
        [
            radius.get(t % 4, 0.0) * math.sqrt(width / 2048) if t > 0 else 0.0
            for t in spec.token_types
        ]
    ).clamp(min=1e-10)
    norms = adapter.delta.norm(dim=1)
    shrink = torch.where(norms > 0, (epsilons / norms).clamp(max=1.0), torch.ones_like(norms))
    prompts = adapter.embeddings + adapter.delta * shrink.unsqueeze(1)
    embedded = model.get_input_embeddings()(ids)
    prompts = prompts.unsqueeze(0).expand(ids.shape[0], -1, -1).to(embedded.dtype)
    return model(inputs_embeds=torch.cat([prompts, embedded], 1))


peft = pytest.importorskip("peft")

IDS = (5, 17, 30, 41, 6, 18, 31, 42)
TYPES = (1, 2, 3, 4, 5, 6, 7, 8)  # two examples: template, input, template, label


def _spec(**fields) -> surgeon.CPT:
    return surgeon.CPT(**{"token_ids": IDS, "token_types": TYPES, "epsilon": 1.0, **fields})


def _peft_config(spec: surgeon.CPT) -> peft.CPTConfig:
    config = spec.to_peft_config(())
    for key in ("peft_type", "modules_to_save", "num_virtual_tokens"):
        config.pop(key)
    return peft.CPTConfig(
        task_type="CAUSAL_LM", **{k: v for k, v in config.items() if v is not None}
    )


def _pair(spec: surgeon.CPT, seed: int = 3, scale: float = 0.5):
    """Ours and PEFT's on the tiny Llama, the same delta (outside its balls) on both."""
    cm = surgeon.compile(ZOO["llama"].model(), spec)
    pm = peft_model(ZOO["llama"].model(), _peft_config(spec), seed=None).train()
    delta = torch.randn(len(spec.token_ids), 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        cm.store.calls["default"].delta.copy_(delta * scale)
        pm.prompt_encoder["default"].delta_embedding.weight.copy_(delta * scale)
    return cm, pm


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Two rows of two examples each (types 1-4 twice), the second row left-padded."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (2, 8), generator=generator)
    types = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 1, 2, 3, 4, 7, 8]])
    mask = (types > 0).long()
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": ids.clone(),
        "input_type_mask": types,
    }


def _peft_call(pm, batch):
    """PEFT shifts the caller's input_type_mask in place: give it a copy."""
    return pm(**{**batch, "input_type_mask": batch["input_type_mask"].clone()})


# -- the spec and the config ------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"token_ids": ()}, r"CPT.token_ids=\(\): expected at least one"),
        ({"token_ids": (1, -2)}, r"CPT.token_ids=\(1, -2\): expected a list of non-negative"),
        ({"token_types": (1, 2)}, "token_types has 2 entries, token_ids 8"),
        ({"loss_weighting": "exp"}, "CPT.loss_weighting='exp'"),
        ({"epsilon": -1.0}, r"CPT.epsilon=-1.0: expected a number >= 0"),
        ({"format_epsilon": None}, "CPT.format_epsilon=None"),
        ({"rank": 3}, "no field 'rank'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, message):
    with pytest.raises(surgeon.SpecError, match=message):
        _spec(**fields)


def test_types_default_to_format_tokens_as_peft():
    assert surgeon.CPT(token_ids=(4, 5)).token_types == (1, 1)
    config = peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[4, 5])
    assert config.cpt_tokens_type_mask == [1, 1]


def test_peft_config_keys_are_read_checked_or_refused():
    config = _spec(loss_weighting="decay", loss_decay_factor=0.7).to_peft_config(())
    back = surgeon.CPT.from_peft_config({**config, "tokenizer_name_or_path": "x"}, "here")
    assert back == _spec(loss_weighting="decay", loss_decay_factor=0.7)
    assert surgeon.CPT.from_peft_config({"peft_type": "CPT"}, "here") == surgeon.CPT()
    with pytest.raises(surgeon.SpecError, match="cpt_mask has 2 entries, cpt_token_ids 8"):
        surgeon.CPT.from_peft_config({**config, "cpt_mask": [1, 1]}, "here")
    with pytest.raises(surgeon.SpecError, match="opt_weighted_loss_type='exp'"):
        surgeon.CPT.from_peft_config({**config, "opt_weighted_loss_type": "exp"}, "here")
    with pytest.raises(surgeon.SpecError, match="'cpt_tokens_type_mask'"):
        surgeon.CPT.from_peft_config({**config, "cpt_tokens_type_mask": [1, 2]}, "here")


def test_models_other_than_causal_lms_and_foreign_token_ids_are_refused():
    with pytest.raises(surgeon.SpecError, match="not a causal language model"):
        surgeon.compile(ZOO["bert"].model(), _spec())
    with pytest.raises(surgeon.SpecError, match=r"token_ids: \[96\] do not fit"):
        surgeon.compile(ZOO["llama"].model(), surgeon.CPT(token_ids=(3, 96)))


# -- the adapter against PEFT -----------------------------------------------------------------


def test_context_embeddings_epsilons_and_projection_are_peft_s():
    cm, pm = _pair(_spec(format_epsilon=0.5))
    ours, theirs = cm.store.calls["default"], pm.prompt_encoder["default"]
    assert torch.equal(ours.embeddings, theirs.embedding.weight)
    assert not ours.embeddings.requires_grad and ours.delta.requires_grad
    assert torch.equal(ours.epsilons, theirs.get_epsilon())
    with torch.no_grad():
        prompts = ours.prompts()
    assert torch.equal(prompts, theirs(torch.arange(8)))
    x = {"input_ids": _batch()["input_ids"]}
    torch.testing.assert_close(
        cm(**x).logits, formula(cm.spec("default"), ours, ZOO["llama"].model(), x).logits
    )


@pytest.mark.parametrize("weighting", ["none", "decay"])
def test_labels_loss_and_gradient_are_peft_s(weighting):
    """Label types count (the context's label tokens too), the others are -100; the decayed
    loss weighs the earlier example less; the delta's gradient skips the label rows."""
    cm, pm = _pair(_spec(loss_weighting=weighting, loss_decay_factor=0.5))
    cm.train(), pm.train()
    batch = _batch()
    ours, theirs = cm(**batch), _peft_call(pm, batch)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    ours.loss.backward(), theirs.loss.backward()
    grad = cm.store.calls["default"].delta.grad
    torch.testing.assert_close(grad, pm.prompt_encoder["default"].delta_embedding.weight.grad)
    assert grad[3].abs().sum() == 0 and grad[7].abs().sum() == 0 and grad[0].abs().sum() > 0


def test_without_an_input_type_mask_every_input_token_is_a_label_as_peft():
    cm, pm = _pair(_spec())
    batch = {k: v for k, v in _batch().items() if k != "input_type_mask"}
    torch.testing.assert_close(cm(**batch).loss, pm(**batch).loss, rtol=1e-5, atol=1e-6)


def test_decay_weighs_each_example_factor_times_less_than_the_next():
    types = torch.tensor([[1, 4, 4, 8, 2, 12, 0], [9, 12, 4, 3, 0, 0, 0]])
    weights = decay_weights(types, 0.5)
    assert weights.tolist() == [
        [1, 0.25, 0.25, 0.5, 1, 1, 1],
        [1, 1, 0.5, 1, 1, 1, 1],
    ]


@pytest.mark.slow
def test_training_steps_with_the_projection_hook_follow_peft():
    """Adam on both; ours projects after each step (cm.update_ranks, as surgeon.train), PEFT at
    the next forward: the same losses, and the same prompts in the files. Both start inside
    the balls, as a new delta (zero) does."""
    cm, pm = _pair(_spec(loss_weighting="decay", loss_decay_factor=0.5))
    cm.store.calls["default"].project_in_place()
    batch = _batch()
    ours_opt = torch.optim.Adam([p for p in cm.parameters() if p.requires_grad], lr=0.1)
    theirs_opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    cm.train(), pm.train()
    for step in range(4):
        ours, theirs = cm(**batch).loss, _peft_call(pm, batch).loss
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        ours.backward(), theirs.backward()
        ours_opt.step(), theirs_opt.step()
        cm.update_ranks(step)
        ours_opt.zero_grad(), theirs_opt.zero_grad()
    adapter = cm.store.calls["default"]
    norms = adapter.delta.norm(dim=1)
    assert (norms <= adapter.epsilons * (1 + 1e-6)).all() and norms[0] > 0.9 * adapter.epsilons[0]
    saved = cm.adapter_state_dict()["prompt_embeddings"]
    torch.testing.assert_close(saved, pm.get_prompt_embedding_to_save("default"), rtol=0, atol=1e-6)


def test_files_go_both_ways_with_peft_s_loss(tmp_path):
    cm, pm = _pair(_spec())
    batch = _batch()
    cm.save_adapters(tmp_path / "ours")
    theirs = peft_loaded(ZOO["llama"].model(), tmp_path / "ours")
    torch.testing.assert_close(_peft_call(theirs, batch).loss, cm.eval()(**batch).loss)
    pm.save_pretrained(tmp_path / "peft")
    loaded = surgeon.load(ZOO["llama"].model(), tmp_path / "peft").eval()
    assert loaded.store.calls["default"].delta.abs().sum() == 0  # a new delta, as PEFT's
    torch.testing.assert_close(loaded(**batch).loss, _peft_call(pm.eval(), batch).loss)


def test_generate_with_the_cache_is_the_full_forwards_of_peft(tmp_path):
    """Ours decodes as full forwards do, ours and PEFT's alike. (PEFT 0.21's own cached
    generate for CPT departs from its full forwards after the first new token.)"""
    cm, pm = _pair(_spec())
    cm.eval(), pm.eval()
    ids = _batch()["input_ids"][:, :5]
    mask = torch.ones_like(ids)
    expected = decode_without_cache(pm, ids, mask, 3, sample=False)
    assert_same_generation(decode_without_cache(cm, ids, mask, 3, sample=False), expected)
    assert_same_generation(generate(cm, ids, mask, 3, sample=False), expected)


def test_call_errors_name_the_argument():
    cm = surgeon.compile(ZOO["llama"].model(), _spec())
    batch = _batch()
    with pytest.raises(surgeon.SpecError, match=r"input_type_mask has shape \(2, 7\)"):
        cm(**{**batch, "input_type_mask": batch["input_type_mask"][:, 1:]})
    with pytest.raises(surgeon.SpecError, match=r"labels have shape \(2, 7\)"):
        cm(**{**batch, "labels": batch["labels"][:, 1:]})


# -- surgeon.train ------------------------------------------------------------------------------


def _samples() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    types = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    out = []
    for _ in range(8):
        ids = torch.randint(3, 96, (8,), generator=generator)
        out.append({"input_ids": ids, "labels": ids.clone(), "input_type_mask": types})
    return out


def _config(**changes) -> surgeon.TrainingConfig:
    return surgeon.TrainingConfig(
        learning_rate=0.1,
        batch_size=2,
        max_steps=4,
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=None,
        lr_scheduler="constant",
        shuffle=False,
        progress=False,
        distributed="none",
    ).replace(**changes)


@pytest.mark.slow
def test_surgeon_train_projects_after_each_step_and_resumes_exactly(tmp_path):
    spec = _spec(loss_weighting="decay", loss_decay_factor=0.5)
    whole = surgeon.compile(ZOO["llama"].model(), spec)
    result = surgeon.train(whole, _samples(), _config())
    adapter = whole.store.calls["default"]
    assert (adapter.delta.norm(dim=1) <= adapter.epsilons * (1 + 1e-6)).all()
    assert adapter.delta[0].norm() > 0.9 * adapter.epsilons[0]  # it moved to its ball's edge
    assert adapter.delta[3].abs().sum() == 0  # label tokens do not train
    assert all(math.isfinite(loss) for loss in result.losses)
    run = tmp_path / "run"
    surgeon.train(
        surgeon.compile(ZOO["llama"].model(), spec),
        _samples(),
        _config(max_steps=2, output_dir=str(run)),
    )
    resumed = surgeon.compile(ZOO["llama"].model(), spec)
    surgeon.train(resumed, _samples(), _config(output_dir=str(run)), resume_from=True)
    assert torch.equal(resumed.store.calls["default"].delta, adapter.delta)
