"""What users meet on their terminal: surgeon's own lines, not torch's expected noise, and cached
calls that pass the key/value cache by the name the model's forward takes."""

import copy
import logging
import sys
import warnings

import pytest
import torch
from zoo import ZOO, assert_same_generation, generate, padded_ids, randomize, tiny_gpt2, tiny_llama

import surgeon
from surgeon.logs import Expected, expected_noise

NOISY = Expected(
    records=(("torch.surgeon_test_source", r"^expected"),),
    warnings=((FutureWarning, r"torch's own deprecation"),),
)


def torch_logs_to_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's log handlers write to the stderr of the moment torch was imported (pytest's own
    capture by then): point them at the current one, as in a user's script. Call it from the
    test itself: the stderr of a fixture's set-up is closed by the time the test runs."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("torch") and isinstance(logger, logging.Logger):
            for handler in logger.handlers:
                if type(handler) is logging.StreamHandler:
                    monkeypatch.setattr(handler, "stream", sys.stderr)


@pytest.fixture
def surgeon_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="surgeon")
    return caplog


# -- the helper -------------------------------------------------------------------------------


def test_expected_warnings_go_to_surgeons_debug_log_even_where_warnings_are_errors(
    surgeon_debug,
):
    log = logging.getLogger("surgeon.test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("error")
        filters = list(warnings.filters)
        with expected_noise(NOISY, log):
            warnings.warn("torch's own deprecation of something", FutureWarning, stacklevel=1)
        assert warnings.filters == filters  # the user's filters, as they were
    assert caught == []
    records = [r for r in surgeon_debug.records if r.name == "surgeon.test"]
    assert [r.levelno for r in records] == [logging.DEBUG]
    assert "FutureWarning: torch's own deprecation of something" in records[0].getMessage()


def test_a_warning_surgeon_does_not_expect_still_reaches_the_user():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with expected_noise(NOISY, logging.getLogger("surgeon.test")):
            warnings.warn("torch's own deprecation", UserWarning, stacklevel=1)  # another kind
            warnings.warn("a real problem", FutureWarning, stacklevel=1)
    assert [(w.category, str(w.message)) for w in caught] == [
        (UserWarning, "torch's own deprecation"),
        (FutureWarning, "a real problem"),
    ]
    assert caught[0].filename == __file__  # where it was raised, not where it was passed on


def test_expected_records_leave_torchs_handlers_for_surgeons_debug_log(surgeon_debug):
    source = logging.getLogger("torch.surgeon_test_source")
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    source.addHandler(handler)
    try:
        with pytest.raises(RuntimeError), expected_noise(NOISY, logging.getLogger("surgeon.t")):
            source.error("expected: a refused trace")
            source.error("unexpected: a real problem")
            raise RuntimeError("the block fails")
        source.error("expected, but after the block")
    finally:
        source.removeHandler(handler)
    assert [r.getMessage() for r in seen] == [
        "unexpected: a real problem",
        "expected, but after the block",
    ]
    debug = [r.getMessage() for r in surgeon_debug.records if r.name == "surgeon.t"]
    assert debug == ["torch.surgeon_test_source: expected: a refused trace"]


# -- mixture-of-experts models ----------------------------------------------------------------


def tiny_mixtral(layers: int = 1) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(num_local_experts=4, **_tiny_decoder(layers)))


def tiny_qwen3_moe(layers: int = 1) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        num_experts=4, moe_intermediate_size=16, head_dim=8, **_tiny_decoder(layers)
    )
    return Qwen3MoeForCausalLM(config)


def tiny_gpt_oss(layers: int = 1) -> torch.nn.Module:
    from transformers import GptOssConfig, GptOssForCausalLM

    decoder = {**_tiny_decoder(layers), "intermediate_size": 16}
    rope = {"rope_type": "default", "rope_theta": 10000.0}  # its YaRN default wants 4k positions
    config = GptOssConfig(num_local_experts=4, head_dim=8, rope_parameters=rope, **decoder)
    return GptOssForCausalLM(config)


def _tiny_decoder(layers: int = 1) -> dict:
    return dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def _moe_cases() -> list:
    """Each model in float32 and bfloat16; two of them in the default lane."""
    fast = {("tiny_mixtral", "fp32"), ("tiny_gpt_oss", "bf16")}
    return [
        pytest.param(
            build,
            dtype,
            id=f"{build.__name__}-{name}",
            marks=() if (build.__name__, name) in fast else pytest.mark.slow,
        )
        for build in (tiny_mixtral, tiny_qwen3_moe, tiny_gpt_oss)
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    ]


@pytest.mark.parametrize("build, dtype", _moe_cases())
def test_a_mixture_of_experts_traces_whole_and_quietly(build, dtype, capfd, monkeypatch):
    """transformers' experts multiply by ``torch._grouped_mm`` in the model's dtype, which
    torch's fake implementation refused outside bf16: the whole model is one graph now."""
    torch_logs_to_stderr(monkeypatch)
    torch.manual_seed(0)
    model = build().to(dtype).eval()
    cm = surgeon.compile(model, surgeon.LoRA(rank=4, targets=("q_proj", "v_proj")))
    inputs = padded_ids(batch=2, length=5)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm(**inputs)
        report = cm.inspect()
        cm.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert capfd.readouterr().err == ""
    assert [str(w.message) for w in caught] == []
    assert "regions: 1 (1.0 per decoder layer; 1 specialised at call time)" in report.summary()
    assert [region.path for region in cm.graph.live()] == [""]
    assert cm.inspect().refused == []  # generation's kinds of calls traced too


def test_a_refused_trace_of_a_mixture_of_experts_writes_nothing_to_stderr(
    capfd, monkeypatch, surgeon_debug
):
    """With torch's own fake ``_grouped_mm`` (bf16 only) every float32 trace is refused: the
    reason goes to ``breaks_table()``, torch's logs about it to surgeon's debug log."""
    from surgeon import specialise

    monkeypatch.setattr(specialise, "_FAKE_KERNELS", {})
    monkeypatch.setattr(specialise, "_SHARED", {})  # no variant traced by another test
    torch_logs_to_stderr(monkeypatch)
    torch.manual_seed(0)
    cm = surgeon.compile(tiny_mixtral().eval(), surgeon.LoRA(rank=4, targets=("q_proj", "v_proj")))
    inputs = padded_ids(batch=2, length=5, padded=False)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm(**inputs)
        cm.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert capfd.readouterr().err == ""
    assert [str(w.message) for w in caught] == []
    refused = cm.inspect().breaks_table()
    assert "runs its own forward" in refused and "_grouped_mm" in refused, refused
    debug = [r for r in surgeon_debug.records if r.name == "surgeon.specialise"]
    assert debug and all(r.levelno == logging.DEBUG for r in debug)
    assert "torch._subclasses.fake_tensor" in debug[0].getMessage()


# -- the cache argument -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, targets", [(tiny_llama, ("q_proj", "v_proj")), (tiny_gpt2, ("c_attn",))]
)
def test_cached_generation_passes_the_cache_by_the_name_the_forward_takes(build, targets):
    torch.manual_seed(0)
    cm = surgeon.compile(build().eval(), surgeon.LoRA(rank=4, targets=targets))
    randomize(cm)
    inputs = padded_ids(batch=2, length=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", FutureWarning)  # transformers' deprecations
        got = generate(cm, inputs["input_ids"], inputs["attention_mask"], steps=4, sample=False)
    assert [str(w.message) for w in caught if "past_key_values" in str(w.message)] == []
    merged = cm.merge_and_unload()
    expected = generate(merged, inputs["input_ids"], inputs["attention_mask"], 4, sample=False)
    assert_same_generation(got, expected)


def test_a_cache_passed_by_its_deprecated_name_reaches_the_forward_under_its_new_name():
    """One notice of the deprecated name (transformers' own would come from every region the
    call passes through), and the same result as passing ``cache``."""
    cm = surgeon.compile(ZOO["llama"].model(), surgeon.LoRA(rank=4))
    randomize(cm)
    inputs = padded_ids(batch=2, length=5, padded=False)
    step = {"input_ids": torch.tensor([[7], [9]])}
    with torch.no_grad():
        cache = cm(**inputs, use_cache=True).cache
        expected = cm(**step, cache=copy.deepcopy(cache)).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = cm(**step, past_key_values=cache).logits
    notices = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert notices == [
        "`past_key_values` is deprecated for LlamaForCausalLM.forward, which takes `cache`: "
        "pass `cache=` (surgeon passed it on as `cache`)"
    ]
    assert cache.get_seq_length() == 6
    torch.testing.assert_close(got, expected)


# -- the export -------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_onnx_shows_none_of_what_torch_says_that_surgeon_expects(
    tmp_path, capfd, monkeypatch
):
    pytest.importorskip("onnxruntime")
    torch_logs_to_stderr(monkeypatch)
    cm = surgeon.compile(ZOO["bert"].model(), surgeon.LoRA(rank=4, targets=("query", "value")))
    inputs = padded_ids(batch=2, length=5)  # two inputs whose axes carry the same names
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        surgeon.export_onnx(cm, tmp_path / "m.onnx", inputs)
    assert [str(w.message) for w in caught] == []
    assert capfd.readouterr().err == ""
