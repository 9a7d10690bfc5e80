"""Retrieved few-shot prompts (reference/inference/retrieval.py) with a real sentence-transformers model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reference.errors import InputError
from reference.inference import retrieval


@pytest.fixture(scope="module")
def embedder():
    from spec.conftest import FIXTURES

    return retrieval.load_embedder(FIXTURES / "models" / "tiny-embedder")


def qa_pool(fixtures_dir) -> list[tuple[str, str]]:
    lines = (fixtures_dir / "data" / "qa111_sample.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    return [(r["input"], r["output"]) for r in rows]


def seed_prompt(pairs_most_similar_first: list[tuple[str, str]], task: str) -> str:
    """Seed 001 §2.3 run literally: search_ref_input's text over `retreived[::-1]`, then the three
    instruction lines and the task, with the seed's own string literals."""
    text = "質問・文章をよく読んで、正確で親切な回答を書きなさい。\n"
    for question, answer in pairs_most_similar_first[::-1]:  # inverse order
        text += "### 質問:\n" + question + "\n\n### 回答:\n" + answer + "\n\n\n"
    return (
        text
        + "あなたは日本語が堪能な優秀な人間です。\n"
        + "**文脈**を踏まえて、改行と箇条書きを駆使して、日本語で**詳細に**書きなさい。\n"
        + "優秀な人間になりきって、推測をいれずに根拠をもってわかりやすく答えてください。"
        + f"### 質問:\n{task}\n\n### 回答:\n"
    )


def pairs(shots) -> list[tuple[str, str]]:
    return [(shot.input, shot.output) for shot in shots]


@pytest.mark.claim("C18")
def test_the_prompt_is_the_seeds_text_with_the_most_similar_shot_last():
    """Written out by hand from seed 001 §2.3 for two shots, most similar first in the list."""
    shots = [retrieval.Shot(3, "近い質問", "近い答え", 0.9), retrieval.Shot(0, "遠い質問", "遠い答え", 0.2)]
    expected = (
        "質問・文章をよく読んで、正確で親切な回答を書きなさい。\n"
        "### 質問:\n遠い質問\n\n### 回答:\n遠い答え\n\n\n"
        "### 質問:\n近い質問\n\n### 回答:\n近い答え\n\n\n"
        "あなたは日本語が堪能な優秀な人間です。\n"
        "**文脈**を踏まえて、改行と箇条書きを駆使して、日本語で**詳細に**書きなさい。\n"
        "優秀な人間になりきって、推測をいれずに根拠をもってわかりやすく答えてください。"
        "### 質問:\n課題\n\n### 回答:\n"
    )
    assert retrieval.build_prompt(shots, "課題") == expected


@pytest.mark.claim("C18")
def test_the_top_k_are_the_most_cosine_similar_inputs_not_the_largest_dot_products(embedder, fixtures_dir):
    """The fixture embedder (static token embeddings, mean-pooled) does not normalise its vectors, so
    cosine similarity and the dot product rank differently. Expected order computed here with the
    library's own util.cos_sim over all pool inputs (ties: earlier row first); for this task the dot
    product's top 3 differ, so a ranking by dot product fails the test."""
    from sentence_transformers import util

    pool = qa_pool(fixtures_dir)
    query = "日本の首都について説明してください。"
    top = retrieval.ShotPool(pool, embedder).top(query, k=3)
    vectors, query_vector = embedder.encode([q for q, _ in pool]), embedder.encode([query])
    cosine, dot = util.cos_sim(query_vector, vectors)[0].tolist(), util.dot_score(query_vector, vectors)[0].tolist()
    by_cosine = sorted(range(len(pool)), key=lambda i: (-cosine[i], i))[:3]
    by_dot = sorted(range(len(pool)), key=lambda i: (-dot[i], i))[:3]
    assert by_cosine != by_dot  # the case tells the two apart
    assert [s.index for s in top] == by_cosine
    assert [s.score for s in top] == pytest.approx([cosine[i] for i in by_cosine], abs=1e-5)


@pytest.mark.claim("C18")
def test_a_text_is_its_own_nearest_neighbour_and_scores_fall_down_the_list(embedder, fixtures_dir):
    pool = qa_pool(fixtures_dir)
    top = retrieval.ShotPool(pool, embedder).top(pool[5][0], k=5)
    assert top[0].index == 5 and top[0].score == pytest.approx(1.0, abs=1e-5)
    assert [s.score for s in top] == sorted((s.score for s in top), reverse=True)


@pytest.mark.claim("C18")
def test_without_k_the_pool_gives_the_seeds_20_shots(embedder, fixtures_dir):
    """The seed calls search_ref_input(task["input"], 20); the fixture pool holds 24 examples."""
    pool = qa_pool(fixtures_dir)
    assert len(pool) == 24
    assert len(retrieval.ShotPool(pool, embedder).top(pool[0][0])) == 20


@pytest.mark.claim("C18", "C19", "C21")
def test_the_generate_command_defaults_to_the_seeds_k_window_and_new_tokens():
    """Seed 001: k=20 shots, max_seq_length 4096 at inference, max_new_tokens=1024."""
    from reference import cli

    args = cli.build_parser().parse_args(["generate", "--model", "m", "--tasks", "t", "--shots", "s", "--output", "o"])
    assert (args.k, args.window, args.max_new_tokens) == (20, 4096, 1024)


@pytest.mark.claim("C18")
def test_duplicate_shot_inputs_stay_apart_with_their_own_outputs(embedder):
    """The seed's dict keyed by input would give the later output twice; each example keeps its own."""
    pool = [("同じ質問です。", "一つ目の答え"), ("同じ質問です。", "二つ目の答え"), ("まったく別の話題", "別")]
    top = retrieval.ShotPool(pool, embedder).top("同じ質問です。", k=2)
    assert sorted(s.output for s in top) == ["一つ目の答え", "二つ目の答え"]
    prompt = retrieval.build_prompt(top, "同じ質問です。")
    assert "一つ目の答え" in prompt and "二つ目の答え" in prompt


@pytest.mark.claim("C21")
def test_an_overlong_prompt_drops_the_least_similar_shots_and_never_cuts_the_task(
    embedder, fixtures_dir, gemma_tokenizer
):
    pool = qa_pool(fixtures_dir)
    task = pool[0][0]
    shots = retrieval.ShotPool(pool, embedder).top(task, k=20)
    whole = retrieval.fit(shots, task, gemma_tokenizer, window=100_000)
    assert whole.dropped == 0
    window = whole.tokens // 2
    fitted = retrieval.fit(shots, task, gemma_tokenizer, window=window)
    assert fitted.tokens <= window and fitted.dropped > 0
    assert [s.index for s in fitted.shots] == [s.index for s in shots[: len(fitted.shots)]]  # the least similar went
    assert fitted.prompt.endswith(retrieval.task_text(task)) and fitted.prompt == seed_prompt(pairs(fitted.shots), task)
    one_more = retrieval.build_prompt(shots[: len(fitted.shots) + 1], task)
    assert len(gemma_tokenizer(one_more)["input_ids"]) > window  # it kept as many as fit
    with pytest.raises(InputError, match="never cut"):
        retrieval.fit(shots, task, gemma_tokenizer, window=10)


@pytest.mark.claim("C21")
def test_each_task_that_lost_shots_is_reported_by_its_number_in_the_tasks_order(
    embedder, fixtures_dir, gemma_tokenizer
):
    """k = 3 and two tasks: a short one, then the pool's first input, whose whole prompt is the longer; the
    window is one token shorter than that prompt. Only task 1 loses shots, and only it is reported."""
    pool = retrieval.ShotPool(qa_pool(fixtures_dir), embedder)
    tasks = ["春の季語", qa_pool(fixtures_dir)[0][0]]
    whole = [retrieval.fit(pool.top(task, 3), task, gemma_tokenizer, window=100_000).tokens for task in tasks]
    assert whole[0] < whole[1]
    window = whole[1] - 1
    said = []
    prompts = retrieval.fitted_prompts(tasks, pool, gemma_tokenizer, k=3, window=window, say=said.append)
    assert [p.dropped for p in prompts] == [0, 3 - len(prompts[1].shots)] and prompts[1].dropped >= 1
    assert said == [f"task 1: prompt over {window} tokens; dropped the {prompts[1].dropped} least similar shots"]


def padded_task(shots, tokenizer, tokens: int) -> str:
    """A task padded with 。 (one token each here) until the seed's prompt with all `shots` is `tokens` long."""

    def length(task: str) -> int:
        return len(tokenizer(seed_prompt(pairs(shots), task))["input_ids"])

    task = "東京について説明してください"
    padding = tokens - length(task)
    assert padding > 0
    for extra in range(padding - 5, padding + 6):
        if length(task + "。" * extra) == tokens:
            return task + "。" * extra
    raise AssertionError(f"no padding gives exactly {tokens} tokens")


@pytest.mark.claim("C21")
def test_a_prompt_of_exactly_4096_tokens_fits_the_default_window_and_4097_drops_the_least_similar_shot(gemma_tokenizer):
    """Six shots of about 620 tokens, most similar first (scores 0.9 down to 0.4); the task is padded so
    that the seed's whole prompt counts exactly 4,096 tokens with the tokenizer (BOS included): it fits
    the default window, nothing dropped. One token more (4,097) and the least similar shot (row 5) goes."""
    answer = "日本の首都は東京です。" * 120
    shots = [retrieval.Shot(i, f"質問{i}", f"{i}番目の答え。{answer}", 0.9 - i / 10) for i in range(6)]
    exactly = padded_task(shots, gemma_tokenizer, 4096)
    fitted = retrieval.fit(shots, exactly, gemma_tokenizer)
    assert (fitted.dropped, fitted.tokens) == (0, 4096) and fitted.prompt == seed_prompt(pairs(shots), exactly)
    one_over = padded_task(shots, gemma_tokenizer, 4097)
    fitted = retrieval.fit(shots, one_over, gemma_tokenizer)
    assert fitted.dropped == 1 and [s.index for s in fitted.shots] == [0, 1, 2, 3, 4]
    assert fitted.prompt == seed_prompt(pairs(shots[:5]), one_over) and fitted.tokens <= 4096


@pytest.mark.slow
@pytest.mark.claim("C19", "C18", "C21")
def test_generate_command_reports_each_prompt_over_the_window_and_writes_one_output_per_task(
    tmp_path, fixtures_dir, embedder
):
    """k = 3 and a window one token shorter than task 0's whole prompt. Expected report lines worked out
    here: the top 3 by util.cos_sim, the seed's prompt with j = 3, 2, 1, 0 of them counted with the
    model's tokenizer; a task whose prompt keeps j < 3 shots is reported with 3 - j dropped."""
    from sentence_transformers import util
    from transformers import AutoTokenizer

    model = fixtures_dir / "models" / "tiny-gemma2"
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    pool = qa_pool(fixtures_dir)
    lines = (fixtures_dir / "data" / "tasks_sample.jsonl").read_text(encoding="utf-8").splitlines()
    tasks = [json.loads(line)["input"] for line in lines]
    vectors = embedder.encode([q for q, _ in pool])

    def top3(task: str) -> list[tuple[str, str]]:
        scores = util.cos_sim(embedder.encode([task]), vectors)[0].tolist()
        return [pool[i] for i in sorted(range(len(pool)), key=lambda i: (-scores[i], i))[:3]]

    def tokens(shots, task: str) -> int:
        return len(tokenizer(seed_prompt(shots, task))["input_ids"])

    window = tokens(top3(tasks[0]), tasks[0]) - 1
    expected = []
    for number, task in enumerate(tasks):
        kept = max(j for j in range(4) if tokens(top3(task)[:j], task) <= window)
        if kept < 3:
            expected.append(f"task {number}: prompt over {window} tokens; dropped the {3 - kept} least similar shots")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "reference",
            "generate",
            "--model",
            str(model),
            "--tasks",
            str(fixtures_dir / "data" / "tasks_sample.jsonl"),
            "--shots",
            str(fixtures_dir / "data" / "qa111_sample.jsonl"),
            "--k",
            "3",
            "--window",
            str(window),
            "--max-new-tokens",
            "4",
            "--output",
            str(tmp_path / "output.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert expected[0].startswith("task 0:")
    assert [line for line in result.stderr.splitlines() if line.startswith("task ")] == expected
    rows = [json.loads(line) for line in (tmp_path / "output.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["task_id"] for r in rows] == [0, 1, 2, 3] and all(isinstance(r["output"], str) for r in rows)
    assert json.loads(result.stdout)["settings"]["batch_size"] == 8  # the default: batched, the seed's outputs


@pytest.mark.claim("C19")
def test_generate_command_names_a_missing_shots_file(tmp_path, fixtures_dir):
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "reference",
            "generate",
            "--model",
            str(fixtures_dir / "models" / "tiny-gemma2"),
            "--tasks",
            str(fixtures_dir / "data" / "qa111_sample.jsonl"),
            "--shots",
            str(tmp_path / "none.jsonl"),
            "--output",
            str(tmp_path / "o.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "none.jsonl" in bad.stderr and "Traceback" not in bad.stderr
