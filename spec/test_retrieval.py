"""Retrieved few-shot prompts (reference/retrieval.py) with a real sentence-transformers model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reference import retrieval
from reference.errors import InputError


@pytest.fixture(scope="module")
def embedder():
    from spec.conftest import FIXTURES

    return retrieval.load_embedder(FIXTURES / "models" / "tiny-embedder")


def qa_pool(fixtures_dir) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (fixtures_dir / "data" / "qa111_sample.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(r["input"], r["output"]) for r in rows]


@pytest.mark.claim("C18")
def test_the_prompt_is_the_seeds_text_with_the_most_similar_shot_last():
    """Written out by hand from seed 001 §2.3 for two shots, most similar first in the list."""
    shots = [retrieval.Shot(3, "近い質問", "近い答え", 0.9), retrieval.Shot(0, "遠い質問", "遠い答え", 0.2)]
    expected = ("質問・文章をよく読んで、正確で親切な回答を書きなさい。\n"
                "### 質問:\n遠い質問\n\n### 回答:\n遠い答え\n\n\n"
                "### 質問:\n近い質問\n\n### 回答:\n近い答え\n\n\n"
                "あなたは日本語が堪能な優秀な人間です。\n"
                "**文脈**を踏まえて、改行と箇条書きを駆使して、日本語で**詳細に**書きなさい。\n"
                "優秀な人間になりきって、推測をいれずに根拠をもってわかりやすく答えてください。"
                "### 質問:\n課題\n\n### 回答:\n")
    assert retrieval.build_prompt(shots, "課題") == expected


@pytest.mark.claim("C18")
def test_the_top_k_are_the_most_cosine_similar_inputs(embedder, fixtures_dir):
    """Expected order computed here with the library's own cosine similarity over all pool inputs."""
    from sentence_transformers import util

    pool = qa_pool(fixtures_dir)
    query = pool[5][0]
    top = retrieval.ShotPool(pool, embedder).top(query, k=20)
    scores = util.cos_sim(embedder.encode([query]), embedder.encode([q for q, _ in pool]))[0].tolist()
    expected = sorted(range(len(pool)), key=lambda i: (-scores[i], i))[:20]
    assert [s.index for s in top] == expected and top[0].index == 5  # a text is its own nearest neighbour
    assert [s.score for s in top] == sorted((s.score for s in top), reverse=True)


@pytest.mark.claim("C18")
def test_duplicate_shot_inputs_stay_apart_with_their_own_outputs(embedder):
    """The seed's dict keyed by input would give the later output twice; each example keeps its own."""
    pool = [("同じ質問です。", "一つ目の答え"), ("同じ質問です。", "二つ目の答え"), ("まったく別の話題", "別")]
    top = retrieval.ShotPool(pool, embedder).top("同じ質問です。", k=2)
    assert sorted(s.output for s in top) == ["一つ目の答え", "二つ目の答え"]
    prompt = retrieval.build_prompt(top, "同じ質問です。")
    assert "一つ目の答え" in prompt and "二つ目の答え" in prompt


@pytest.mark.claim("C21")
def test_an_overlong_prompt_drops_the_least_similar_shots_and_never_cuts_the_task(embedder, fixtures_dir, gemma_tokenizer):
    pool = qa_pool(fixtures_dir)
    task = pool[0][0]
    shots = retrieval.ShotPool(pool, embedder).top(task, k=20)
    whole = retrieval.fit(shots, task, gemma_tokenizer, window=100_000)
    assert whole.dropped == 0
    window = whole.tokens // 2
    fitted = retrieval.fit(shots, task, gemma_tokenizer, window=window)
    assert fitted.tokens <= window and fitted.dropped > 0
    assert [s.index for s in fitted.shots] == [s.index for s in shots[:len(fitted.shots)]]  # the least similar went
    assert fitted.prompt.endswith(retrieval.task_text(task))
    one_more = retrieval.build_prompt(shots[:len(fitted.shots) + 1], task)
    assert len(gemma_tokenizer(one_more)["input_ids"]) > window  # it kept as many as fit
    with pytest.raises(InputError, match="never cut"):
        retrieval.fit(shots, task, gemma_tokenizer, window=10)


@pytest.mark.claim("C19", "C18")
def test_generate_command_writes_one_output_per_task(tmp_path, fixtures_dir):
    result = subprocess.run([sys.executable, "-m", "reference", "generate", "--model", str(fixtures_dir / "models" / "tiny-gemma2"),
                             "--tasks", str(fixtures_dir / "data" / "tasks_sample.jsonl"),
                             "--shots", str(fixtures_dir / "data" / "qa111_sample.jsonl"), "--k", "3",
                             "--max-new-tokens", "4", "--output", str(tmp_path / "output.jsonl")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "output.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["task_id"] for r in rows] == [0, 1, 2, 3] and all(isinstance(r["output"], str) for r in rows)
    bad = subprocess.run([sys.executable, "-m", "reference", "generate", "--model", str(fixtures_dir / "models" / "tiny-gemma2"),
                          "--tasks", str(fixtures_dir / "data" / "qa111_sample.jsonl"), "--shots", str(tmp_path / "none.jsonl"),
                          "--output", str(tmp_path / "o.jsonl")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "none.jsonl" in bad.stderr and "Traceback" not in bad.stderr
