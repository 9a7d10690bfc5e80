"""Direct Preference Optimisation (Rafailov et al., 2023), the method seed 003 asks about and seed 001 skipped.

For a prompt x with a preferred answer y_w and a rejected one y_l, a policy pi_theta and a frozen
reference pi_ref:

    r_w = beta * (log pi_theta(y_w|x) - log pi_ref(y_w|x))          the implicit reward of y_w
    r_l = beta * (log pi_theta(y_l|x) - log pi_ref(y_l|x))
    loss = -log sigmoid(r_w - r_l)                                   averaged over the pairs

log pi(y|x) is the sum of the log-probabilities of the answer's tokens, its EOS included, given
everything before them (prompt tokens are not scored). The policy is the model's LoRA adapter, trained;
the reference is that adapter as it was when DPO started, copied under the name "reference" and frozen
(pi_ref = pi_SFT when DPO starts from the SFT adapter), as trl's DPOTrainer does with a PeftModel (its
"ref" adapter). So the first loss is exactly log 2 (r_w = r_l = 0) whatever the starting adapter; a fresh
adapter (B = 0) adds exactly nothing, so its copy is the base model itself. Training lowers the loss by
raising the reward margin r_w - r_l.

Encoding, as trl's DPOTrainer: the prompt and the whole text (prompt + answer + EOS, EOS appended when
the answer does not end with it) are each tokenized with one BOS; the answer starts where the two token
lists first differ, taken over both answers of the pair, so a token that spans the prompt's end and the
answer's start is scored as part of the answer. Sequences longer than max_length lose their end; a pair
whose prompt alone fills max_length is dropped (no answer token would be left to score). Sequences are
padded as SFT records are (reference.sft.collator). `run` goes from files to the saved policy adapter and
dpo.json (the `dpo` command calls it).

Not handled here: the IPO/hinge variants, label smoothing, and reference log-probs precomputed once
(they are recomputed each step, which costs a forward pass but keeps the code short).
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import peft
import torch
import torch.nn.functional as F

from reference import kernels, lora, models, vocab
from reference.data import read_text_rows
from reference.errors import InputError
from reference.formats import encode_prompt
from reference.paths import complete_directory, write_text_atomic
from reference.sft import IGNORE_INDEX, collator
from reference.shapes import PROJECTIONS

REFERENCE_ADAPTER = "reference"
"""The name the frozen copy of the starting adapter gets in the PeftModel."""


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float):
    """(mean loss, chosen rewards, rejected rewards) from per-pair sequence log-probabilities (tensors)."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards, rejected_rewards


@dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def shared_prefix(ids: list[int], other: list[int]) -> int:
    """How many leading tokens two token lists have in common."""
    length = 0
    for a, b in zip(ids, other, strict=False):
        if a != b:
            break
        length += 1
    return length


def encode_pair(tokenizer, pair: PreferencePair, max_length: int):
    """(chosen, rejected), each (token ids, labels that score the answer and its EOS only); None when the
    prompt alone fills max_length (see the module docstring)."""
    eos = tokenizer.eos_token
    prompt = encode_prompt(tokenizer, pair.prompt)
    wholes = [
        encode_prompt(tokenizer, pair.prompt + answer + ("" if answer.endswith(eos) else eos))
        for answer in (pair.chosen, pair.rejected)
    ]
    answer_start = min(shared_prefix(prompt, whole) for whole in wholes)
    if answer_start >= max_length:
        return None
    return tuple(
        (whole[:max_length], ([IGNORE_INDEX] * answer_start + whole[answer_start:])[:max_length]) for whole in wholes
    )


def sequence_logprobs(model, sequences: list[tuple[list[int], list[int]]], tokenizer):
    """Sum over each sequence's scored tokens (label not IGNORE_INDEX) of log p(token | everything before it).
    The (ids, labels) sequences are padded as SFT batches are (reference.sft.collator: on the right, labels
    with IGNORE_INDEX), so padding is never scored."""
    batch = collator(tokenizer)([{"input_ids": ids, "labels": labels} for ids, labels in sequences])
    batch = batch.to(next(model.parameters()).device)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logprobs * scored).sum(-1)


SHOWN = 20
"""Lines named at most in one message; the rest are counted."""


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """JSONL rows with prompt, chosen and rejected text; a bad row is an error naming file and line. So is a
    pair whose chosen answer is the rejected one: it has no preference to learn (r_w = r_l whatever the
    policy, so its loss stays log 2 and its gradient is zero), and a file of them would train to nothing and
    still save an adapter. Every such line is named, before any model loads."""
    rows = read_text_rows(path, ("prompt", "chosen", "rejected"), with_lines=True)
    same = [line for line, r in rows if r["chosen"] == r["rejected"]]
    if same:
        shown = ", ".join(map(str, same[:SHOWN])) + (f" and {len(same) - SHOWN} more" if len(same) > SHOWN else "")
        raise InputError(
            f"{path}: {len(same)} of {len(rows)} pair(s) have the same text as chosen and as rejected, so there is "
            f"no preference to learn (the loss stays log 2): line(s) {shown}; give each pair two different answers"
        )
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for _, r in rows]


def keep_reference(model) -> None:
    """Copy the policy's (active) adapter, as it is now, to a frozen adapter named REFERENCE_ADAPTER
    (trl's "ref" adapter); a model that already holds one keeps it (a run that continues keeps its pi_ref)."""
    if REFERENCE_ADAPTER in model.peft_config:
        return
    policy = model.active_adapter
    model.add_adapter(REFERENCE_ADAPTER, copy.deepcopy(model.peft_config[policy]))
    state = peft.get_peft_model_state_dict(model, adapter_name=policy)
    outcome = peft.set_peft_model_state_dict(model, state, adapter_name=REFERENCE_ADAPTER)
    if outcome.unexpected_keys:
        raise RuntimeError(f"the reference copy of adapter {policy!r} did not take: {outcome.unexpected_keys[:3]}")
    model.set_requires_grad(REFERENCE_ADAPTER, requires_grad=False)


@contextmanager
def reference_of(model):
    """The model answers as pi_ref inside: the frozen reference adapter active, then the policy again."""
    policy = model.active_adapter
    model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
    try:
        yield model
    finally:
        model.set_adapter(policy)  # active and trainable again; the reference stays frozen


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
class DPOLog:
    """What a DPO run did, step by step (written to dpo.json)."""

    settings: dict
    pairs_dropped: int = 0
    """Pairs whose prompt alone filled max_length (left out, as trl does)."""
    losses: list = field(default_factory=list)
    margins: list = field(default_factory=list)
    """Mean reward margin r_w - r_l at each step, before that step's update."""
    reference_logps: list = field(default_factory=list)
    """[mean log pi_ref(y_w|x), mean log pi_ref(y_l|x)] at each step: the same every step (pi_ref is frozen)."""


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_length: int):
    """(chosen sequences, rejected sequences, pairs dropped); an error when no pair is left."""
    encoded = [e for e in (encode_pair(tokenizer, p, max_length) for p in pairs) if e is not None]
    if not encoded:
        raise InputError(f"dpo: every prompt fills max_length {max_length}; no answer token is left to score")
    return [c for c, _ in encoded], [r for _, r in encoded], len(pairs) - len(encoded)


def train(model, tokenizer, pairs: list[PreferencePair], settings: DPOSettings, say=print) -> DPOLog:
    """DPO on a peft model: the policy is its adapter, trained; the reference a frozen copy of that adapter
    as DPO starts (keep_reference), left in the model under REFERENCE_ADAPTER. The tokenizer needs a pad
    token (`run` sets its EOS when it has none, as SFT does)."""
    torch.manual_seed(settings.seed)
    chosen, rejected, dropped = encode_pairs(tokenizer, pairs, settings.max_length)
    if not hasattr(model, "peft_config"):
        raise InputError("dpo: the policy must be a peft model with a LoRA adapter (attach or load one)")
    if not any(p.requires_grad for p in model.parameters()):
        raise InputError("dpo: the policy has no trainable weight (attach or load an adapter trainable)")
    kernels.standard_layout(model)  # a 4-bit base repacked for CPU inference has no backward pass
    keep_reference(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate)
    log = DPOLog(settings=asdict(settings), pairs_dropped=dropped)
    if dropped:
        say(f"dpo: {dropped} pair(s) left out: the prompt alone fills max_length {settings.max_length}")
    alike = sum(c[0] == r[0] for c, r in zip(chosen, rejected, strict=True))
    if alike:  # different texts, the same tokens once cut (or an EOS written out): no signal from these
        say(
            f"dpo: {alike} pair(s) encode chosen and rejected to the same tokens (cut at max_length "
            f"{settings.max_length}, or differing only by a final EOS); they add nothing to learn from"
        )
    model.train()
    for step in range(1, settings.steps + 1):
        with torch.no_grad(), reference_of(model):
            reference_chosen = sequence_logprobs(model, chosen, tokenizer)
            reference_rejected = sequence_logprobs(model, rejected, tokenizer)
        loss, r_w, r_l = dpo_loss(
            sequence_logprobs(model, chosen, tokenizer),
            sequence_logprobs(model, rejected, tokenizer),
            reference_chosen,
            reference_rejected,
            settings.beta,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        margin = float((r_w - r_l).detach().mean())
        log.losses.append(float(loss.detach()))
        log.margins.append(margin)
        log.reference_logps.append([float(reference_chosen.mean()), float(reference_rejected.mean())])
        say(
            f"dpo step {step}/{settings.steps} loss {log.losses[-1]:.4f} reward margin {margin:+.4f} "
            f"(log 2 = {math.log(2):.4f} at the start)"
        )
    return log


def run(
    model_dir: str | Path,
    data_path: str | Path,
    output_dir: str | Path,
    settings: DPOSettings,
    adapter: str | Path | None = None,
    r: int = 8,
    say=print,
) -> dict:
    """DPO from files to files: the model from `model_dir`, the policy the saved `adapter` (loaded trainable)
    or a fresh one of rank r (alpha 2r) on every projection; the tokenizer the adapter's own when it saved one
    (lora.load_tokenizer), its pad token EOS when it has none. Saves the trained policy adapter alone (not the
    reference) with the tokenizer in `output_dir`, and the run's log, the model and where the reference came
    from in output_dir/dpo.json, which it returns."""
    pairs = read_pairs(data_path)
    model, identity = models.load_causal_lm(model_dir)
    if adapter:
        policy = lora.load_adapter(model, adapter, trainable=True)
    else:
        policy = lora.attach(model, {"r": r, "lora_alpha": 2 * r, "target_modules": list(PROJECTIONS)})
    tokenizer = vocab.pad_with_eos(lora.load_tokenizer(model_dir, adapter))
    log = train(policy, tokenizer, pairs, settings, say=say)
    out = Path(output_dir)
    with complete_directory(out) as partial:
        policy.save_pretrained(partial, safe_serialization=True, selected_adapters=[policy.active_adapter])
        tokenizer.save_pretrained(partial)
    result = {
        **asdict(log),
        "model": asdict(identity),
        "pairs": len(pairs),
        "adapter": None if adapter is None else str(adapter),
        "reference": f"the starting adapter ({adapter or 'fresh, B = 0: the base'}), frozen",
    }
    write_text_atomic(out / "dpo.json", json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    return result
