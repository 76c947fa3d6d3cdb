"""The model zoo: small custom models and transformers models built from tiny configs (no downloads).

Every builder is seeded and returns a fresh model in eval mode, so tests may mutate what they get.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Dropout(0.1), nn.Linear(24, 24))
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.seq = nn.Conv1d(8, 8, 3, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        h = self.seq(h.flatten(2))
        return self.fc(h.mean(-1))


class EmbeddingNet(nn.Module):
    """Token embeddings (with a padding index) pooled into a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.proj = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.emb(x))).mean(1)


class FunctionalDropoutMLP(nn.Module):
    """Bakes the training flag into an FX graph: must not be accepted as one region."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(self.fc1(x), p=0.5, training=self.training))


def gpt2_conv1d(fan_in: int = 5, fan_out: int = 6) -> nn.Module:
    """transformers' GPT-2 ``Conv1D`` (a Linear storing its weight in x out), with a random bias
    (its own init is zero, which would hide how a method treats the bias)."""
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(fan_out, fan_in)
    nn.init.normal_(layer.bias)
    return layer


class One(nn.Module):
    """Wraps one layer so it can be targeted by name."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class TwoLinear(nn.Module):
    """Two Linear layers, ``a`` (6 -> 6) and ``b`` (6 -> 4), with a tanh between them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


class QVPair(nn.Module):
    """Two projections named as attention's, ``q_proj`` (width -> 5) and ``v_proj`` (5 -> 4),
    with a tanh between them: a model for the LoRA experts that routed methods mix."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.q_proj = nn.Linear(width, 5)
        self.v_proj = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(torch.tanh(self.q_proj(x)))


def qv_pair(width: int = 6) -> QVPair:
    """A `QVPair` built under seed 0 (every call gives the same base)."""
    torch.manual_seed(0)
    return QVPair(width)


def write_lora_expert(folder: Any, seed: int, width: int = 6, **fields: Any) -> str:
    """A trained LoRA expert on `qv_pair` (both projections unless ``fields`` say otherwise;
    its parameters at random from ``seed``), saved in ``folder`` as surgeon saves (PEFT's
    layout); returns the folder."""
    import surgeon
    from surgeon.passes.lowrank.lora import LoRA

    cm = surgeon.compile(qv_pair(width), LoRA(**{"targets": ("q_proj", "v_proj"), **fields}))
    randomize(cm, seed=seed, scale=0.5)
    cm.save_adapters(folder)
    return str(folder)


class OptionalMaskBlock(nn.Module):
    """Branches on ``mask is None``: a Proxy is never None, so tracing would freeze one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            x = x * mask
        return self.proj(x)


def tiny_llama(hidden_size: int = 32, intermediate_size: int = 48) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def llama64() -> nn.Module:
    """A tiny Llama (eval mode) whose linear layers take 64 or 128 inputs: bitsandbytes' CPU
    dequantizer is only right for rows that are whole blocks (see tests/test_quant.py)."""
    torch.manual_seed(0)
    return tiny_llama(hidden_size=64, intermediate_size=128).eval()


def bnb_llama(state: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> nn.Module:
    """`llama64` with ``state`` and bitsandbytes' NF4 ``Linear4bit`` layers (blocks of 64,
    double quantization) for every linear layer but lm_head, marked as PEFT reads a model
    loaded in 4 bits."""
    import bitsandbytes as bnb

    model = llama64()
    model.load_state_dict(state)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and name != "lm_head":
                layer = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    quant_type="nf4",
                    compress_statistics=True,
                )
                layer.weight = bnb.nn.Params4bit(
                    child.weight.data.clone(),
                    requires_grad=False,
                    blocksize=64,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                # bitsandbytes' eval-mode CPU path (AVX512-BF16 machines) repacks the weight and
                # computes in bfloat16; compare with its exact path
                layer.support_avx512bf16_for_cpu = False
                setattr(module, name, layer.to("cpu"))  # quantizes
    model.is_loaded_in_4bit = True  # what PEFT reads to pick its bitsandbytes LoRA layer
    return model


def assert_lora_a_grads_match_peft(cm, pm, ids: torch.Tensor) -> None:
    """One language-model loss on ``ids`` through surgeon's ``cm`` and PEFT's ``pm`` (both
    switched to training mode): each adapted layer's ``lora_A`` gets PEFT's gradient."""
    pm.train()
    cm.train()
    pm(input_ids=ids, labels=ids).loss.backward()
    cm(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    for path, layer in cm.store.items("default"):
        expected = grads[f"base_model.model.{path}.lora_A.default.weight"]
        torch.testing.assert_close(layer.lora_A.grad, expected, rtol=1e-4, atol=1e-6)


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=96,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(config)


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class TracingAttention(nn.Module):
    """Llama-style attention (rotary, grouped-query) written so that it traces: keys and values
    go through the cache's ``update`` and into F.scaled_dot_product_attention (or, ``eager``,
    matmul-softmax-matmul) as traced values."""

    def __init__(self, dim: int, heads: int, kv_heads: int, layer_idx: int, eager: bool) -> None:
        super().__init__()
        self.eager = eager
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        batch, length = x.shape[0], x.shape[1]
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        half = self.head_dim // 2
        q, k = _rotate(q, cos, sin, half), _rotate(k, cos, sin, half)
        kv = cache.update(k, v, self.layer_idx)
        groups = self.heads // self.kv_heads
        k = kv[0].repeat_interleave(groups, dim=1)
        v = kv[1].repeat_interleave(groups, dim=1)
        if self.eager:
            scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim**-0.5 + mask
            out = torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class TracingDecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, layer_idx: int, eager: bool) -> None:
        super().__init__()
        self.input_norm = RMSNorm(dim)
        self.attn = TracingAttention(dim, heads, kv_heads, layer_idx, eager)
        self.post_norm = RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.input_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_norm(x))


class TracingDecoder(nn.Module):
    """A tiny decoder whose attention regions trace (HF attention is a graph break today), with
    a transformers-style call: input_ids or inputs_embeds, attention_mask, position_ids,
    past_key_values (a transformers Cache), labels."""

    def __init__(
        self, vocab: int = 96, dim: int = 32, layers: int = 2, heads: int = 4, eager: bool = False
    ) -> None:
        super().__init__()
        from transformers import PretrainedConfig

        kv_heads = heads // 2
        self.config = PretrainedConfig(
            num_hidden_layers=layers,
            hidden_size=dim,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=vocab,
        )
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            TracingDecoderLayer(dim, heads, kv_heads, i, eager) for i in range(layers)
        )
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.head_dim = dim // heads

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=False,
    ):
        from transformers import DynamicCache
        from transformers.modeling_outputs import CausalLMOutputWithPast

        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        length = x.shape[1]
        cache = past_key_values if past_key_values is not None else DynamicCache()
        past = cache.get_seq_length()
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=x.device).unsqueeze(0)
        freq = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2, device=x.device) / self.head_dim)
        angles = position_ids[..., None].float() * freq
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        keys = torch.arange(past + length, device=x.device)
        queries = torch.arange(past, past + length, device=x.device)
        allowed = (keys[None, :] <= queries[:, None])[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~allowed, torch.finfo(x.dtype).min)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)


def tiny_traced_decoder(eager: bool = False) -> nn.Module:
    """Attention by F.scaled_dot_product_attention, or (``eager``) by matmul and softmax. Built
    seeded by the caller; kept out of ZOO so the other methods' zoo-wide tests do not grow
    (prompt methods use it for their graph route)."""
    return TracingDecoder(eager=eager)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    targets: tuple[str, ...]
    hf: bool = False

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def example(self, seed: int = 1) -> dict[str, Any]:
        torch.manual_seed(seed)
        return self.inputs()


def _ids() -> dict[str, Any]:
    return {"input_ids": torch.randint(3, 96, (2, 7))}


ZOO = {
    e.name: e
    for e in [
        ZooEntry("mlp", MLP, lambda: {"x": torch.randn(4, 12)}, ("body.0", "body.3", "head")),
        ZooEntry(
            "cnn", CNN, lambda: {"x": torch.randn(2, 3, 6, 6)}, ("conv1", "conv2", "seq", "fc")
        ),
        ZooEntry(
            "llama", tiny_llama, _ids, ("q_proj", "v_proj", "down_proj", "embed_tokens"), hf=True
        ),
        ZooEntry("gpt2", tiny_gpt2, _ids, ("c_attn", "c_fc", "wte"), hf=True),
        ZooEntry("bert", tiny_bert, _ids, ("query", "value", "dense"), hf=True),
    ]
}


EMBEDDING = ZooEntry(
    "embedding", EmbeddingNet, lambda: {"x": torch.randint(0, 20, (3, 5))}, ("emb", "proj")
)
"""An embedding model for the conformance suite; kept out of ZOO so zoo-wide tests do not grow."""


def tiny_family(name: str) -> nn.Module:
    """A tiny model of another transformers family (the zoo's Llama, GPT-2 and BERT aside), by
    its name in `FAMILIES`; seeded by the caller."""
    import transformers as T

    common = {"vocab_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}
    decoder = {**common, "hidden_size": 32, "intermediate_size": 48}
    seq2seq = {"vocab_size": 96, "max_position_embeddings": 64}
    builders: dict[str, Callable[[], nn.Module]] = {
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**decoder, num_key_value_heads=2)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**decoder, num_key_value_heads=2)),
        "gemma": lambda: T.GemmaForCausalLM(
            T.GemmaConfig(**decoder, num_key_value_heads=2, head_dim=8)
        ),
        "phi": lambda: T.PhiForCausalLM(T.PhiConfig(**decoder)),
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**decoder)),
        "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(**common, hidden_size=32)),
        "opt": lambda: T.OPTForCausalLM(
            T.OPTConfig(**common, hidden_size=32, ffn_dim=48, word_embed_proj_dim=32)
        ),
        "roberta": lambda: T.RobertaForSequenceClassification(
            T.RobertaConfig(**decoder, num_labels=3, max_position_embeddings=64)
        ),
        "distilbert": lambda: T.DistilBertForSequenceClassification(
            T.DistilBertConfig(
                vocab_size=96, dim=32, n_layers=2, n_heads=4, hidden_dim=48, num_labels=3
            )
        ),
        "t5": lambda: T.T5ForConditionalGeneration(
            T.T5Config(
                vocab_size=96,
                d_model=32,
                d_kv=8,
                d_ff=48,
                num_layers=2,
                num_heads=4,
                decoder_start_token_id=0,
            )
        ),
        "bart": lambda: T.BartForConditionalGeneration(
            T.BartConfig(
                **seq2seq,
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=48,
                decoder_ffn_dim=48,
            )
        ),
    }
    return builders[name]()


FAMILIES = ("mistral", "qwen2", "gemma", "phi", "gpt_neox", "falcon", "opt", "roberta",
            "distilbert", "t5", "bart")  # fmt: skip


def padded_ids(batch: int = 2, length: int = 6, padded: bool = True) -> dict[str, torch.Tensor]:
    """Seeded token ids and their mask; ``padded`` left-pads the last row by two tokens."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[-1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(out: Any) -> torch.Tensor:
    """The main output tensor of any zoo model."""
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


def plain_output(
    layer: nn.Module, x: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """What ``layer`` computes (with ``weight`` instead of its own, if given), written out from
    its parameters: formulas use this rather than calling a layer surgeon may have rewritten."""
    weight = layer.weight if weight is None else weight
    bias = getattr(layer, "bias", None)
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, nn.Embedding):
        return F.embedding(x, weight, layer.padding_idx)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
        return conv(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return x @ weight + bias  # GPT-2's Conv1D: weight (in, out)


def lora_product(
    layer: nn.Module, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """LoRA's unscaled ``B(A(x))`` on ``layer``'s kind, written out from factors in PEFT's
    shapes: an embedding looks A up, a convolution's A convolves like the layer and B mixes
    channels, any other layer multiplies by A then B."""
    if isinstance(layer, nn.Embedding):
        return F.embedding(x, a.t()) @ b.t()
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        conv = (F.conv1d, F.conv2d, F.conv3d)[a.dim() - 3]
        return conv(conv(x, a, None, layer.stride, layer.padding), b)
    return x @ a.t() @ b.t()


def prefix_cache(model: nn.Module, adapter: Any, batch: int) -> dict[str, Any]:
    """Keyword arguments that hand a prefix adapter's keys and values to ``model`` as its
    key/value cache, read from the adapter's PEFT tensor (``(tokens, layers * 2 * heads *
    head_dim)``, PEFT's layout), with the attention mask over prefix and tokens."""
    import inspect

    from transformers import DynamicCache

    flat = adapter.peft_tensors_to_save()["prompt_embeddings"]
    shape = adapter.shape
    n = flat.shape[0]
    per_layer = flat.view(n, shape.num_layers * 2, shape.heads, shape.head_dim).permute(1, 2, 0, 3)
    cache = DynamicCache(config=model.config)
    for layer in range(shape.num_layers):
        key, value = (
            t.unsqueeze(0).expand(batch, -1, -1, -1) for t in per_layer[2 * layer : 2 * layer + 2]
        )
        cache.update(key, value, layer)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def prefix_formula(spec: Any, adapter: Any, model: nn.Module, inputs: dict[str, Any]) -> Any:
    """Prefix tuning's formula (Li & Liang, 2021), P-tuning v2's too: every layer's attention
    also attends to learned keys and values before the real tokens, i.e. the model run with them
    as its key/value cache (as PEFT does)."""
    ids = inputs["input_ids"]
    return model(**prefix_cache(model, adapter, ids.shape[0]), input_ids=ids)


def load_with_changed_config(model: nn.Module, folder: Any, change: dict[str, Any]) -> Any:
    """Load the adapter saved in ``folder`` after changing fields of its adapter_config.json."""
    import json

    import surgeon

    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    return surgeon.load(model, folder)


def resume_config(**changes: Any) -> Any:
    """A short constant-rate run (4 steps of 2 samples) for checking exact resumption."""
    import surgeon

    fields = dict(
        learning_rate=1e-2,
        batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=4,
        warmup_steps=0,
        lr_scheduler="constant",
        progress=False,
        distributed="none",
    )
    return surgeon.TrainingConfig(**{**fields, **changes})


def train_and_resume(
    whole: Any,
    compiled: Callable[[int], Any],
    data: Any,
    config: Any,
    tmp_path: Any,
    start: int = 2,
    loss_fn: Callable | None = F.mse_loss,
) -> tuple[Any, Any]:
    """Train ``whole`` (the caller built it as ``compiled(start)``) through ``config``; stop
    another ``compiled(start)`` halfway with a checkpoint and resume it into ``compiled(9)`` (other
    values: the checkpoint must restore them all). The resumed run must give the uninterrupted
    run's losses and trained tensors bit for bit. Returns the uninterrupted run's result and the
    resumed model."""
    import surgeon
    from surgeon.train import trained_parameters

    expected = surgeon.train(whole, data, config, loss_fn=loss_fn)
    run = tmp_path / "run"
    halfway = config.replace(max_steps=config.max_steps // 2, output_dir=str(run))
    surgeon.train(compiled(start), data, halfway, loss_fn=loss_fn)
    fresh = compiled(9)
    resumed = config.replace(output_dir=str(run))
    result = surgeon.train(fresh, data, resumed, resume_from=run, loss_fn=loss_fn)
    assert result.losses == expected.losses
    mine, theirs = trained_parameters(fresh), trained_parameters(whole)
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
    return expected, fresh


def mlp_without_dropout() -> nn.Module:
    """The zoo MLP with its dropout off: outputs and runs differ only by the adapter."""
    model = ZOO["mlp"].model()
    model.body[2].p = 0.0
    return model


def mlp_samples(count: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` distinct seeded (input, target) pairs for the zoo MLP (12 -> 5 features)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(12, generator=generator), torch.randn(5, generator=generator))
        for _ in range(count)
    ]


def trained_and_moved(cm: Any, before: dict[str, torch.Tensor]) -> tuple[set[str], set[str]]:
    """The adapters' trained parameters of ``cm`` (store names), and those that differ from
    ``before`` (`Resumed.before`)."""
    trained = {n for n, p in cm.store.named_parameters() if p.requires_grad}
    moved = {n for n in trained if not torch.equal(cm.store.get_parameter(n), before[n])}
    return trained, moved


class Resumed(NamedTuple):
    """What `train_and_resume_spec` ran: the uninterrupted run's result, its model after it,
    the resumed model, and the adapters' state (parameters and buffers) before training."""

    expected: Any
    whole: Any
    fresh: Any
    before: dict[str, torch.Tensor]


def train_and_resume_spec(
    spec: Any,
    make_model: Callable[[], nn.Module],
    tmp_path: Any,
    sizes: tuple[int, int] = (6, 4),
    data: Any = None,
    config: Any = None,
) -> Resumed:
    """`train_and_resume` for ``spec`` on ``make_model()`` (built under seed 0, the adapter's
    parameters randomised); the adapters' buffers must resume bit for bit too (a method's state
    outside its parameters, such as an accumulated delta). By default the run is six copies of
    one sample of ``sizes`` (in, out) features, not shuffled (`resume_config`)."""
    import surgeon

    if data is None:
        generator = torch.Generator().manual_seed(4)
        fan_in, fan_out = sizes
        sample = (
            torch.randn(fan_in, generator=generator),
            torch.randn(fan_out, generator=generator),
        )
        data = [sample] * 6

    def compiled(seed: int) -> Any:
        torch.manual_seed(0)
        cm = surgeon.compile(make_model(), spec)
        randomize(cm, seed=seed, scale=0.5)
        return cm

    whole = compiled(2)
    before = {n: t.detach().clone() for n, t in whole.store.state_dict().items()}
    config = resume_config(shuffle=False) if config is None else config
    expected, fresh = train_and_resume(whole, compiled, data, config, tmp_path)
    theirs = dict(whole.store.named_buffers())
    for name, value in fresh.store.named_buffers():
        assert torch.equal(value, theirs[name]), name
    return Resumed(expected, whole, fresh, before)


def train_a_few_steps(cm: Any, inputs: dict[str, Any], lr: float, steps: int = 4) -> list[float]:
    """Adam on the compiled model's trainable parameters, the model's own loss (labels: the
    input ids); returns the losses, after checking that no base parameter moved."""
    base = {n: p.detach().clone() for n, p in cm.model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in cm.parameters() if p.requires_grad], lr=lr)
    cm.train()
    losses = []
    for _ in range(steps):
        loss = cm(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    for n, p in cm.model.named_parameters():
        assert torch.equal(p, base[n]), n
    return losses


def randomize(cm: Any, seed: int = 2, scale: float = 0.1) -> None:
    """Give every adapter parameter random values, so adapters change outputs (B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cm.store.parameters():
            p.copy_(
                torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * scale
            )


def graph_code(cm: Any, path: str = "") -> str:
    """The code of the graph of region ``path`` (the whole model: ``""``) without its header
    line, for comparing with a golden graph."""
    return cm.graph.code(path).split("\n", 1)[1].strip()


def count_calls(monkeypatch: Any, owner: Any, name: str) -> list:
    """Patch ``owner.name`` (a class's method or an object's callable) to record each call in
    the returned list and then run as before: how often a cached value is really built."""
    calls: list = []
    original = getattr(owner, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def add_noise(params: Iterable[torch.Tensor], seed: int = 2, scale: float = 0.2) -> None:
    """Add seeded Gaussian noise to ``params``, drawn in float32 in the order given and cast to
    each one's dtype: a fresh adapter often computes nothing (B = 0) and would hide bugs, and
    adding (not replacing) keeps values that must stay near one (IA³'s scales, DoRA's
    magnitude) there. The defaults are the conformance suite's."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32) * scale
            p.add_(noise.to(p.dtype))


def peft_model(
    model: nn.Module, config: Any, seed: int | None = 5, scale: float = 0.3, **kwargs: Any
) -> Any:
    """PEFT's model of ``model`` for the PEFT ``config`` (``kwargs`` go to ``get_peft_model``),
    in eval mode, its trainable parameters moved off their init by `add_noise` (none with
    ``seed`` None): the other side of a parity check."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notices about the config it was given
        pm = peft.get_peft_model(model, config, **kwargs)
    if seed is not None:
        add_noise((p for p in pm.parameters() if p.requires_grad), seed, scale)
    return pm.eval()


def peft_loaded(model: nn.Module, path: Any, **kwargs: Any) -> Any:
    """The adapter saved in ``path`` loaded by PEFT onto ``model`` (``kwargs`` go to
    ``PeftModel.from_pretrained``), in eval mode, PEFT's notices silenced."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(model, path, **kwargs).eval()


TEMPERATURE = (
    0.1  # tiny random models are nearly uniform: sharpen them so samples tell models apart
)


def decode_without_cache(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    steps: int,
    sample: bool,
    **call_arguments: Any,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """What `generate` computes, run as full forwards without a key/value cache: the oracle for
    cached generation. Returns the sequences and each step's logits; sampling draws from the
    global RNG as transformers does. ``call_arguments`` go to every call (``task_ids``)."""
    eos = model.config.eos_token_id
    ids, mask, step_logits = input_ids, attention_mask, []
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # generate's positions for padded rows
        with torch.no_grad():
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=False,
                **call_arguments,
            )
        step_logits.append(out.logits[:, -1].float())
        scores = step_logits[-1].clone()
        scores[:, eos] = -float("inf")  # min_new_tokens keeps end-of-sequence out
        if sample:
            token = torch.multinomial(torch.softmax(scores / TEMPERATURE, dim=-1), num_samples=1)
        else:
            token = scores.argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return ids, step_logits


def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    steps: int,
    sample: bool,
    **call_arguments: Any,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``generate`` (with its key/value cache) set up as `decode_without_cache` mirrors it."""
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=sample,
            top_k=0,  # no filtering: every token keeps its probability
            top_p=1.0,
            temperature=TEMPERATURE,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
            **call_arguments,
        )
    return out.sequences, [step.float() for step in out.logits]


def assert_same_generation(got: tuple, expected: tuple) -> None:
    assert torch.equal(got[0], expected[0]), (got[0], expected[0])
    for step, (a, b) in enumerate(zip(got[1], expected[1])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")
