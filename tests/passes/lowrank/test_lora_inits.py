"""LoRA's initialisations of passes/lowrank/lora_inits.py against PEFT's own initialisers run on
the same model (and data): LoftQ, EVA. The LoRA card (test_lora.py) holds LoRA's formula; these are
its init options, their files and their errors."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import warnings

import pytest
import torch
from torch import nn
from zoo import ZOO, One, add_noise, gpt2_conv1d, load_with_changed_config, peft_loaded, peft_model

import surgeon
from surgeon import quant

peft = pytest.importorskip("peft")


def _pair(build):
    """Two equal models from one seed: PEFT's side and ours."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build())
    return models


def _assert_peft_factors(pm, cm, base_too=True):
    """Ours holds PEFT's A, B (and base weight) on every adapted layer."""
    theirs = dict(pm.named_parameters())
    for path, adapter in cm.store.items("default"):
        name = f"base_model.model.{path}."
        if adapter.kind == "embedding":
            a, b = (
                theirs[name + "lora_embedding_A.default"],
                theirs[name + "lora_embedding_B.default"],
            )
        else:
            a, b = theirs[name + "lora_A.default.weight"], theirs[name + "lora_B.default.weight"]
        torch.testing.assert_close(adapter.lora_A, a)
        torch.testing.assert_close(adapter.lora_B, b)
        if base_too:
            torch.testing.assert_close(
                cm.model.get_submodule(path).weight, theirs[name + "base_layer.weight"]
            )


# -- LoftQ ---------------------------------------------------------------------------------------


@pytest.fixture
def peft_loftq(monkeypatch):
    """PEFT's ``loftq_init`` as it is where a GPU runs it. On a CPU-only machine: the same code
    with its compute device ``"cuda"`` read as ``"cpu"``, and bitsandbytes' dequantisation by
    its reference implementation (its AVX-512 CPU kernel dequantises some shapes, 32 x 32 among
    them, to other values than its reference; the quantised bytes agree)."""
    from peft.tuners.lora import layer
    from peft.utils import loftq_utils

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' notice about its CPU kernels
        import bitsandbytes
    if not torch.cuda.is_available():
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code

        original = loftq_utils.loftq_init.__wrapped__
        code = original.__code__
        consts = tuple("cpu" if c == "cuda" else c for c in code.co_consts)
        on_cpu = types.FunctionType(
            code.replace(co_consts=consts), original.__globals__, original.__name__
        )
        monkeypatch.setattr(layer, "loftq_init", torch.no_grad()(on_cpu))

        def reference(packed, state):
            code = _get_4bit_code(state.quant_type, packed.device)
            flat = packed.reshape(-1).view(torch.uint8)
            plain = _dequantize_4bit_compute.__wrapped__  # not through torch.compile
            return plain(flat, state.absmax, code, state.blocksize, state.shape, state.dtype)

        monkeypatch.setattr(bitsandbytes.functional, "dequantize_4bit", reference)


def _loftq_pair(build, targets, iterations=1, rank=2, alpha=4):
    theirs, ours = _pair(build)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        init_lora_weights="loftq",
        loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=iterations),
    )
    pm = peft_model(theirs, config, seed=None)
    spec = surgeon.LoRA(
        rank=rank,
        alpha=alpha,
        targets=tuple(targets),
        init="loftq",
        init_config={"loftq_iter": iterations},
    )
    return pm, surgeon.compile(ours, spec)


@pytest.mark.parametrize(
    ("iterations", "dtype"),
    [(1, torch.float32), pytest.param(3, torch.bfloat16, marks=pytest.mark.slow)],
)
def test_loftq_gives_peft_factors_and_quantised_base(peft_loftq, iterations, dtype):
    entry = ZOO["mlp"]
    pm, cm = _loftq_pair(lambda: entry.model().to(dtype), entry.targets, iterations)
    _assert_peft_factors(pm, cm)
    x = {k: v.to(dtype) for k, v in entry.example().items()}
    torch.testing.assert_close(cm(**x), pm(**x))


def test_loftq_base_is_on_the_nf4_grid_and_its_factors_shrink_the_error():
    """The base LoftQ leaves is exactly a 4-bit NF4 weight (storing it in 4 bits loses nothing)
    and, with ``alpha = r`` (scale 1), ``Q + B A`` is closer to W than Q alone."""
    torch.manual_seed(0)
    model = One(nn.Linear(128, 64))
    original = model.layer.weight.detach().clone()
    spec = surgeon.LoRA(rank=8, alpha=8, targets=("layer",), init="loftq")
    cm = surgeon.compile(model, spec)
    ((_, adapter),) = cm.store.items("default")
    base = model.layer.weight.detach().clone()
    stored = surgeon.NF4(block_size=64, double_quant=False, compute_dtype="float32")
    assert torch.equal(stored.quantize(base).dequantize(torch.float32), base)
    plain_error = (original - stored.quantize(original).dequantize(torch.float32)).norm()
    assert (original - base - adapter.delta_weight()).norm() < 0.9 * plain_error


@pytest.mark.slow
def test_loftq_on_a_llama_matches_peft(peft_loftq):
    entry = ZOO["llama"]
    pm, cm = _loftq_pair(entry.model, ("q_proj", "v_proj", "down_proj"), iterations=2)
    _assert_peft_factors(pm, cm)


@pytest.mark.slow
def test_loftq_files_load_both_ways_with_peft_outputs(peft_loftq, tmp_path):
    """A file names ``loftq`` and its options; both libraries rerun LoftQ on the load's base,
    so trained factors load with the quantised base they were trained on."""
    entry = ZOO["mlp"]
    pm, cm = _loftq_pair(entry.model, entry.targets, iterations=2)
    add_noise(p for p in pm.parameters() if p.requires_grad)
    add_noise(cm.store.parameters())
    pm.save_pretrained(tmp_path / "peft")
    cm.save_adapters(tmp_path / "ours")
    for folder in ("peft", "ours"):
        config = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        assert config["init_lora_weights"] == "loftq"
        assert config["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    x = entry.example()
    loaded = surgeon.load(entry.model(), tmp_path / "peft")
    assert loaded.store.specs["default"].init_config == {"loftq_bits": 4, "loftq_iter": 2}
    for out in (loaded(**x), peft_loaded(entry.model(), tmp_path / "ours")(**x), cm(**x)):
        torch.testing.assert_close(out, pm(**x))


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"loftq_bits": 8}, r"loftq_config.loftq_bits=8 is not supported \(supported: 4"),
        ({"loftq_iter": 0}, r"loftq_config.loftq_iter=0: expected an integer >= 1"),
        ({"loftq_iters": 2}, r"loftq_config has no option 'loftq_iters'"),
    ],
)
def test_loftq_options_are_checked(config, match):
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.LoRA(init="loftq", init_config=config)


def test_loftq_files_with_options_we_do_not_have_are_refused(tmp_path):
    cm = surgeon.compile(ZOO["mlp"].model(), surgeon.LoRA(rank=2, targets=("head",), init="loftq"))
    cm.save_adapters(tmp_path)
    change = {"loftq_config": {"loftq_bits": 8, "loftq_iter": 1}}
    match = r"loftq_bits=8 is not supported .*adapter_config.json key 'loftq_config'"
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(ZOO["mlp"].model(), tmp_path, change)


def test_options_of_an_init_that_takes_none_are_dropped_with_a_warning():
    """As PEFT ignores (with a warning) a loftq_config or eva_config beside another init."""
    with pytest.warns(
        UserWarning, match=r"init_config=\{'loftq_iter': 2\} is ignored: init='pissa'"
    ):
        spec = surgeon.LoRA(init="pissa", init_config={"loftq_iter": 2})
    assert spec.init_config == {}


@pytest.mark.parametrize(
    "init", ["eva", *(pytest.param(i, marks=pytest.mark.slow) for i in ("loftq", "lora_ga"))]
)
def test_memory_estimates_take_the_init_s_lora(init):
    """The init changes no shape (EVA's moved ranks aside) and needs no data to estimate."""
    spec = surgeon.LoRA(rank=2, targets=("q_proj",), init=init, init_config={})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate = surgeon.estimate_memory(ZOO["llama"].model(), spec)
    assert "QLoRA" in str(estimate)


@pytest.mark.parametrize(
    "layer", [lambda: nn.Conv2d(3, 4, 3), lambda: nn.Embedding(9, 6), lambda: gpt2_conv1d(8, 8)]
)
def test_loftq_adapts_linear_layers_only(layer):
    """PEFT's LoftQ fails on embeddings and convolutions and factors GPT-2's (in, out) weight
    the wrong way round: refused, the model left as it was."""
    model = One(layer())
    saved = model.layer.weight.detach().clone()
    with pytest.raises(surgeon.SpecError, match=r"init='loftq' supports Linear layers; layer is"):
        surgeon.compile(model, surgeon.LoRA(rank=2, targets=("layer",), init="loftq"))
    assert torch.equal(model.layer.weight, saved)


def test_loftq_refuses_variants_and_quantised_layers():
    with pytest.raises(surgeon.SpecError, match=r"DoRA.init='loftq': expected one of 'default'"):
        surgeon.DoRA(init="loftq")
    model = One(nn.Linear(64, 32))
    quant.quantize_linear(model.layer, surgeon.NF4(compute_dtype="float32"))
    with pytest.raises(surgeon.SpecError, match="residual inits need its full-precision weight"):
        surgeon.compile(model, surgeon.LoRA(rank=2, targets=("layer",), init="loftq"))


# -- EVA -----------------------------------------------------------------------------------------


def _mlp_batches(count=4, rows=16):
    generator = torch.Generator().manual_seed(7)
    return [{"x": torch.randn(rows, 12, generator=generator)} for _ in range(count)]


def _token_batches(count=4):
    """Token batches with left padding and labels that mask some positions out."""
    generator = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, 96, (2, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        labels = ids.clone()
        labels[0, :2] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _eva_pair(build, targets, batches, tokens, rank=3, alpha=6, **options):
    """PEFT's EVA (``initialize_lora_eva_weights`` on the same data: for plain tensors PEFT's
    whole-input functions, for token batches its language-modelling ones) and ours."""
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    theirs, ours = _pair(build)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        init_lora_weights="eva",
        eva_config=peft.EvaConfig(**options),
    )
    pm = peft_model(theirs, config, seed=None)
    plain = {} if tokens else {"prepare_model_inputs_fn": None, "prepare_layer_inputs_fn": None}
    initialize_lora_eva_weights(pm, batches, show_progress_bar=False, **plain)
    spec = surgeon.LoRA(
        rank=rank, alpha=alpha, targets=tuple(targets), init="eva", init_config=options
    )
    return pm, surgeon.compile(ours, spec, calibration=batches)


def _assert_eva_matches(pm, cm, tmp_path):
    """Same A (B zero) and scale per layer, and the same rank/alpha patterns in the files."""
    theirs = dict(pm.named_parameters())
    for path, adapter in cm.store.items("default"):
        name = f"base_model.model.{path}."
        torch.testing.assert_close(adapter.lora_A, theirs[name + "lora_A.default.weight"])
        assert torch.count_nonzero(adapter.lora_B) == 0
        assert adapter.scale == pytest.approx(
            pm.base_model.model.get_submodule(path).scaling["default"]
        )
    pm.save_pretrained(tmp_path / "peft")
    cm.save_adapters(tmp_path / "ours")
    configs = [
        json.loads((tmp_path / f / "adapter_config.json").read_text()) for f in ("peft", "ours")
    ]
    for key in ("rank_pattern", "alpha_pattern", "init_lora_weights"):
        assert configs[0][key] == configs[1][key], key
    return configs[1]


@pytest.mark.parametrize(
    "targets", [("head",), pytest.param(ZOO["mlp"].targets, marks=pytest.mark.slow)]
)
def test_eva_gives_peft_factors_on_plain_inputs(targets, tmp_path):
    entry = ZOO["mlp"]
    pm, cm = _eva_pair(entry.model, targets, _mlp_batches(), False, tau=0.7)
    config = _assert_eva_matches(pm, cm, tmp_path)
    assert config["eva_config"]["tau"] == 0.7
    x = entry.example()
    torch.testing.assert_close(cm(**x), pm(**x))


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [{"tau": 0.5}, {"tau": 0.5, "whiten": True, "use_label_mask": False}],
)
def test_eva_redistributes_ranks_as_peft_on_a_llama(options, tmp_path):
    """Token batches (padding and labels masked out), q/k/v sharing one input (decomposed
    once), ranks moved between layers and alphas scaled with them."""
    entry = ZOO["llama"]
    targets = ("q_proj", "k_proj", "v_proj", "down_proj")
    pm, cm = _eva_pair(entry.model, targets, _token_batches(), True, rank=2, alpha=4, **options)
    config = _assert_eva_matches(pm, cm, tmp_path)
    assert config["rank_pattern"]  # the ranks did move
    loaded = surgeon.load(entry.model(), tmp_path / "peft")
    ids = _token_batches(1)[0]
    torch.testing.assert_close(loaded(**ids).logits, pm(**ids).logits)


@pytest.mark.slow
def test_eva_file_loads_both_ways(tmp_path):
    """EVA's files hold A, B and the ranks: PEFT's and ours load without data either side."""
    entry = ZOO["mlp"]
    pm, cm = _eva_pair(entry.model, entry.targets, _mlp_batches(), False, tau=0.7, rho=1.5)
    add_noise(p for p in pm.parameters() if p.requires_grad)
    add_noise(cm.store.parameters())
    pm.save_pretrained(tmp_path / "peft")
    cm.save_adapters(tmp_path / "ours")
    x = entry.example()
    loaded = surgeon.load(entry.model(), tmp_path / "peft")
    assert loaded.store.specs["default"].init == "eva"
    for out in (loaded(**x), peft_loaded(entry.model(), tmp_path / "ours")(**x), cm(**x)):
        torch.testing.assert_close(out, pm(**x))


def test_eva_shows_progress_on_stderr(capsys):
    entry = ZOO["mlp"]
    spec = surgeon.LoRA(rank=2, targets=("head",), init="eva", init_config={"tau": 0.5})
    surgeon.compile(entry.model(), spec, calibration=_mlp_batches())
    assert "EVA: layers converged" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("calibration", "match"),
    [
        (
            None,
            r"LoRA.init='eva' reads data: pass batches as surgeon.compile\(model, spec, calibration=",
        ),
        ([], r"LoRA.init='eva': the calibration data holds no batch"),
        ({"x": torch.randn(4, 12)}, r"calibration must be an iterable of batches .* got one dict"),
        ([torch.randn(4, 12)], r"calibration batch 0 is a Tensor, expected a dict"),
        ([{"y": torch.randn(4, 12)}], r"calibration batch 0 does not fit the model \(TypeError"),
        ([{"x": torch.randn(4, 7)}], r"calibration batch 0 does not fit the model \(RuntimeError"),
    ],
)
def test_eva_without_fitting_data_is_refused(calibration, match):
    model = ZOO["mlp"].model()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    spec = surgeon.LoRA(rank=2, targets=("head",), init="eva")
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.compile(model, spec, calibration=calibration)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_eva_refuses_more_components_than_input_features():
    spec = surgeon.LoRA(rank=8, targets=("body.0",), init="eva")
    match = r"init='eva' on body.0: rank x rho = 16 components, more than its 12 input features"
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.compile(ZOO["mlp"].model(), spec, calibration=_mlp_batches())


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"rho": 0.5}, r"eva_config.rho=0.5: expected a number >= 1"),
        ({"tau": 0}, r"eva_config.tau=0: expected a number in \(0, 1\]"),
        ({"whiten": "yes"}, r"eva_config.whiten='yes': expected true or false"),
        ({"alpha": 1}, r"eva_config has no option 'alpha'"),
    ],
)
def test_eva_options_are_checked(config, match):
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.LoRA(init="eva", init_config=config)


def test_data_free_inits_ignore_calibration():
    batches = _mlp_batches()
    for init in ("default", "loftq"):
        spec = surgeon.LoRA(rank=2, targets=("head",), init=init)
        surgeon.compile(ZOO["mlp"].model(), spec, calibration=batches)


# -- CorDA ---------------------------------------------------------------------------------------


def _peft_corda():
    """PEFT's ``preprocess_corda``. Its module imports ``dataclass`` from the attrs package
    (not installed here) for a plain record of three tensors: the standard library's
    ``dataclass`` stands in for it."""
    if "attr" not in sys.modules:
        sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
    from peft.tuners.lora.corda import preprocess_corda

    return preprocess_corda


def _corda_pair(build, targets, batches, rank=2, alpha=4, **options):
    """PEFT's CorDA (``preprocess_corda`` running the model on the same batches, then its
    ``corda_init``) and ours."""
    preprocess_corda = _peft_corda()
    from peft.tuners.lora.config import CordaConfig

    theirs, ours = _pair(build)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        init_lora_weights="corda",
        corda_config=CordaConfig(**options),
    )

    def run_model():
        for batch in batches:
            theirs(**batch)

    preprocess_corda(theirs, config, run_model=run_model)
    pm = peft_model(theirs, config, seed=None)
    spec = surgeon.LoRA(
        rank=rank, alpha=alpha, targets=tuple(targets), init="corda", init_config=options
    )
    return pm, surgeon.compile(ours, spec, calibration=batches)


@pytest.mark.parametrize("method", ["ipm", pytest.param("kpm", marks=pytest.mark.slow)])
def test_corda_gives_peft_factors_and_residual(method):
    entry = ZOO["mlp"]
    pm, cm = _corda_pair(entry.model, entry.targets, _mlp_batches(), corda_method=method)
    _assert_peft_factors(pm, cm)
    x = entry.example()
    torch.testing.assert_close(cm(**x), pm(**x))


@pytest.mark.slow
def test_corda_on_a_llama_and_gpt2_matches_peft():
    """One sample per batch (PEFT's hook takes tokens x features); GPT-2's (in, out) Conv1D."""
    samples = [{"input_ids": b["input_ids"][:1]} for b in _token_batches()]
    pm, cm = _corda_pair(ZOO["llama"].model, ("q_proj", "down_proj"), samples)
    _assert_peft_factors(pm, cm)
    torch.testing.assert_close(cm(**samples[0]).logits, pm(**samples[0]).logits)
    pm, cm = _corda_pair(ZOO["gpt2"].model, ("c_attn",), samples, corda_method="kpm")
    _assert_peft_factors(pm, cm)


def test_corda_refuses_batches_of_several_samples_and_files(tmp_path):
    batches = [{"input_ids": b["input_ids"]} for b in _token_batches(1)]
    spec = surgeon.LoRA(rank=2, targets=("q_proj",), init="corda")
    with pytest.raises(surgeon.SpecError, match=r"CorDA takes one sample per calibration batch"):
        surgeon.compile(ZOO["llama"].model(), spec, calibration=batches)
    spec = surgeon.LoRA(rank=2, targets=("head",), init="corda")
    cm = surgeon.compile(ZOO["mlp"].model(), spec, calibration=_mlp_batches(1))
    cm.save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=r"init_lora_weights='corda': the file's factors"):
        surgeon.load(ZOO["mlp"].model(), tmp_path)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"corda_method": "xpm"}, r"corda_config.corda_method='xpm': expected 'ipm' or 'kpm'"),
        ({"cache_file": "c.pt"}, r"corda_config.cache_file='c.pt' is not supported"),
    ],
)
def test_corda_options_are_checked(config, match):
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.LoRA(init="corda", init_config=config)


# -- LoRA-GA -------------------------------------------------------------------------------------


def _lm_batches(count=2):
    """Token batches with labels (so the model computes its loss)."""
    return [{**b, "labels": b["input_ids"]} for b in _token_batches(count)]


def _lora_ga_pair(build, targets, batches, rank=2, alpha=4, **options):
    """PEFT's LoRA-GA (``preprocess_loraga`` with a train step over the same batches, then
    ``get_peft_model``) and ours, each from seed 3 (its randomized SVDs draw)."""
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    theirs, ours = _pair(build)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(**options),
    )

    def train_step():
        for batch in batches:
            theirs(**batch).loss.backward()

    torch.manual_seed(3)
    preprocess_loraga(theirs, config, train_step)
    pm = peft_model(theirs, config, seed=None)
    spec = surgeon.LoRA(
        rank=rank, alpha=alpha, targets=tuple(targets), init="lora_ga", init_config=options
    )
    torch.manual_seed(3)
    return pm, surgeon.compile(ours, spec, calibration=batches)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, marks=pytest.mark.slow),
        pytest.param({"direction": "random", "scale": "weight_svd"}, marks=pytest.mark.slow),
        pytest.param({"direction": "ArBr", "scale": "gd_scale"}, marks=pytest.mark.slow),
        pytest.param({"direction": "A2rBr", "scale": "unit"}, marks=pytest.mark.slow),
    ],
)
def test_lora_ga_gives_peft_factors_and_residual(options):
    entry = ZOO["llama"]
    pm, cm = _lora_ga_pair(entry.model, ("q_proj", "down_proj"), _lm_batches(), **options)
    _assert_peft_factors(pm, cm)
    batch = _lm_batches(1)[0]
    torch.testing.assert_close(cm(**batch).logits, pm(**batch).logits)


@pytest.mark.slow
def test_lora_ga_on_gpt2_conv1d_matches_peft():
    pm, cm = _lora_ga_pair(ZOO["gpt2"].model, ("c_attn", "c_fc"), _lm_batches())
    _assert_peft_factors(pm, cm)


def test_lora_ga_needs_a_loss_and_leaves_the_model_as_it_was():
    model = ZOO["mlp"].model()
    spec = surgeon.LoRA(rank=2, targets=("body.3",), init="lora_ga")
    with pytest.raises(surgeon.SpecError, match=r"calibration batch 0 gives the model no loss"):
        surgeon.compile(model, spec, calibration=_mlp_batches(1))
    assert not model.training and all(
        p.requires_grad and p.grad is None for p in model.parameters()
    )


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"direction": "BA"}, r"lora_ga_config.direction='BA': expected one of 'ArBr'"),
        ({"scale": "big"}, r"lora_ga_config.scale='big': expected one of 'stable'"),
        ({"stable_gamma": 0}, r"lora_ga_config.stable_gamma=0: expected an integer > 0"),
    ],
)
def test_lora_ga_options_are_checked(config, match):
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.LoRA(init="lora_ga", init_config=config)


# -- MiCA ----------------------------------------------------------------------------------------


def _mica_pair(build, targets, rank=2):
    theirs, ours = _pair(build)
    config = peft.LoraConfig(
        r=rank, lora_alpha=4, target_modules=list(targets), init_lora_weights="mica"
    )
    pm = peft_model(theirs, config, seed=None)
    spec = surgeon.LoRA(rank=rank, alpha=4, targets=tuple(targets), init="mica")
    return pm, surgeon.compile(ours, spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mica_gives_peft_factors_and_trains_a_only(dtype):
    """B: W's minor left singular vectors, frozen; A: zero, the only factor that trains."""
    entry = ZOO["mlp"]
    pm, cm = _mica_pair(lambda: entry.model().to(dtype), entry.targets)
    _assert_peft_factors(pm, cm)
    for _, adapter in cm.store.items("default"):
        assert not adapter.lora_B.requires_grad and adapter.lora_A.requires_grad
        assert torch.count_nonzero(adapter.lora_A) == 0
    theirs = {n for n, p in pm.named_parameters() if p.requires_grad}
    ours = {n for n, p in cm.named_parameters() if p.requires_grad}
    assert len(ours) == len(theirs) == len(entry.targets)


@pytest.mark.slow
def test_mica_on_embeddings_and_gpt2_matches_peft_and_files_load_both_ways(tmp_path):
    entry = ZOO["gpt2"]
    pm, cm = _mica_pair(entry.model, ("c_attn", "wte"))
    _assert_peft_factors(pm, cm)
    add_noise(p for p in pm.parameters() if p.requires_grad)
    add_noise(p for p in cm.parameters() if p.requires_grad)
    pm.save_pretrained(tmp_path / "peft")
    cm.save_adapters(tmp_path / "ours")
    ids = entry.example()
    loaded = surgeon.load(entry.model(), tmp_path / "peft")
    assert not any(a.lora_B.requires_grad for _, a in loaded.store.items("default"))
    for out in (loaded(**ids), peft_loaded(entry.model(), tmp_path / "ours")(**ids), cm(**ids)):
        torch.testing.assert_close(out.logits, pm(**ids).logits)


def test_mica_refuses_convolutions_and_too_large_ranks():
    with pytest.raises(surgeon.SpecError, match=r"init='mica' supports Linear, Conv1D and Emb"):
        surgeon.compile(One(nn.Conv2d(3, 4, 3)), surgeon.LoRA(targets=("layer",), init="mica"))
    with pytest.raises(surgeon.SpecError, match=r"rank 6 is more than the 5 singular vectors"):
        surgeon.compile(ZOO["mlp"].model(), surgeon.LoRA(rank=6, targets=("head",), init="mica"))
