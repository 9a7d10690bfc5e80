"""Few-shot prompts from retrieved examples, as seed 001 §2.3 builds them.

For each task, the k (20) examples of the shot pool (Japanese-QA111: input/output) whose inputs are
most similar to the task's input are put before it, the most similar LAST, nearest the question (the
seed found similar examples worked better late in the prompt). The prompt, verbatim from the seed:

    質問・文章をよく読んで、正確で親切な回答を書きなさい。\n
    ### 質問:\n{input}\n\n### 回答:\n{output}\n\n\n          (k times, least similar first)
    あなたは日本語が堪能な優秀な人間です。\n
    **文脈**を踏まえて、改行と箇条書きを駆使して、日本語で**詳細に**書きなさい。\n
    優秀な人間になりきって、推測をいれずに根拠をもってわかりやすく答えてください。
    ### 質問:\n{task}\n\n### 回答:\n

(the third instruction line runs straight into "### 質問:" with no newline, as in the seed).

Departures: the seed searched with ColBERT (RAGatouille, JaColBERTv2); here any local
sentence-transformers model embeds the inputs and similarity is cosine. The seed looked outputs up in
a dict keyed by input text, so two examples with the same input collapsed into one (the later output
twice); here each example keeps its own output. When a prompt is longer than the inference window
(4096 tokens in the seed), or than the model's context (its max_position_embeddings) when that is
shorter, the least similar examples are dropped until it fits, and that is reported; the task itself
is never cut (a task that does not fit alone is an error naming it, its length and the limit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reference.errors import InputError

HEADER = "質問・文章をよく読んで、正確で親切な回答を書きなさい。\n"
INSTRUCTIONS = (
    "あなたは日本語が堪能な優秀な人間です。\n"
    "**文脈**を踏まえて、改行と箇条書きを駆使して、日本語で**詳細に**書きなさい。\n"
    "優秀な人間になりきって、推測をいれずに根拠をもってわかりやすく答えてください。"
)
DEFAULT_K = 20
DEFAULT_WINDOW = 4096


def shot_text(question: str, answer: str) -> str:
    return "### 質問:\n" + question + "\n\n### 回答:\n" + answer + "\n\n\n"


def task_text(task: str) -> str:
    return f"### 質問:\n{task}\n\n### 回答:\n"


def build_prompt(shots_most_similar_first: list[Shot], task: str) -> str:
    """The seed's prompt: header, the shots with the most similar last, the instructions, the task."""
    return (
        HEADER
        + "".join(shot_text(s.input, s.output) for s in reversed(shots_most_similar_first))
        + INSTRUCTIONS
        + task_text(task)
    )


@dataclass(frozen=True)
class Shot:
    index: int
    """Row of the shot pool (duplicates of an input stay apart)."""
    input: str
    output: str
    score: float
    """Cosine similarity to the task's input."""


def read_shots(path: str | Path, columns: dict | None = None) -> list[tuple[str, str]]:
    """The shot pool: (input, output) from JSONL rows with non-empty 'input' and 'output' (Japanese-QA111's);
    `columns` names the file's columns for them (reference.records.data.parse_columns)."""
    from reference.records.data import read_text_rows

    columns = {name: (columns or {}).get(name, name) for name in ("input", "output")}
    return [(row["input"], row["output"]) for row in read_text_rows(path, ("input", "output"), columns=columns)]


def load_embedder(path: str | Path):
    """A sentence-transformers model from a local directory (no hub, no remote code)."""
    directory = Path(path)
    if not (directory / "modules.json").is_file():
        raise InputError(f"embedder {path}: not a local sentence-transformers directory (no modules.json)")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(directory), local_files_only=True, trust_remote_code=False, device="cpu")


class ShotPool:
    """The examples and their embeddings (unit length, so a dot product is the cosine similarity)."""

    def __init__(self, examples: list[tuple[str, str]], embedder):
        if not examples:
            raise InputError("the shot pool is empty")
        self.examples = examples
        self.embedder = embedder
        self.vectors = embedder.encode([q for q, _ in examples], normalize_embeddings=True, convert_to_tensor=True)

    def top(self, query: str, k: int = DEFAULT_K) -> list[Shot]:
        """The k most similar examples, most similar first (ties: earlier row first)."""
        query_vector = self.embedder.encode([query], normalize_embeddings=True, convert_to_tensor=True)[0]
        scores = (self.vectors @ query_vector).tolist()
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
        return [Shot(i, *self.examples[i], scores[i]) for i in order]


@dataclass
class FittedPrompt:
    prompt: str
    shots: list
    """The shots kept, most similar first."""
    dropped: int
    """Least similar shots left out so that the prompt fits the window."""
    tokens: int


def fit(
    shots: list[Shot],
    task: str,
    tokenizer,
    window: int = DEFAULT_WINDOW,
    name: str = "the task",
    context: int | None = None,
) -> FittedPrompt:
    """The prompt with as many of the most similar shots as fit in `window` tokens (BOS included), and in the
    model's `context` (its max_position_embeddings) when given and shorter. A task that does not fit alone is
    an error naming it (`name`), its length and each limit it passes."""

    def length(prompt: str) -> int:
        return len(tokenizer(prompt)["input_ids"])

    limit = window if context is None else min(window, context)
    kept = list(shots)
    prompt = build_prompt(kept, task)
    while length(prompt) > limit and kept:
        kept.pop()  # the least similar is the last of most-similar-first
        prompt = build_prompt(kept, task)
    tokens = length(prompt)
    if tokens > limit:
        over = [f"the {window}-token window (--window)"] if tokens > window else []
        if context is not None and tokens > context:
            over.append(
                f"the {context} tokens the model's context leaves for a prompt (max_position_embeddings less "
                "the answer's max_new_tokens)"
            )
        raise InputError(
            f"{name}: the task alone takes {tokens} tokens, more than {' and '.join(over)}; it is never cut"
        )
    return FittedPrompt(prompt, kept, len(shots) - len(kept), tokens)


def fitted_prompts(
    tasks: list[str],
    pool: ShotPool,
    tokenizer,
    k: int = DEFAULT_K,
    window: int = DEFAULT_WINDOW,
    say=print,
    names: list[str] | None = None,
    context: int | None = None,
) -> list[FittedPrompt]:
    """Each task's prompt from its k most similar shots, fitted to `window` (and to the model's `context`, when
    given and shorter: said once); a task that lost shots is reported through `say`, numbered from 0 in the
    tasks' order. A task that does not fit alone is an error naming it: `names[i]` (e.g. its task_id and
    line), else its number."""
    limit = window if context is None else min(window, context)
    if limit < window:
        say(
            f"the {window}-token window is longer than what the model's context leaves for a prompt ({context} "
            f"tokens: max_position_embeddings less the answer's max_new_tokens): prompts are fitted to {context} tokens"
        )
    prompts = []
    for number, task in enumerate(tasks):
        name = names[number] if names is not None else f"task {number}"
        fitted = fit(pool.top(task, k), task, tokenizer, window, name, context)
        if fitted.dropped:
            say(f"task {number}: prompt over {limit} tokens; dropped the {fitted.dropped} least similar shots")
        prompts.append(fitted)
    return prompts
