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

Training is a run like SFT's (reference.training.runs, claim X12): the recipe `lmsys-classifier` (the thread's Config as
its `[classifier]` section, reference.settings.sections.PreferenceConfig) resolved into a real Trainer's arguments, the
same run directory, lock, checkpoints, `--resume`, manifest and `verify`. The rows are shuffled with the run's
seed and the last `eval_fraction` held out; the manifest's results give the held-out log-loss before training,
after it, and the uniform guess's ln 3 beside them. A saved classifier adapter can be trained on (`--adapter`,
loaded trainable: the thread's question of continuing from a checkpoint, seed 000).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, TrainingArguments

from reference.errors import InputError
from reference.hashing import sha256_of
from reference.methods import train
from reference.modeling import lora, models, vocab
from reference.paths import write_text_atomic
from reference.records.data import read_text_rows
from reference.settings import sections
from reference.settings.sections import PreferenceConfig
from reference.training import runs
from reference.training.manifest import RunManifest

LABELS = ("winner_model_a", "winner_model_b", "winner_tie")
COLUMNS = ("prompt", "response_a", "response_b", *LABELS)
A_AND_B_SWAPPED_BACK = [1, 0, 2]
"""Column order that turns a prediction for (b, a) into one for (a, b): p(a wins), p(b wins), p(tie)."""


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


def read_rows(path: str | Path, need_labels: bool = True, columns: dict | None = None) -> list[dict]:
    """Competition-format JSONL rows; a missing column or a label row that is not one-hot is named. `columns`
    names the file's prompt, response_a and response_b columns (reference.records.data.parse_columns)."""
    rows = []
    for number, row in read_text_rows(path, COLUMNS[:3], with_lines=True, columns=columns):
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
    columns: dict | None = None,
) -> dict:
    """Probabilities for every row of a competition-format file (labels not needed), written as JSONL, one
    {winner_model_a, winner_model_b, winner_tie} object per row; returns what was written."""
    model, tokenizer = load_classifier(model_dir, adapter)
    rows = read_rows(data_path, need_labels=False, columns=columns)
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


UNIFORM_LOG_LOSS = math.log(3)
"""The log-loss of the uniform guess (1/3 each): what a classifier that learned nothing scores."""


def held_out_split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training rows, held-out rows): shuffled with random.Random(seed), the last max(1, int(n x fraction)) held
    out; an error when that leaves nothing to train on."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    held = max(1, int(len(rows) * fraction))
    if held >= len(rows):
        raise InputError(f"{len(rows)} row(s) leave nothing to train on after holding out {held}")
    return rows[:-held], rows[-held:]


class ClassifierTrainer(runs.StepTrainer):
    """The run's Trainer for the 3-way head: the model's own cross-entropy, a mean over the batch's rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # a mean over rows: the Trainer divides it by the accumulation window


class Classifier(runs.Method):
    """The LMSYS classifier as a run: LoRA on the projections and the new head trained fully (peft's SEQ_CLS
    adapter saves the head as a module to save), held-out log-loss measured before and after."""

    name = "classifier"
    trainer_class = ClassifierTrainer

    section = "classifier"
    adapter_task = "SEQ_CLS"

    def tokenizer(self, directory, adapter):
        tokenizer = super().tokenizer(directory, adapter)
        tokenizer.padding_side = "right"
        return tokenizer

    def read(self, recipe, tokenizer, data_path, columns, say) -> runs.Data:
        """The rows split as the run's seed shuffles them (the Trainer's default seed when the recipe sets none),
        the training rows encoded; the held-out rows kept for `evaluate`."""
        config = sections.resolve("classifier", recipe.classifier)
        seed = recipe.training_arguments.get("seed", TrainingArguments.__dataclass_fields__["seed"].default)
        try:
            train_rows, eval_rows = held_out_split(read_rows(data_path, columns=columns), config.eval_fraction, seed)
        except InputError as error:
            raise InputError(f"{data_path}: {error}") from None
        features = [
            {
                "input_ids": encode(tokenizer, x["prompt"], x["response_a"], x["response_b"], config),
                "labels": x["label"],
            }
            for x in train_rows
        ]
        info = {
            "path": str(Path(data_path).resolve()),
            "sha256": sha256_of(data_path),
            "records": len(features),
            "held_out": len(eval_rows),
            "tokens": sum(len(f["input_ids"]) for f in features),
            "max_length": config.max_length,
            "spread_max_length": config.spread_max_length,
        }
        return runs.Data(features, info, held_out=(eval_rows, config))

    def prepare(self, recipe, directory, tokenizer, args, data, adapter, say) -> runs.Prepared:
        """The causal LM with a 3-way head, the recipe's fresh adapter or a saved classifier's (trainable); the
        held-out log-loss of that starting classifier."""
        dtype = "bfloat16" if args.bf16 else "float32"
        model, identity, weight_bytes = train.load_base(
            recipe, directory, str(args.device), dtype, model_class=AutoModelForSequenceClassification, num_labels=3
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        lora_section = {**recipe.lora, "task_type": "SEQ_CLS"} if recipe.lora else {}
        model, adapter_info = train.with_adapter(model, lora_section, args.activation_checkpointing, adapter, say)
        eval_rows, config = data.held_out
        before = log_loss(predict(model, tokenizer, eval_rows, config), [r["label"] for r in eval_rows])
        return runs.Prepared(
            data=data,
            model=model,
            identity=identity,
            weight_bytes=weight_bytes,
            adapter=adapter_info,
            # pads input_ids and attention_mask on the right; each row's label is one class, not padded
            collator=DataCollatorWithPadding(tokenizer),
            loss="cross-entropy of the 3-way head on the last non-pad token",
            results={
                "train_rows": len(data.dataset),
                "eval_rows": len(eval_rows),
                "log_loss_before": before,
                "uniform_log_loss": UNIFORM_LOG_LOSS,
            },
        )

    def evaluate(self, model, tokenizer, prepared, say) -> dict:
        eval_rows, config = prepared.data.held_out
        after = log_loss(predict(model, tokenizer, eval_rows, config), [r["label"] for r in eval_rows])
        before = prepared.results["log_loss_before"]
        say(
            f"held-out log-loss on {len(eval_rows)} rows: {before:.4f} before, {after:.4f} after; the uniform "
            f"guess scores ln 3 = {UNIFORM_LOG_LOSS:.4f}"
            + ("" if after < UNIFORM_LOG_LOSS else " - the classifier did no better than a guess")
        )
        return {"log_loss_after": after}


def run(recipe, model_dir, data_path, output_dir, adapter=None, **options) -> RunManifest:
    """A classifier run (reference.training.runs.run): options columns, say, callbacks, resume, overwrite."""
    return runs.run(Classifier(), recipe, str(model_dir), str(data_path), str(output_dir), adapter=adapter, **options)
