"""The loss of a training step: the output projection and the cross-entropy, one function per `loss.name`.

  standard  transformers' own: the model's forward with labels. The whole logits tensor (batch x seq x
            vocab) exists in the model's dtype, is upcast to fp32 at once, and its fp32 gradient follows.
  chunked   the model's logits, then the cross-entropy over `loss.chunks` slices of the sequence, each
            upcast to fp32 on its own (torchtune's CEWithChunkedOutputLoss); the logits still exist whole.
  fused     the decoder's hidden states, then the output projection and the cross-entropy chunk by chunk
            in one autograd function (`FusedLinearCrossEntropy`): no full logits tensor ever exists.
  liger     liger-kernel's fused linear cross-entropy (Triton: CUDA only, the `.[liger]` extra).

Every option computes the mean token cross-entropy of transformers' ForCausalLMLoss (labels shifted by one,
-100 ignored), so their values and gradients agree up to float summation order (tests/test_loss.py).
Each also marks the tracker's loss phase (measure.tracker.LOSS): from the output projection's input to the
loss in the forward, and from the loss back to the hidden states' gradient in the backward; what the loss
allocates there is counted as `logits_bytes`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from sweepbp.config import HEAD_RESCALING_FIELDS, ConfigError, LossConfig
from sweepbp.measure.tracker import BACKWARD, LOSS, OTHER, active_tracker, enter_phase

IGNORE = -100  # transformers' ignore_index: label positions that do not count
# Config fields of model families whose causal-LM head changes the logits after the projection; the
# fused options compute the projection themselves, so each must be applied there or refused.
SOFTCAP = "final_logit_softcapping"  # Gemma 2 and 3: cap * tanh(logits / cap), applied here too


def step_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], loss: LossConfig) -> torch.Tensor:
    """The training loss of `batch` under the loss option `loss.name`."""
    return LOSSES[loss.name](model, batch, loss)


def _standard(model, batch, loss: LossConfig) -> torch.Tensor:
    with _loss_phase_from(model.get_output_embeddings()):
        return model(**batch).loss


def _chunked(model, batch, loss: LossConfig) -> torch.Tensor:
    with _loss_phase_from(model.get_output_embeddings()):
        logits = model(**_inputs(batch)).logits
    return chunked_cross_entropy(logits, batch["labels"], loss.chunks)


def _fused(model, batch, loss: LossConfig) -> torch.Tensor:
    hidden, head, softcap = _hidden_and_head(model, batch)
    trainable = [p for p in head.parameters() if p.requires_grad]
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or bool(trainable))
    return FusedLinearCrossEntropy.apply(hidden, shifted_labels(batch["labels"]), head, softcap, loss.chunks,
                                         wants_grad, *trainable)


def _liger(model, batch, loss: LossConfig) -> torch.Tensor:
    from liger_kernel.transformers.fused_linear_cross_entropy import (  # optional extra, CUDA only
        LigerFusedLinearCrossEntropyLoss,
    )

    hidden, head, softcap = _hidden_and_head(model, batch)
    if type(head) is not torch.nn.Linear:
        raise ConfigError([f"loss=liger needs a plain linear output projection, got {type(head).__name__} "
                           "(an adapter on lm_head?); use loss=fused"])
    criterion = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="mean", softcap=softcap)
    flat = hidden.reshape(-1, hidden.shape[-1])
    return criterion(head.weight, flat, shifted_labels(batch["labels"]).reshape(-1), head.bias)


LOSSES: dict[str, Callable[[torch.nn.Module, dict[str, torch.Tensor], LossConfig], torch.Tensor]] = {
    "standard": _standard,
    "chunked": _chunked,
    "fused": _fused,
    "liger": _liger,
}


# -- the pieces ---------------------------------------------------------------------------------------
def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the positions that predict them, as ForCausalLMLoss shifts them: position t
    predicts token t + 1, the last position predicts nothing (ignored)."""
    return F.pad(labels, (0, 1), value=IGNORE)[..., 1:]


def chunked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, chunks: int) -> torch.Tensor:
    """Mean cross-entropy over `chunks` slices of the sequence, each slice upcast to fp32 on its own."""
    targets = shifted_labels(labels)
    total = logits.new_zeros((), dtype=torch.float32)
    for part, target in zip(logits.chunk(chunks, dim=1), targets.chunk(chunks, dim=1)):
        total = total + F.cross_entropy(part.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE,
                                        reduction="sum")
    return total / (targets != IGNORE).sum()


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Output projection + mean cross-entropy, chunk by chunk over the flattened tokens.

    The forward runs each chunk's projection, fp32 cross-entropy and, when gradients are wanted, that
    chunk's backward at once (autograd on the chunk alone), writing the chunk's slice of the hidden states'
    gradient; then the chunk's logits are gone. What waits for the backward is that gradient (the size of
    the hidden states) and the gradients of trainable head weights; the backward only scales them by the
    loss's incoming gradient. The head is any module (an adapter on it, a bias, Gemma's soft-capping):
    autograd differentiates it per chunk.
    """

    @staticmethod
    def forward(ctx, hidden, targets, head, softcap, chunks, wants_grad, *params):
        flat = hidden.reshape(-1, hidden.shape[-1])
        flat_targets = targets.reshape(-1)
        count = (flat_targets != IGNORE).sum()
        scale = count.to(torch.float32).reciprocal()  # d(mean)/d(sum), as the fp32 mean's backward applies it
        grad_flat = torch.empty_like(flat) if wants_grad else None
        grads = [torch.zeros_like(p) for p in params] if wants_grad else []
        total = flat.new_zeros((), dtype=torch.float32)
        rows = flat.shape[0]
        bounds = [rows * i // chunks for i in range(chunks + 1)]
        for start, stop in zip(bounds, bounds[1:]):
            if stop > start:
                total += _chunk(flat[start:stop], flat_targets[start:stop], head, softcap, scale, params,
                                grad_flat[start:stop] if grad_flat is not None else None, grads)
        if wants_grad:
            ctx.save_for_backward(grad_flat, *grads)
            ctx.hidden_shape = hidden.shape
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_flat, *grads = ctx.saved_tensors
        grad_hidden = grad_flat.mul_(grad_output).view(ctx.hidden_shape)  # in place: no second copy
        return (grad_hidden, None, None, None, None, None, *(g.mul_(grad_output) for g in grads))


def _chunk(rows: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, softcap: float | None,
           scale: torch.Tensor, params: tuple[torch.Tensor, ...], grad_rows: torch.Tensor | None,
           grads: list[torch.Tensor]) -> torch.Tensor:
    """One chunk's summed cross-entropy; with `grad_rows`, also its gradients (scaled to the mean's), written
    into `grad_rows` and added to `grads`. A function of its own so that the chunk's logits die on return."""
    if grad_rows is None:
        return _chunk_sum(rows, targets, head, softcap)
    rows = rows.detach().requires_grad_(True)
    with torch.enable_grad():
        part = _chunk_sum(rows, targets, head, softcap)
    got = torch.autograd.grad(part, [rows, *params], grad_outputs=scale)
    grad_rows.copy_(got[0])
    for accumulated, grad in zip(grads, got[1:]):
        accumulated += grad
    return part.detach()


def _chunk_sum(rows, targets, head, softcap: float | None) -> torch.Tensor:
    logits = head(rows)
    if softcap is not None:  # as Gemma's head does it, in the logits' own dtype before the loss's upcast
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")


def _hidden_and_head(model, batch) -> tuple[torch.Tensor, torch.nn.Module, float | None]:
    """The decoder's last hidden states (loss phase from here on), the output projection and its soft-cap."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    changed = [name for name in HEAD_RESCALING_FIELDS if getattr(config, name, None) not in (None, 1, 1.0)]
    if changed:
        raise ConfigError([f"loss must be standard or chunked for a model whose head rescales its logits "
                           f"({', '.join(changed)}), got a fused loss"])
    hidden = base.get_decoder()(**_inputs(batch)).last_hidden_state
    enter_phase(LOSS)
    return _end_of_loss(hidden), base.get_output_embeddings(), getattr(config, SOFTCAP, None)


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in batch.items() if key != "labels"}


# -- the loss phase for the tracker ---------------------------------------------------------------------
@contextlib.contextmanager
def _loss_phase_from(head: torch.nn.Module) -> Iterator[None]:
    """Inside the model's own forward, the loss phase starts where the output projection gets its input."""
    if active_tracker() is None:
        yield
        return

    def into_loss(module, args):
        enter_phase(LOSS)
        return (_end_of_loss(args[0]), *args[1:])

    handle = head.register_forward_pre_hook(into_loss)
    try:
        yield
    finally:
        handle.remove()


class _EndOfLoss(torch.autograd.Function):
    """Identity on the hidden states whose backward ends the tracker's loss phase: their gradient flows on
    into the decoder like any activation gradient, so it counts as other memory, not as the loss's."""

    @staticmethod
    def forward(ctx, hidden):
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        tracker = active_tracker()
        if tracker is not None:
            tracker.retag(grad, OTHER)
            enter_phase(BACKWARD)
        return grad


def _end_of_loss(hidden: torch.Tensor) -> torch.Tensor:
    """Mark the hidden states for the tracker (only while one traces a step that will run a backward)."""
    if active_tracker() is None or not (torch.is_grad_enabled() and hidden.requires_grad):
        return hidden
    return _EndOfLoss.apply(hidden)
