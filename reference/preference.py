"""The LMSYS preference classifier (seeds 000 and 002): which of two responses a person preferred.

Three classes, in the competition's column order: winner_model_a (0), winner_model_b (1),
winner_tie (2); a row's label is the index of its one-hot column. The backbone is a causal LM loaded
as `AutoModelForSequenceClassification(num_labels=3)` in bf16: a linear head on the hidden state of
the last non-pad token, which is why a pad token must be set (the model finds the last token that is
not padding, so left and right padding give the same logits). Training attaches LoRA to the
projections and trains the new head fully; the metric is the competition's log-loss on a held-out split.

Inputs follow the thread's Config: the text is "<prompt>: " + prompt, "\\n\\n<response_a>: " + a,
"\\n\\n<response_b>: " + b (the markers of the public notebook the thread refers to).
`spread_max_length=False` cuts the joined text to `max_length` tokens, so a long prompt can leave no
room for the responses; True cuts each of the three parts to `max_length // 3` and joins them.
`tta` (test-time augmentation) also scores each row with a and b swapped; in that scoring the first
column is p(the row's b wins) and the second p(the row's a wins), so those two are swapped back before
the two scorings are averaged. Batches are padded on the right by transformers' DataCollatorWithPadding.

Competition rows hold prompt and responses as JSON lists of turns; they are joined with newlines.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import peft
import torch
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)

from reference import lora, models, vocab
from reference.data import read_text_rows
from reference.errors import InputError
from reference.paths import complete_directory, write_text_atomic
from reference.shapes import PROJECTIONS

LABELS = ("winner_model_a", "winner_model_b", "winner_tie")
COLUMNS = ("prompt", "response_a", "response_b", *LABELS)
A_AND_B_SWAPPED_BACK = [1, 0, 2]
"""Column order that turns a prediction for (b, a) into one for (a, b): p(a wins), p(b wins), p(tie)."""


@dataclass
class PreferenceConfig:
    """The thread's Config (seed 000), the fields that shape inputs and predictions."""

    max_length: int = 2048
    """Tokens per input at most."""
    batch_size: int = 4
    """Rows per forward pass."""
    spread_max_length: bool = False
    """False: cut the joined input to max_length; True: cut each part to max_length // 3."""
    tta: bool = False
    """Also score with a and b swapped and average (test-time augmentation)."""


def as_text(value) -> str:
    """A competition field (a JSON list of turns as text) or plain text, as one string."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        if isinstance(parsed, list):
            return "\n".join("" if turn is None else str(turn) for turn in parsed)
        return value
    raise TypeError(f"expected text, got {type(value).__name__}")


def read_rows(path: str | Path, need_labels: bool = True) -> list[dict]:
    """Competition-format JSONL rows; a missing column or a label row that is not one-hot is named."""
    rows = []
    for number, row in read_text_rows(path, COLUMNS[:3], with_lines=True):
        parts = {c: as_text(row[c]) for c in COLUMNS[:3]}
        if need_labels:
            onehot = [row.get(c) for c in LABELS]
            if sorted(onehot, key=str) != [0, 0, 1]:
                raise InputError(f"{path}, line {number}: {', '.join(LABELS)} must be one-hot, got {onehot}")
            parts["label"] = onehot.index(1)
        rows.append(parts)
    return rows


def encode(tokenizer, prompt: str, response_a: str, response_b: str, config: PreferenceConfig) -> list[int]:
    """Token ids of one row under the Config's truncation rule (BOS first, as the tokenizer adds it)."""
    parts = ["<prompt>: " + prompt, "\n\n<response_a>: " + response_a, "\n\n<response_b>: " + response_b]
    if config.spread_max_length:
        pieces = [tokenizer(p, max_length=config.max_length // 3, truncation=True)["input_ids"] for p in parts]
        return [token for piece in pieces for token in piece]
    return tokenizer("".join(parts), max_length=config.max_length, truncation=True)["input_ids"]


def load_classifier(path: str | Path, adapter: str | Path | None = None, dtype: str = "bfloat16"):
    """(model, tokenizer): the causal LM with a 3-way head, and a trained classifier adapter on it (frozen)
    when given. The tokenizer is the adapter's own when it saved one (lora.load_tokenizer), its pad token
    set (EOS when it has none) and padding on the right."""
    model, _ = models.load_causal_lm(path, dtype=dtype, model_class=AutoModelForSequenceClassification, num_labels=3)
    tokenizer = vocab.pad_with_eos(lora.load_tokenizer(path, adapter))
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    if adapter is not None:
        model = lora.load_adapter(model, adapter, trainable=False)
    return model, tokenizer


def class_probabilities(model, tokenizer, rows: list[dict], config: PreferenceConfig) -> torch.Tensor:
    """softmax of the head's logits per row (n x 3), config.batch_size rows per forward pass."""
    collate = DataCollatorWithPadding(tokenizer)
    device = next(model.parameters()).device
    probabilities = []
    for start in range(0, len(rows), config.batch_size):
        chunk = rows[start : start + config.batch_size]
        batch = collate(
            [{"input_ids": encode(tokenizer, r["prompt"], r["response_a"], r["response_b"], config)} for r in chunk]
        )
        with torch.no_grad():
            logits = model(**batch.to(device)).logits.float()
        probabilities.append(torch.softmax(logits, dim=-1).cpu())
    return torch.cat(probabilities)


def predict(model, tokenizer, rows: list[dict], config: PreferenceConfig) -> torch.Tensor:
    """Class probabilities per row (n x 3). With config.tta, the mean of that and the scoring of the same rows
    with a and b swapped, whose p(a wins) and p(b wins) are swapped back first (claim A5)."""
    model.eval()
    probabilities = class_probabilities(model, tokenizer, rows, config)
    if not config.tta:
        return probabilities
    swapped_rows = [{**row, "response_a": row["response_b"], "response_b": row["response_a"]} for row in rows]
    swapped = class_probabilities(model, tokenizer, swapped_rows, config)
    swapped_back = swapped[:, A_AND_B_SWAPPED_BACK]
    return (probabilities + swapped_back) / 2


def predict_file(
    model_dir: str | Path,
    data_path: str | Path,
    output: str | Path,
    config: PreferenceConfig,
    adapter: str | Path | None = None,
) -> dict:
    """Probabilities for every row of a competition-format file (labels not needed), written as JSONL, one
    {winner_model_a, winner_model_b, winner_tie} object per row; returns what was written."""
    model, tokenizer = load_classifier(model_dir, adapter)
    rows = read_rows(data_path, need_labels=False)
    probabilities = predict(model, tokenizer, rows, config).tolist()
    lines = [json.dumps(dict(zip(LABELS, row, strict=True))) + "\n" for row in probabilities]
    write_text_atomic(output, "".join(lines))
    return {"output": str(output), "rows": len(rows), "config": asdict(config)}


def log_loss(probabilities, labels: list[int]) -> float:
    """The competition's metric: -mean log p(true class), probabilities clipped to [1e-15, 1 - 1e-15]."""
    total = 0.0
    for row, label in zip(probabilities.tolist(), labels, strict=True):
        total -= math.log(min(max(row[label] / sum(row), 1e-15), 1 - 1e-15))
    return total / len(labels)


def train(
    model_dir: str,
    data_path: str,
    output_dir: str,
    config: PreferenceConfig,
    epochs: float = 3.0,
    learning_rate: float = 1e-3,
    eval_fraction: float = 0.25,
    r: int = 8,
    seed: int = 0,
    say=print,
) -> dict:
    """LoRA on the projections plus a fully trained head, with a real Trainer; log-loss before and after
    on a held-out split (the last `eval_fraction` of the rows after a seeded shuffle). The seed also
    draws the new head's first weights, so repeated runs start from the same head."""
    rows = read_rows(data_path)
    random.Random(seed).shuffle(rows)
    held = max(1, int(len(rows) * eval_fraction))
    train_rows, eval_rows = rows[:-held], rows[-held:]
    if not train_rows:
        raise InputError(f"{data_path}: {len(rows)} rows leave nothing to train on after holding out {held}")
    set_seed(seed)
    model, tokenizer = load_classifier(model_dir)
    labels = [r["label"] for r in eval_rows]
    before = log_loss(predict(model, tokenizer, eval_rows, config), labels)
    lora_config = peft.LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, target_modules=list(PROJECTIONS))
    model = peft.get_peft_model(model, lora_config)
    features = [
        {"input_ids": encode(tokenizer, x["prompt"], x["response_a"], x["response_b"], config), "labels": x["label"]}
        for x in train_rows
    ]
    args = TrainingArguments(
        output_dir=str(Path(output_dir) / "checkpoints"),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        bf16=True,
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        seed=seed,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    # DataCollatorWithPadding pads input_ids and attention_mask; each row's label is one class, not padded.
    trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=DataCollatorWithPadding(tokenizer))
    trainer.remove_callback(PrinterCallback)  # stdout carries the JSON result only
    trainer.train()
    after = log_loss(predict(model, tokenizer, eval_rows, config), labels)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = Path(output_dir)
    with complete_directory(out) as partial:
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
    result = {
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "log_loss_before": before,
        "log_loss_after": after,
        "uniform_log_loss": math.log(3),
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "config": asdict(config),
        "epochs": epochs,
        "learning_rate": learning_rate,
    }
    write_text_atomic(out / "preference.json", json.dumps(result, indent=2) + "\n")
    say(f"held-out log-loss {before:.4f} -> {after:.4f} (uniform guess: {math.log(3):.4f})")
    return result
