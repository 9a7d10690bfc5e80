"""How well a model predicts the answers of some records: loss and per-token accuracy on the answer tokens.

Each record is encoded as training encodes it (reference.methods.sft.encode_record: the recipe's format, one BOS,
cut at max_seq_length) with the prompt masked (`loss_on="response"`), so only the answer's tokens count,
whatever the recipe trains on. For every answer token t, the model's logits at the position before it give

    loss     = -(1/T) sum_t log p(x_t | x_<t)        (nats per answer token; ln(vocab) for a uniform guess)
    accuracy =  (1/T) #{t : argmax p(. | x_<t) = x_t} (how often its greedy next token is the answer's)

over all T answer tokens of the records together (a token-weighted mean, as the Trainer's loss over a batch).
The model runs in eval mode without gradients: no dropout, no NEFTune noise.

Not handled: answers cut away entirely by max_seq_length add no token (a record with none adds nothing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from reference.methods.sft import IGNORE_INDEX, collator, encode_record


@dataclass(frozen=True)
class AnswerScore:
    loss: float
    """Mean cross-entropy per answer token, in nats."""
    accuracy: float
    """Fraction of answer tokens the model's greedy prediction gets right."""
    tokens: int
    records: int

    def to_dict(self) -> dict:
        return asdict(self)


def encode_answers(tokenizer, fmt: str, rows, max_seq_length: int) -> list[dict]:
    """Records ({instruction, response}) as training encodes them, labels on the answer tokens only."""
    return [
        encode_record(tokenizer, fmt, row["instruction"], row["response"], max_seq_length, loss_on="response")
        for row in rows
    ]


def score(model, tokenizer, encoded: list[dict], batch_size: int = 16) -> AnswerScore:
    """Loss and accuracy over the answer tokens of `encoded`, batched as training batches them (padding
    never scored); see the module docstring."""
    import torch

    collate = collator(tokenizer)
    device = next(model.parameters()).device
    total_loss, correct, tokens = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start : start + batch_size])
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits.float()
            predicted, targets = logits[:, :-1], batch["labels"][:, 1:].to(device)  # position i predicts i + 1
            answer = targets != IGNORE_INDEX
            total_loss += torch.nn.functional.cross_entropy(predicted[answer], targets[answer], reduction="sum").item()
            correct += int((predicted[answer].argmax(-1) == targets[answer]).sum())
            tokens += int(answer.sum())
    if tokens == 0:
        raise ValueError("no answer token to score (every answer cut away by max_seq_length?)")
    return AnswerScore(loss=total_loss / tokens, accuracy=correct / tokens, tokens=tokens, records=len(encoded))
