"""`surgeon.from_pretrained`: checkpoints streamed into 4 bits, with the peak memory measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from zoo import ZOO, logits

import surgeon
from surgeon import quant

pytest.importorskip("transformers")

FP32 = surgeon.NF4(compute_dtype="float32")


def _ids():
    return torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def llama_dir(tmp_path):
    ZOO["llama"].model().save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_qlora_checkpoint_loads_as_compiling_the_model_would(llama_dir):
    cm = surgeon.from_pretrained(llama_dir, surgeon.QLoRA(quant=FP32))
    assert isinstance(cm, surgeon.CompiledModel) and cm.adapters == ["default"]
    reference = surgeon.compile(ZOO["llama"].model(), surgeon.QLoRA(quant=FP32))
    for (_, ours), (_, theirs) in zip(cm.store.items("default"), reference.store.items("default")):
        with torch.no_grad():
            ours.lora_A.copy_(theirs.lora_A)
    loaded = dict(cm.model.named_modules())
    for path, layer in reference.model.named_modules():
        if quant.is_quantized(layer):
            assert torch.equal(loaded[path].weight, layer.weight), path
            assert torch.equal(loaded[path].absmax, layer.absmax), path
    with torch.no_grad():
        torch.testing.assert_close(
            cm(input_ids=_ids()).logits, reference(input_ids=_ids()).logits, rtol=0, atol=0
        )
    assert cm.model.lm_head.weight.dtype == torch.float32  # dtype defaults to the compute dtype


def test_default_dtype_is_the_compute_dtype(llama_dir):
    model = surgeon.from_pretrained(llama_dir, surgeon.NF4())
    assert not isinstance(model, surgeon.CompiledModel)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.weight_dtype == torch.bfloat16
    assert quant.is_quantized(model.model.layers[0].mlp.up_proj)
    assert not quant.is_quantized(model.lm_head)
    model = surgeon.from_pretrained(llama_dir, surgeon.NF4(), dtype="float32")
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_full_precision_and_sharded_gpt2_with_tied_head(tmp_path):
    original = ZOO["gpt2"].model()
    original.save_pretrained(tmp_path / "gpt2", max_shard_size="40KB")
    assert (tmp_path / "gpt2" / "model.safetensors.index.json").exists()
    full = surgeon.from_pretrained(tmp_path / "gpt2")
    with torch.no_grad():
        torch.testing.assert_close(
            full(input_ids=_ids()).logits, original(input_ids=_ids()).logits, rtol=0, atol=0
        )
    model = surgeon.from_pretrained(tmp_path / "gpt2", FP32)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied again
    reference = ZOO["gpt2"].model()
    paths = quant.quantize_model(reference, FP32)
    assert "transformer.h.0.attn.c_attn" in paths  # GPT-2's Conv1D, stored as [out, in]
    for path in paths:
        assert torch.equal(model.get_submodule(path).weight, reference.get_submodule(path).weight)
    with torch.no_grad():
        torch.testing.assert_close(
            logits(model(input_ids=_ids())), logits(reference(input_ids=_ids())), rtol=0, atol=0
        )


def test_a_4bit_model_plus_a_saved_adapter_is_the_qlora_model(llama_dir, tmp_path):
    cm = surgeon.from_pretrained(llama_dir, surgeon.QLoRA(quant=FP32))
    with torch.no_grad():
        for p in cm.store.parameters():
            p.normal_(0, 0.1)
        expected = cm(input_ids=_ids()).logits
    cm.save_adapters(tmp_path / "adapter")
    reloaded = surgeon.load(surgeon.from_pretrained(llama_dir, FP32), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=_ids()).logits, expected, rtol=0, atol=0)


def test_bad_folders_and_checkpoints_are_refused(tmp_path, llama_dir):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        surgeon.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(surgeon.SpecError, match=r"no config\.json"):
        surgeon.from_pretrained(tmp_path / "empty")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((llama_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(surgeon.SpecError, match="never unpickles"):
        surgeon.from_pretrained(pickled)
    config = json.loads((llama_dir / "config.json").read_text())
    config["intermediate_size"] = 40
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(surgeon.SpecError, match=r"mlp\.(gate|up|down)_proj\.weight has shape"):
        surgeon.from_pretrained(llama_dir, FP32)
    with pytest.raises(surgeon.SpecError, match="dtype='int8'"):
        surgeon.from_pretrained(llama_dir, dtype="int8")


def test_missing_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    ZOO["llama"].model().save_pretrained(tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["model.norm.weight"]
    tensors["model.extra.weight"] = torch.ones(2)
    save_file(tensors, str(file), metadata={"format": "pt"})
    with (
        pytest.warns(UserWarning, match=r"match nothing in the model.*model\.extra\.weight"),
        pytest.raises(surgeon.SpecError, match=r"lacks 1 tensor.*model\.norm\.weight"),
    ):
        surgeon.from_pretrained(tmp_path / "m", FP32)


# -- peak memory -----------------------------------------------------------------------------------

PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys, gc
    import torch, surgeon

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024

    big, warm = sys.argv[1], sys.argv[2]
    surgeon.from_pretrained(warm, surgeon.NF4())  # imports and code paths, not measured
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size to the current one
    before = status("VmRSS")
    model = surgeon.from_pretrained(big, surgeon.NF4())
    peak = status("VmHWM") - before
    tensors = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(json.dumps({"peak": peak, "model": tensors}))
    """
)


def _llama_checkpoint(path, hidden, layers, intermediate, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return model


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_memory_is_one_full_precision_tensor_plus_the_4bit_model(tmp_path):
    """Measured as the resident set size's peak in a fresh process (/proc VmHWM, reset before the
    load), with glibc returning large blocks to the system at once (fixed mmap threshold), so
    freed tensors do not linger as resident heap."""
    # weights larger than the quantizer's chunks, as in real models (there its temporaries stay
    # a fixed few MiB while the tensor read grows)
    big = _llama_checkpoint(tmp_path / "big", 1024, 2, 3072, 256)
    largest = max(p.numel() * 4 for p in big.parameters())  # float32 in the file
    layer = sum(p.numel() * 4 for p in big.model.layers[0].parameters())
    full = sum(p.numel() * 4 for p in big.parameters())
    del big
    _llama_checkpoint(tmp_path / "warm", 64, 1, 128, 256)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "big"), str(tmp_path / "warm")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    peak, model = result["peak"], result["model"]
    print(
        f"from_pretrained peak {peak / 2**20:.1f} MiB: 4-bit model {model / 2**20:.1f} MiB, "
        f"largest tensor {largest / 2**20:.1f} MiB, one decoder layer {layer / 2**20:.1f} MiB, "
        f"whole model in float32 {full / 2**20:.1f} MiB"
    )
    assert peak <= model + layer  # about one full-precision layer on top of the 4-bit model
    # the tensor read (float32) and its cast, or the cast and the quantizer's chunk temporaries
    assert peak <= model + largest + 16 * quant.CHUNK + 2 * 2**20
    assert peak < 0.6 * (full / 2)  # well below the unquantized model in bfloat16 alone
