"""The causal-LM loss without the full logits: the LM head and the cross-entropy, a chunk of tokens at a time.

With hidden states h (N × H, the decoder's last, normed output), the LM head W (V × H), the soft cap c
(Gemma-2's `final_logit_softcapping`, 30.0; None for Llama) and the next-token labels y (-100 = not counted):

    z_t    = W h_t                                     the logits of token t (V of them)
    z_t    = c · tanh(z_t / c)                         Gemma-2's final-logit soft-capping, when c is set
    loss_t = logsumexp(z_t) - z_t[y_t]                 the cross-entropy of token t, in fp32
    loss   = Σ_{t: y_t ≠ -100} loss_t / D              D = the counted tokens, or `num_items_in_batch` when given

which is transformers' `ForCausalLMLoss` after Gemma-2's forward: the labels are shifted one left (y_t is the
label of token t+1; each row's last token counts nothing) and the logits are computed and capped in the model's
dtype, the cross-entropy in fp32. The sums over tokens run in another order, and the gradients are worked out by
the formulas of `ChunkedCrossEntropy` rather than by autograd (in fp32, rounded once to the model's dtype), so
loss and gradients equal the full computation to fp32 rounding.

The full computation holds N × V fp32 logits several times over (the logits, their tanh and their log-softmax
are kept for the backward; Gemma-2 at 4 × 2,048 tokens: 8.4 GB each). Here a chunk of `chunk_size` tokens is
projected, capped and scored, its gradients with respect to the hidden states (and the head, when it is trained)
are worked out at once, and the chunk's logits are dropped: the loss never holds more than one chunk's logits
(chunk_size × V) and keeps only gradients of the size of its inputs. It takes the same LM-head products as the
full computation and recomputes nothing, as liger's kernel does. The price: the forward works out gradients
that a loss never backpropagated would not need (it skips them under `torch.no_grad()`), and no double backward.

On CUDA with liger-kernel installed, liger's fused linear cross-entropy (the maintained Triton kernel of the
same method) does the job instead. `use_chunked_loss` puts either into a `*ForCausalLM`'s forward for training,
as liger's own patch and the Trainer's `use_liger_kernel` do.

Not handled: label smoothing, z-loss, an LM-head bias or adapter (neither Gemma-2 nor Llama has one), a
tensor-parallel or FSDP-sharded LM head (the weight is read whole).
"""

from __future__ import annotations

import functools
import importlib.util
import types

import torch
import torch.nn.functional as F

from reference.methods.sft import IGNORE_INDEX

CHUNK_SIZE = 256
"""Tokens per chunk: Gemma-2's 256,000 fp32 logits of 256 tokens are 262 MB."""


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """Each token's target is the next token's label; the last token of a row has none (-100).

    transformers' ForCausalLMLoss pads the labels on the right and drops the first, rather than dropping the
    last hidden state, so the hidden states are used whole.
    """
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


class ChunkedCrossEntropy(torch.autograd.Function):
    """Σ loss_t / D and its gradients, one chunk of tokens at a time. The gradients are worked out in the forward,
    while the chunk's logits are at hand, and only they are kept; the backward scales them by the incoming gradient.

    Per chunk, with p = softmax(z) and t = tanh(W h / c):
        ∂loss/∂z       = (p - onehot(y)) / D         on counted tokens, 0 on the others
        ∂loss/∂(W h)   = ∂loss/∂z · (1 - t²)         through the soft cap (d/dx c·tanh(x/c) = 1 - tanh²(x/c))
        ∂loss/∂h       = ∂loss/∂(W h) · W            and ∂loss/∂W += ∂loss/∂(W h)ᵀ · h when the head is trained
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, denominator, chunk_size):
        wants_hidden, wants_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            chunk_grad = None if grad_hidden is None else grad_hidden[rows]
            total += _chunk(hidden[rows], weight, labels[rows], softcap, denominator, chunk_grad, grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / denominator

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _chunk(hidden, weight, labels, softcap, denominator, grad_hidden, grad_weight) -> torch.Tensor:
    """Σ loss_t over one chunk's counted tokens; writes ∂loss/∂h into `grad_hidden` and adds ∂loss/∂W to
    `grad_weight` where they are given. Its chunk-sized buffers (at most three live: t, the capped logits and their
    log-softmax) are freed on return."""
    logits = F.linear(hidden, weight)  # as Gemma-2's forward: in the model's dtype, then capped
    if softcap is not None:
        capped = logits.div_(softcap).tanh_()  # t, in place of the raw logits
        logits = capped * softcap
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # as ForCausalLMLoss: in fp32
    del logits  # the capped logits are not needed past here
    counted = labels != IGNORE_INDEX
    targets = labels.clamp(min=0).unsqueeze(1)
    loss = -log_probs.gather(1, targets).squeeze(1)[counted].sum()
    if grad_hidden is None and grad_weight is None:
        return loss
    grad = log_probs.exp_().scatter_add_(1, targets, torch.full_like(targets, -1, dtype=log_probs.dtype))
    grad.mul_(counted.unsqueeze(1) / denominator)
    if softcap is not None:  # 1 - t², in fp32 as autograd's tanh backward computes it (in bf16 1 - t² would cancel)
        t = capped.float() if capped.dtype != torch.float32 else capped
        del capped
        grad.mul_(t.square_().neg_().add_(1))  # in place of t
        del t
    grad = grad.to(hidden.dtype)
    if grad_hidden is not None:
        grad_hidden.copy_(grad @ weight)
    if grad_weight is not None:
        grad_weight.addmm_(grad.T.float(), hidden.float())
    return loss


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """The loss of the module docstring from hidden states (N × H), the LM head weight (V × H) and the already
    shifted labels (N); a mean over the counted tokens, or the sum over `num_items_in_batch` when given."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    counted = (labels != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
    denominator = counted.to(hidden.device) if torch.is_tensor(counted) else counted
    if not torch.is_grad_enabled():  # no gradient wanted: the forward works out none
        hidden, weight = hidden.detach(), weight.detach()
    return ChunkedCrossEntropy.apply(hidden, weight, labels, softcap, denominator, chunk_size)


def liger_runs_here(hidden: torch.Tensor) -> bool:
    """liger-kernel's Triton kernels need CUDA and the package."""
    return hidden.is_cuda and importlib.util.find_spec("liger_kernel") is not None


def liger_cross_entropy(hidden, weight, labels, softcap=None, num_items_in_batch=None) -> torch.Tensor:
    """The same loss through liger's fused linear cross-entropy (CUDA only)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = liger_fused_linear_cross_entropy(
        hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction=reduction, softcap=softcap
    )
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def causal_lm_loss(
    model,
    hidden_states: torch.Tensor,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """A `*ForCausalLM`'s training loss from the decoder's output `model.base_model(...).last_hidden_state`, with the
    model's LM head and soft cap; `labels` are shifted here, `shift_labels` (padding-free collators) are not."""
    targets = next_token_labels(labels) if shift_labels is None else shift_labels
    weight = model.get_output_embeddings().weight
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if liger_runs_here(hidden_states):
        return liger_cross_entropy(hidden_states, weight, targets, softcap, num_items_in_batch)
    return chunked_cross_entropy(hidden_states, weight, targets, softcap, num_items_in_batch, chunk_size)


def use_chunked_loss(model, chunk_size: int = CHUNK_SIZE):
    """Train `model` (a `*ForCausalLM`, or a peft model around one) with the loss of this module: in training with
    labels its forward computes the loss from the decoder's hidden states and returns no logits; otherwise (eval,
    generation, no labels) it is the class's own forward. The Trainer passes `num_items_in_batch` to it as to the
    model's own forward. The forward is replaced on this one instance, as liger's patch does. Returns the model."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    own_forward = type(causal_lm).forward

    @functools.wraps(own_forward)  # the signature `generate` and the Trainer inspect stays the model's
    def forward(self, *args, labels=None, logits_to_keep=0, **kwargs):
        all_logits = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if not self.training or (labels is None and "shift_labels" not in kwargs) or not all_logits:
            return own_forward(self, *args, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
        shift_labels = kwargs.pop("shift_labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.base_model(*args, **kwargs)  # the decoder (`model` in Gemma-2 and Llama), as forward calls it
        loss = causal_lm_loss(self, outputs.last_hidden_state, labels, shift_labels, num_items_in_batch, chunk_size)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    causal_lm.forward = types.MethodType(forward, causal_lm)
    return model


def train_with(model, chunked: bool, device) -> str:
    """Put this module's loss into `model` when `chunked` (use_chunked_loss) and say what computes its training
    loss, for the run's manifest: liger's kernel on CUDA where it is installed, the chunked function otherwise, or the
    model's own loss on the full logits."""
    if not chunked:
        return "the model's own (full logits)"
    use_chunked_loss(model)
    if str(device).startswith("cuda") and importlib.util.find_spec("liger_kernel") is not None:
        return "liger-kernel's fused linear cross-entropy"
    return f"chunked, {CHUNK_SIZE} tokens at a time"
