"""Direct Preference Optimisation (Rafailov et al., 2023), the method seed 003 asks about and seed 001 skipped.

For a prompt x with a preferred answer y_w and a rejected one y_l, a policy pi_theta and a frozen
reference pi_ref (here: the same model with its LoRA adapter switched off, so no second copy is held):

    r_w = beta * (log pi_theta(y_w|x) - log pi_ref(y_w|x))          the implicit reward of y_w
    r_l = beta * (log pi_theta(y_l|x) - log pi_ref(y_l|x))
    loss = -log sigmoid(r_w - r_l)                                   averaged over the pairs

log pi(y|x) is the sum of the log-probabilities of the answer's tokens given everything before them
(prompt tokens are not scored). At the start the adapter is the identity (B = 0), so r_w = r_l = 0
and the loss is log 2. Training lowers it by raising the reward margin r_w - r_l.

Not handled here: the IPO/hinge variants, label smoothing, and reference log-probs precomputed once
(they are recomputed each step, which costs a forward pass but keeps the code short).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reference.errors import InputError


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float):
    """(mean loss, chosen rewards, rejected rewards) from per-pair sequence log-probabilities (tensors)."""
    import torch.nn.functional as F

    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards, rejected_rewards


def encode_pair(tokenizer, prompt: str, answer: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer (one BOS, EOS after the answer) and labels that score the answer only."""
    from reference.sft import IGNORE_INDEX

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return ids, labels


def sequence_logprobs(model, batch: list[tuple[list[int], list[int]]], pad_token_id: int):
    """Sum over each sequence's scored tokens of log p(token | everything before it)."""
    import torch

    from reference.sft import IGNORE_INDEX

    width = max(len(ids) for ids, _ in batch)
    device = next(model.parameters()).device
    ids = torch.tensor([i + [pad_token_id] * (width - len(i)) for i, _ in batch], device=device)
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch], device=device)
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in batch], device=device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logprobs * scored).sum(-1)


@dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """JSONL rows with prompt, chosen and rejected text; a bad row is an error naming file and line."""
    from reference.data import read_text_rows

    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in read_text_rows(path, ("prompt", "chosen", "rejected"))]


@dataclass
class DPOSettings:
    beta: float = 0.1
    """Strength of the pull towards the reference (the KL penalty's weight)."""
    learning_rate: float = 5e-4
    """AdamW step size for the adapter."""
    steps: int = 10
    """Optimizer steps; each uses every pair once (the fixture sets are small)."""
    max_length: int = 256
    """Prompt + answer tokens kept per sequence."""
    seed: int = 0


@dataclass
class DPORecord:
    settings: dict
    losses: list = field(default_factory=list)
    margins: list = field(default_factory=list)
    """Mean reward margin r_w - r_l at each step, before that step's update."""


def train(model, tokenizer, pairs: list[PreferencePair], settings: DPOSettings, say=print) -> DPORecord:
    """DPO on a peft model: the policy is the model with its adapter, the reference the same model without."""
    import torch

    torch.manual_seed(settings.seed)
    chosen = [encode_pair(tokenizer, p.prompt, p.chosen, settings.max_length) for p in pairs]
    rejected = [encode_pair(tokenizer, p.prompt, p.rejected, settings.max_length) for p in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise InputError("dpo: the policy has no trainable weight (attach or load an adapter trainable)")
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate)
    record = DPORecord(settings=asdict(settings))
    model.train()
    for step in range(1, settings.steps + 1):
        with torch.no_grad(), model.disable_adapter():
            reference_chosen = sequence_logprobs(model, chosen, pad)
            reference_rejected = sequence_logprobs(model, rejected, pad)
        loss, r_w, r_l = dpo_loss(sequence_logprobs(model, chosen, pad), sequence_logprobs(model, rejected, pad),
                                  reference_chosen, reference_rejected, settings.beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        margin = float((r_w - r_l).detach().mean())
        record.losses.append(float(loss.detach()))
        record.margins.append(margin)
        say(f"dpo step {step}/{settings.steps} loss {record.losses[-1]:.4f} reward margin {margin:+.4f} "
            f"(log 2 = {math.log(2):.4f} at the start)")
    return record
