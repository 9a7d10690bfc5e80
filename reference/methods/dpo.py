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
padded as SFT records are (reference.methods.sft.collator), a batch's chosen sequences first, then its rejected ones.

A DPO run is a run like any other (reference.training.runs, claim X12): a recipe (the built-in `dpo`, or a file)
resolved
into the TrainingArguments of a real Trainer (`DPOTrainer` below: this loss in `compute_loss`), so batch size,
accumulation, schedule, optimizer, a 4-bit base and gradient checkpointing come from the recipe; `[dpo]` holds
beta and max_length (reference.settings.sections.DPOSection). The run directory, lock, checkpoints, `--resume`,
`--overwrite`, manifest and `verify` are SFT's. Each step records its mean reward margin r_w - r_l, the rewards
and the reference log-probabilities besides its loss. The saved adapter is the policy alone.

Not handled here: the IPO/hinge variants, label smoothing, and reference log-probs precomputed once
(they are recomputed each step, which costs a forward pass but keeps the code short).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import torch.nn.functional as F

from reference.errors import InputError
from reference.hashing import sha256_of
from reference.methods import train
from reference.methods.sft import IGNORE_INDEX, collator
from reference.modeling.formats import encode_prompt
from reference.records.data import read_text_rows
from reference.settings import sections
from reference.training import runs
from reference.training.manifest import RunManifest

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


def batch_logprobs(model, batch):
    """Per row of a padded batch (input_ids, attention_mask, labels), the sum over its scored tokens (label not
    IGNORE_INDEX) of log p(token | everything before it); padding is never scored."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logprobs * scored).sum(-1)


def sequence_logprobs(model, sequences: list[tuple[list[int], list[int]]], tokenizer):
    """batch_logprobs of (ids, labels) sequences, padded as SFT batches are (reference.methods.sft.collator)."""
    batch = collator(tokenizer)([{"input_ids": ids, "labels": labels} for ids, labels in sequences])
    return batch_logprobs(model, batch.to(next(model.parameters()).device))


SHOWN = 20
"""Lines named at most in one message; the rest are counted."""


COLUMNS = ("prompt", "chosen", "rejected")


def read_pairs(path: str | Path, columns: dict | None = None) -> list[PreferencePair]:
    """JSONL rows with prompt, chosen and rejected text; a bad row is an error naming file and line. So is a
    pair whose chosen answer is the rejected one: it has no preference to learn (r_w = r_l whatever the
    policy, so its loss stays log 2 and its gradient is zero), and a file of them would train to nothing and
    still save an adapter. Every such line is named, before any model loads. `columns` names the file's columns
    (reference.records.data.parse_columns: `prompt=question,chosen=good,rejected=bad`)."""
    rows = read_text_rows(path, COLUMNS, with_lines=True, columns=columns)
    same = [line for line, r in rows if r["chosen"] == r["rejected"]]
    if same:
        shown = ", ".join(map(str, same[:SHOWN])) + (f" and {len(same) - SHOWN} more" if len(same) > SHOWN else "")
        raise InputError(
            f"{path}: {len(same)} of {len(rows)} pair(s) have the same text as chosen and as rejected, so there is "
            f"no preference to learn (the loss stays log 2): line(s) {shown}; give each pair two different answers"
        )
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for _, r in rows]


def without_dropout(model) -> int:
    """Every dropout module of the model set to p = 0 (trl's disable_dropout); how many had p > 0."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p, changed = 0.0, changed + 1
    return changed


def keep_reference(model) -> None:
    """Copy the policy's (active) adapter, as it is now, to a frozen adapter named REFERENCE_ADAPTER
    (trl's "ref" adapter); a model that already holds one (a model DPO has run on in this process) keeps it."""
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


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_length: int):
    """(chosen sequences, rejected sequences, pairs dropped); an error when no pair is left."""
    encoded = [e for e in (encode_pair(tokenizer, p, max_length) for p in pairs) if e is not None]
    if not encoded:
        raise InputError(f"dpo: every prompt fills max_length {max_length}; no answer token is left to score")
    return [c for c, _ in encoded], [r for _, r in encoded], len(pairs) - len(encoded)


def pair_collator(tokenizer):
    """Pads a batch of encoded pairs as one batch: the chosen sequences first, then the rejected ones."""
    pad = collator(tokenizer)

    def collate(rows: list[dict]):
        sides = ("chosen", "rejected")
        return pad([{"input_ids": row[side][0], "labels": row[side][1]} for side in sides for row in rows])

    return collate


class DPOTrainer(runs.StepTrainer):
    """The run's Trainer with the DPO loss: per batch, pi_ref's log-probabilities (the frozen reference adapter,
    no grad), then the policy's, then -log sigmoid(r_w - r_l) averaged over the batch's pairs."""

    def __init__(self, *args, beta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = beta
        # The loss is a mean over pairs: the Trainer divides it by the accumulation window (it would not if it
        # thought the model scaled its own loss by the batch's token count).
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pairs = inputs["input_ids"].shape[0] // 2
        with torch.no_grad(), reference_of(self.accelerator.unwrap_model(model)):
            reference = batch_logprobs(model, inputs)
        policy = batch_logprobs(model, inputs)
        loss, r_w, r_l = dpo_loss(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], self.beta)
        self.add_metrics(
            reward_margin=(r_w - r_l).mean(),
            chosen_reward=r_w.mean(),
            rejected_reward=r_l.mean(),
            reference_chosen_logp=reference[:pairs].mean(),
            reference_rejected_logp=reference[pairs:].mean(),
        )
        return (loss, {"chosen_rewards": r_w, "rejected_rewards": r_l}) if return_outputs else loss


class DirectPreference(runs.Method):
    """DPO as a run: the pairs encoded as trl does, the policy the recipe's fresh adapter or a saved one loaded
    trainable, its frozen copy the reference."""

    name = "dpo"
    trainer_class = DPOTrainer

    section = "dpo"

    def check(self, recipe, adapter) -> None:
        super().check(recipe, adapter)
        if adapter is None and not recipe.lora:
            raise InputError(
                f"dpo: recipe {recipe.name!r} has no [lora] and no --adapter was given: the policy is a "
                "LoRA adapter (a fresh one from [lora], or a saved one)"
            )

    def trainer_settings(self, recipe) -> dict:
        return {"beta": sections.resolve("dpo", recipe.dpo).beta}

    def read(self, recipe, tokenizer, data_path, columns, say) -> runs.Data:
        """The pairs encoded as trl encodes them (the recipe's format is not used: trl's DPO scores the prompt's
        text as it is, with one BOS); a pair whose prompt alone fills max_length is left out, and said."""
        settings = sections.resolve("dpo", recipe.dpo)
        pairs = read_pairs(data_path, columns)
        chosen, rejected, dropped = encode_pairs(tokenizer, pairs, settings.max_length)
        if dropped:
            say(f"dpo: {dropped} pair(s) left out: the prompt alone fills max_length {settings.max_length}")
        alike = sum(c[0] == r[0] for c, r in zip(chosen, rejected, strict=True))
        if alike:  # different texts, the same tokens once cut (or an EOS written out): no signal from these
            say(
                f"dpo: {alike} pair(s) encode chosen and rejected to the same tokens (cut at max_length "
                f"{settings.max_length}, or differing only by a final EOS); they add nothing to learn from"
            )
        return runs.Data(
            dataset=[{"chosen": c, "rejected": r} for c, r in zip(chosen, rejected, strict=True)],
            info={
                "path": str(Path(data_path).resolve()),
                "sha256": sha256_of(data_path),
                "records": len(chosen),
                "pairs": len(pairs),
                "pairs_dropped": dropped,
                "tokens": sum(len(c[0]) + len(r[0]) for c, r in zip(chosen, rejected, strict=True)),
                "max_length": settings.max_length,
            },
        )

    def prepare(self, recipe, directory, tokenizer, args, data, adapter, say) -> runs.Prepared:
        """The policy on the recipe's base, its frozen copy the reference, and no dropout anywhere (as trl's
        disable_dropout): the reference's log-probabilities are then exact, and the first loss log 2."""
        dtype = "bfloat16" if args.bf16 else "float32"
        model, identity, weight_bytes, adapter_info = train.prepare_model(
            recipe, directory, str(args.device), args.activation_checkpointing, dtype, adapter, say
        )
        keep_reference(model)
        dropped = without_dropout(model)
        if dropped:
            say(f"dpo: dropout set to 0 in {dropped} module(s) (trl's disable_dropout), so pi_ref is exact")
        say(f"dpo: the reference is the starting adapter ({adapter or 'fresh, B = 0: the base'}), frozen")
        beta = sections.resolve("dpo", recipe.dpo).beta
        return runs.Prepared(
            data=data,
            model=model,
            identity=identity,
            weight_bytes=weight_bytes,
            adapter=adapter_info,
            collator=pair_collator(tokenizer),
            loss=f"DPO, -log sigmoid(r_w - r_l) with r = beta x log-ratio to the reference, beta {beta}",
        )

    def save_model(self, model, directory, weights) -> None:
        """The policy adapter alone (not the frozen reference)."""
        selected = [model.active_adapter]
        model.save_pretrained(directory, safe_serialization=True, state_dict=weights, selected_adapters=selected)


def run(recipe, model_dir, data_path, output_dir, adapter=None, **options) -> RunManifest:
    """A DPO run (reference.training.runs.run): options say, callbacks, resume, overwrite."""
    return runs.run(
        DirectPreference(), recipe, str(model_dir), str(data_path), str(output_dir), adapter=adapter, **options
    )
