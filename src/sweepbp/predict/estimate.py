"""A closed-form cross-check of the trace-based prediction: memory of a Llama-style decoder with LoRA.

No tracing, no model: only the HF config fields. It states, term by term, where the memory of a LoRA
step goes, and is reported beside the traced prediction as `formula_*` metrics. It is not exact;
docs/predict.md lists what it leaves out and how far it lands from the trace. The symbols:

  T tokens per step (batch x seq_len), L layers, h hidden size, i MLP size, V vocabulary,
  q = heads x head_dim, kv = kv_heads x head_dim, r LoRA rank,
  s bytes per activation element (the weights' dtype), a bytes per adapter element (peft keeps
  the adapters of a 16-bit model in fp32; bf16-true precision casts everything to 2 bytes).

Weights W: embeddings V*h, lm_head V*h (unless tied), per layer h*q + 2*h*kv + q*h + 3*h*i + 2*h, a
final norm h; times s. Adapter A: r*(in + out) per adapted linear, times a. Gradients A, AdamW 2A.
Per token and layer, saved for the backward (`layer_bytes_per_token`); the loss transient
(`loss_terms`, per `loss` option, with u = 4 when the logits are upcast to fp32 and 0 when s is already 4,
c = loss.chunks):

  standard: forward (s + u + 4) V T (logits, their fp32 copy, the fp32 log-softmax kept for the backward);
            peak max(forward, 12 V T) (at the backward's start: the log-softmax, its gradient in and out)
  chunked:  forward (s + 4) V T + u V T / c (the logits whole, every slice's log-softmax, one slice's copy);
            peak (s + 4) V T + 8 V T / c (the logits' gradient whole, one slice's fp32 gradients)
  fused:    peak 12 V T / c + s h T (one chunk's fp32 log-softmax and gradients, computed in the forward,
            and the hidden states' gradient that waits for the backward); inference (s + u + 4) V T / c

  none:  peak = W + 4A + L * layer * T + loss peak
  ckpt:  peak = W + 4A + (n * s * h + (L - n) * layer) * T + max(loss peak, layer * T),  n = checkpointed layers
  activations (the peak of what the decoder layers keep) = the saved part above (+ layer * T under ckpt:
  the one layer recomputed in the backward)
  logits (the loss's own peak) = loss peak
  inference peak = W + A + the loss's forward without gradients (standard: forward, chunked: s V T + (u + 4) V T / c)

The peak is taken where the backward starts (all saved activations, the loss gradients, the adapter,
its gradient buffer's worth: 4A for weights, gradients, two AdamW moments), or under ckpt where a
recomputed layer exceeds the loss transient (a fused loss makes that the usual case).

Other memory strategies, loss=liger, quantised weights (quant), DoRA and full fine-tuning (method),
optimizers other than AdamW, and models whose adapted layers are not these seven linears (GPT-2's Conv1D, a
fused qkv_proj, GPT-NeoX's or Falcon's query_key_value, a config without Llama's field names) have no formula
(the `formula_*` metrics are then absent).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from sweepbp.config import SweepbpConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4


@dataclass
class Shape:
    """The few numbers of a Llama-style decoder the formula needs."""

    layers: int
    hidden: int
    mlp: int
    vocab: int
    q: int  # heads * head_dim
    kv: int  # kv_heads * head_dim
    heads: int
    tied: bool

    @classmethod
    def of(cls, config) -> "Shape":
        """The shape of a Llama-style config; AttributeError for a config without its field names."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size,
                   heads * head_dim, kv_heads * head_dim, heads, bool(getattr(config, "tie_word_embeddings", False)))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear of one layer."""
        h, i, q, kv = self.hidden, self.mlp, self.q, self.kv
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def parameters(self) -> int:
        """Parameter count of the base model."""
        per_layer = sum(n_in * n_out for n_in, n_out in self.linears().values()) + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * per_layer + self.hidden


@dataclass
class Estimate:
    """The formula's terms for one job, in bytes."""

    param_bytes: int
    trainable_param_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int  # saved for the backward by the decoder layers
    logits_bytes: int  # the loss transient at its peak
    peak_memory_bytes: int
    inference_peak_bytes: int

    def metrics(self) -> dict[str, float]:
        return {f"formula_{name}": float(value) for name, value in self.__dict__.items()}


def layer_bytes_per_token(shape: Shape, s: int, a: int, r: int, targets: set[str], eager: bool, seq_len: int) -> int:
    """Bytes one decoder layer saves for the backward, per token (HF Llama + peft LoRA, dropout 0).

    Frozen linears save nothing (their input gradient needs only the weight); a LoRA adapter saves its
    input, cast to the adapter dtype (one shared copy when a == s), and its rank-r intermediate. Each
    RMSNorm saves its fp32 input and a (T, 1) rsqrt. Attention saves q, k, v after RoPE and, for SDPA's
    fused kernels, the output and an fp32 logsumexp per head; eager attention keeps k and v expanded to
    all heads and the (heads, seq) probabilities in fp32 and in s. The MLP saves gate, up and silu(gate).
    """
    h, i, q, kv = shape.hidden, shape.mlp, shape.q, shape.kv
    linears = shape.linears()

    def adapter_inputs(names: list[str], width: int) -> int:
        chosen = [n for n in names if n in targets]
        if not chosen:
            return 0
        return len(chosen) * a * width if a != s else s * width

    total = 2 * (FP32 * h + FP32)  # two RMSNorms
    total += adapter_inputs(["q_proj", "k_proj", "v_proj"], h) + adapter_inputs(["gate_proj", "up_proj"], h)
    total += adapter_inputs(["o_proj"], q) + adapter_inputs(["down_proj"], i)
    total += sum(a * r for name in linears if name in targets)
    if eager:
        total += s * q + 2 * s * q + (FP32 + s) * shape.heads * seq_len
    else:
        total += s * (q + 2 * kv) + s * q + FP32 * shape.heads
    total += 3 * s * i
    return total


def loss_terms(loss, s: int, shape: Shape, tokens: int) -> tuple[int, int]:
    """(peak with gradients, peak without) of the loss transient under the loss option `loss`."""
    entries = shape.vocab * tokens
    upcast = 0 if s == FP32 else FP32  # .float() of fp32 logits is the same tensor
    chunks = getattr(loss, "chunks", 1)
    if loss.name == "chunked":
        return (s + FP32) * entries + 2 * FP32 * entries // chunks, s * entries + (upcast + FP32) * entries // chunks
    if loss.name == "fused":
        return 3 * FP32 * entries // chunks + s * shape.hidden * tokens, (s + upcast + FP32) * entries // chunks
    forward = (s + upcast + FP32) * entries
    return max(forward, 3 * FP32 * entries), forward


def estimate(cfg: SweepbpConfig, config, batch_size: int, adapted_layers: Sequence[str]) -> Estimate | None:
    """The formula for `cfg` at `batch_size`; `config` is the model's HF config, `adapted_layers` the short names
    of the layers its adapter went into (the prediction's). None for what it does not model: strategies other than
    none and ckpt, loss=liger, quantised weights, DoRA and full fine-tuning, optimizers other than AdamW, and
    models other than Llama-style decoders (a cross-check that is silently wrong is worse than none)."""
    name = cfg.memory.name
    if name not in ("none", "ckpt") or cfg.loss.name not in ("standard", "chunked", "fused"):
        return None
    if cfg.quant.name != "none" or cfg.method.name != "lora" or cfg.optim.name != "adamw":
        return None
    try:
        shape = Shape.of(config)
    except AttributeError:  # not a Llama-style config (GPT-2's n_embd, no intermediate_size)
        return None
    if not adapted_layers or not set(adapted_layers) <= set(shape.linears()):
        return None  # other layers than the seven linears it counts (a fused qkv_proj, Conv1D, query_key_value)
    s = DTYPE_BYTES[cfg.model.dtype]
    if cfg.trainer.precision in ("bf16-true", "16-true"):
        s, a = 2, 2
    else:
        a = 4 if s == 2 else s  # peft upcasts 16-bit adapters to fp32
    tokens = batch_size * cfg.batch.seq_len
    targets = set(adapted_layers)
    adapter = sum(cfg.lora.r * (n_in + n_out) for n, (n_in, n_out) in shape.linears().items() if n in targets)
    adapter_bytes = shape.layers * adapter * a
    weights = shape.parameters() * s
    layer = layer_bytes_per_token(shape, s, a, cfg.lora.r, targets, cfg.model.attn_implementation == "eager",
                                  cfg.batch.seq_len)
    recompute = 0  # ckpt: one checkpointed layer's activations, rebuilt in the backward
    if name == "ckpt":
        kept = math.ceil(shape.layers / cfg.memory.every)  # type: ignore[attr-defined]
        saved = (kept * s * shape.hidden + (shape.layers - kept) * layer) * tokens
        recompute = layer * tokens
    else:
        saved = shape.layers * layer * tokens
    loss_peak, loss_inference = loss_terms(cfg.loss, s, shape, tokens)
    return Estimate(param_bytes=weights, trainable_param_bytes=adapter_bytes, optimizer_state_bytes=2 * adapter_bytes,
                    activation_bytes=saved + recompute, logits_bytes=loss_peak,
                    peak_memory_bytes=weights + 4 * adapter_bytes + saved + max(loss_peak, recompute),
                    inference_peak_bytes=weights + adapter_bytes + loss_inference)
