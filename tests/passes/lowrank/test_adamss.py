"""AdaMSS's card (its clustered-subspace formula) and what is AdaMSS's own: the subspaces as
PEFT clusters them (k-means as scikit-learn runs it), the init beside PEFT's, files saved by
either side loaded by the other, the bias column, config keys refused. The conformance suite
(tests/conformance) runs the formula, merging, files, PEFT parity, gradients, devices and dtypes
on every example."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import ZOO, One, logits, peft_loaded, peft_model, plain_output, randomize

import surgeon
from surgeon.errors import SpecError
from surgeon.passes.lowrank.adamss import AdaMSS, kmeans_labels


def formula(spec, adapter, base, x):
    """AdaMSS: ``W x + b + S(B_i A_i V [x; 1])``, each subspace's rows put back in place; with a
    bias, ``V`` has a last column for the constant input 1."""
    v = adapter.adamss_newB.float()
    delta = torch.zeros(base.out_features, v.shape[1])
    rows = torch.argsort(adapter.order)
    start = 0
    for a, b in adapter.factors():
        count = b.shape[0]
        delta[rows[start : start + count]] = b.float() @ a.float() @ v
        start += count
    weight = base.weight.float() + delta[:, : base.in_features]
    out = plain_output(base, x.float(), weight)
    if base.bias is not None:
        out = out + delta[:, -1]
    return out.to(x.dtype)


peft = pytest.importorskip("peft")
pytest.importorskip("sklearn")


def _linear(bias: bool = True) -> One:
    torch.manual_seed(0)
    return One(nn.Linear(12, 10, bias=bias))


@pytest.mark.parametrize(("shape", "clusters"), [((10, 6), 2), ((40, 8), 5), ((7, 7), 3)])
def test_kmeans_matches_scikit_learn(shape, clusters):
    from sklearn.cluster import KMeans

    rows = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + clusters))
    expected = KMeans(
        n_clusters=clusters, init="random", n_init=1, max_iter=10, random_state=123456789
    ).fit_predict(rows.numpy().astype("float32"))
    assert kmeans_labels(rows, clusters).tolist() == expected.tolist()


@pytest.mark.parametrize("bias", [True, False])
def test_init_as_peft(bias):
    """Same W, same seed: the same subspaces, projection and A factors as PEFT's."""
    spec = AdaMSS(rank=5, subspaces=3, subspace_rank=2, targets=("layer",))
    torch.manual_seed(7)
    cm = surgeon.compile(_linear(bias), spec)
    torch.manual_seed(7)
    config = peft.AdamssConfig(r=5, num_subspaces=3, subspace_rank=2, target_modules=["layer"])
    pm = peft_model(_linear(bias), config, seed=None)
    ours = dict(cm.store.items("default"))["layer"].peft_tensors()
    theirs = peft.get_peft_model_state_dict(pm)
    assert sorted(ours) == sorted(k.rpartition("layer.")[2] for k in theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key.rpartition("layer.")[2]], value)


@pytest.mark.parametrize("bias", [True, False])
def test_files_both_ways(tmp_path, bias):
    """PEFT saves (the subspaces' rows are not in the file: they come from clustering W), surgeon
    loads with PEFT's outputs; and the other way."""
    x = torch.randn(3, 12)
    config = peft.AdamssConfig(r=6, num_subspaces=3, subspace_rank=2, target_modules=["layer"])
    pm = peft_model(_linear(bias), config)
    pm.save_pretrained(tmp_path / "peft")
    loaded = surgeon.load(_linear(bias), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded(x)), logits(pm(x)))

    cm = surgeon.compile(
        _linear(bias), AdaMSS(rank=6, subspaces=3, subspace_rank=2, targets=("layer",))
    )
    randomize(cm)
    cm.save_adapters(tmp_path / "ours")
    theirs = peft_loaded(_linear(bias), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs(x)), logits(cm(x)))


def test_peft_files_with_asa_load_its_schedule(tmp_path):
    config = peft.AdamssConfig(
        r=4,
        num_subspaces=2,
        target_modules=["layer"],
        use_asa=True,
        init_warmup=3,
        final_warmup=9,
        mask_interval=2,
        asa_target_subspaces=1,
        asa_schedule_exponent=2.0,
    )
    peft_model(_linear(), config).save_pretrained(tmp_path)
    spec = surgeon.load(_linear(), tmp_path).spec("default")
    assert (spec.asa, spec.init_warmup, spec.final_warmup, spec.mask_interval) == (True, 3, 9, 2)
    assert (spec.asa_target_subspaces, spec.schedule_exponent) == (1, 2.0)


def test_validation_messages():
    with pytest.raises(SpecError, match="subspaces"):
        AdaMSS(subspaces=0)
    with pytest.raises(SpecError, match="svd_threshold"):
        AdaMSS(svd_threshold=2.0)


# -- adaptive subspace allocation (ASA) --------------------------------------------------------

ASA = {"init_warmup": 1, "final_warmup": 7, "mask_interval": 2, "asa_target_subspaces": 3}


def _asa_spec() -> AdaMSS:
    return AdaMSS(
        rank=6, subspaces=3, subspace_rank=2, asa=True, targets=("q_proj", "v_proj"), **ASA
    )


def _train_side_by_side(steps: int):
    """Ours and PEFT's from the same W and factors, AdamW on both, allocation after each
    optimizer step (where PEFT's AdamssAsaCallback calls update_and_allocate)."""
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), _asa_spec())
    config = peft.AdamssConfig(
        r=6,
        num_subspaces=3,
        subspace_rank=2,
        use_asa=True,
        target_modules=["q_proj", "v_proj"],
        **ASA,
    )
    pm = peft_model(entry.model(), config, seed=None)
    randomize(cm, scale=0.3)  # B non-zero: every factor has gradients from the first step
    with torch.no_grad():
        for path, layer in cm.store.items("default"):
            theirs = pm.base_model.model.get_submodule(path)
            for i, (a, b) in enumerate(layer.factors()):
                theirs.adamss_A["default"][i].copy_(a)
                theirs.adamss_B["default"][i].copy_(b)
    cm.train(), pm.train()
    ours = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=1e-2)
    theirs = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        ids = torch.randint(3, 96, (2, 6), generator=generator)
        pm(input_ids=ids, labels=ids).loss.backward()
        cm(input_ids=ids, labels=ids).loss.backward()
        ours.step(), theirs.step()
        pm.base_model.update_and_allocate(step)
        cm.update_ranks(step)
        ours.zero_grad(), theirs.zero_grad()
        yield step, cm, pm


def test_asa_freezes_the_subspaces_peft_freezes():
    frozen = {}
    for step, cm, pm in _train_side_by_side(10):
        for path, layer in cm.store.items("default"):
            theirs = pm.base_model.model.get_submodule(path)
            expected = [p.requires_grad for p in theirs.adamss_A["default"]]
            assert layer.gate.active.tolist() == expected, (step, path)
            for i, (a, b) in enumerate(layer.factors()):
                torch.testing.assert_close(a, theirs.adamss_A["default"][i], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(b, theirs.adamss_B["default"][i], rtol=1e-4, atol=1e-5)
        frozen[step] = sum(
            int((~layer.gate.active).sum()) for _, layer in cm.store.items("default")
        )
    # 12 subspaces, thinned at steps 2, 4 and 6 (PEFT keeps the scores above the count-th)
    assert frozen[0] == frozen[1] == 0 and frozen[9] == 9


@pytest.mark.slow
def test_a_resumed_run_allocates_as_an_uninterrupted_run(tmp_path):
    """ASA's averages and frozen flags are buffers of the layers: a checkpoint between two
    allocations restores them, and the run goes on exactly."""
    import torch.nn.functional as F

    spec = AdaMSS(rank=4, subspaces=3, subspace_rank=2, asa=True, targets=("body.0", "head"), **ASA)
    generator = torch.Generator().manual_seed(4)
    data = [
        (torch.randn(12, generator=generator), torch.randn(5, generator=generator))
        for _ in range(16)
    ]
    config = surgeon.TrainingConfig(
        learning_rate=1e-2,
        batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=8,
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=None,
        lr_scheduler="constant",
        shuffle=False,
        progress=False,
        distributed="none",
    )

    def compiled() -> surgeon.CompiledModel:
        model = ZOO["mlp"].model()
        model.body[2].p = 0.0
        cm = surgeon.compile(model, spec)
        randomize(cm, seed=2, scale=0.5)
        return cm

    whole = compiled()
    surgeon.train(whole, data, config, loss_fn=F.mse_loss)
    run = tmp_path / "run"
    surgeon.train(
        compiled(), data, config.replace(max_steps=3, output_dir=str(run)), loss_fn=F.mse_loss
    )
    resumed = compiled()
    surgeon.train(
        resumed, data, config.replace(output_dir=str(run)), loss_fn=F.mse_loss, resume_from=True
    )
    for (path, ours), (_, theirs) in zip(
        resumed.store.items("default"), whole.store.items("default")
    ):
        assert ours.gate.active.tolist() == theirs.gate.active.tolist(), path
        assert not theirs.gate.active.all()
        for name, value in theirs.named_parameters():
            torch.testing.assert_close(getattr(ours, name), value, rtol=0, atol=0)
