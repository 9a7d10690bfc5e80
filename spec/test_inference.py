"""A model and its adapter loaded for inference, and tasks answered from Python (reference/inference/generation.py).

One tokenizer rule for an adapter: its own when its directory holds one (train saves it there, with any
tokens it added), else the base model's. peft's PeftModel.from_pretrained computes the expected logits.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from reference import cli
from reference.errors import InputError
from reference.inference import generation, retrieval
from spec.cli_runner import run_main

ADDED = "<user_name>"


@pytest.fixture(scope="module")
def adapter_dir(tiny_gemma2_dir, tmp_path_factory):
    """A LoRA adapter (r=2 on q_proj and v_proj) saved by peft, its B set to random values so that it
    changes the logits, with no tokenizer beside it."""
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_gemma2_dir))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5)
    directory = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture
def adapter_with_tokenizer(adapter_dir, tiny_gemma2_dir, tmp_path):
    """The same adapter with a tokenizer of its own saved beside it (the base's, with another model_max_length: a
    tokenizer with more tokens than the base's embeddings is refused, spec/test_damaged_files.py)."""
    from transformers import AutoTokenizer

    directory = tmp_path / "adapter"
    shutil.copytree(adapter_dir, directory)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_gemma2_dir))
    tokenizer.model_max_length = 1234
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.claim("C16")
def test_an_adapter_that_saved_a_tokenizer_brings_its_own(tiny_gemma2_dir, adapter_with_tokenizer):
    """The adapter's tokenizer is the one loaded: its own model_max_length (the base's tokenizer says otherwise)."""
    _, tokenizer = generation.load_for_inference(tiny_gemma2_dir, adapter_with_tokenizer)
    assert tokenizer.model_max_length == 1234 and len(tokenizer) == 2862


@pytest.mark.claim("C16")
def test_an_adapter_without_a_tokenizer_uses_the_base_models(tiny_gemma2_dir, adapter_dir):
    """`generate --adapter` once read the tokenizer from the adapter's directory alone (an OSError here)."""
    assert not (adapter_dir / "tokenizer_config.json").exists()
    _, tokenizer = generation.load_for_inference(tiny_gemma2_dir, adapter_dir)
    assert len(tokenizer) == 2862 and ADDED not in tokenizer.get_vocab()


@pytest.mark.claim("C16")
def test_a_model_directory_without_tokenizer_files_is_refused_not_given_an_empty_tokenizer(tiny_gemma2_dir, tmp_path):
    """transformers 5 builds a 5-token tokenizer from config.json alone (shown first, with the library), which
    would turn every prompt into unknown tokens; the project refuses the directory, naming it."""
    from transformers import AutoTokenizer

    from reference.modeling import lora

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_gemma2_dir / name, bare / name)
    assert len(AutoTokenizer.from_pretrained(str(bare), local_files_only=True)) == 5
    with pytest.raises(InputError, match=f"model {bare}: no tokenizer"):
        lora.load_tokenizer(bare)


@pytest.mark.claim("C16")
def test_the_model_for_inference_carries_the_frozen_adapter_in_eval_mode(tiny_gemma2_dir, adapter_dir):
    """The logits equal peft's PeftModel.from_pretrained on a fresh base (and differ from the base's own)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tokenizer = generation.load_for_inference(tiny_gemma2_dir, adapter_dir)
    assert isinstance(model, PeftModel) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    inputs = tokenizer("日本の首都はどこですか。", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_gemma2_dir)).eval()
    with torch.no_grad():
        plain = base(**inputs).logits
        theirs = PeftModel.from_pretrained(base, str(adapter_dir)).eval()(**inputs).logits
        ours = model(**inputs).logits
    assert not torch.allclose(plain, theirs)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.claim("C18", "C19", "C21")
def test_answering_tasks_retrieves_fits_and_generates_each_task_in_order(tiny_gemma2_dir, fixtures_dir):
    """Three tasks, the second without a task_id (its position, 1, stands in), batch 2. The window is one
    token shorter than the first task's prompt with k = 2 shots, so that task loses a shot and is reported.
    The prompts, their lengths and the outputs are the parts' own (retrieval.fitted_prompts, generate)."""
    inputs = [
        "日本の首都について説明してください。",
        "富士山の高さと特徴を教えてください。",
        "春の季語を三つ挙げてください。",
    ]
    tasks = [{"task_id": "a", "input": inputs[0]}, {"input": inputs[1]}, {"task_id": 7, "input": inputs[2]}]
    shots = retrieval.read_shots(fixtures_dir / "data" / "qa111_sample.jsonl")
    embedder = fixtures_dir / "models" / "tiny-embedder"
    model, tokenizer = generation.load_for_inference(tiny_gemma2_dir)
    pool = retrieval.ShotPool(shots, retrieval.load_embedder(embedder))
    window = retrieval.fit(pool.top(inputs[0], 2), inputs[0], tokenizer, 100_000).tokens - 1
    config = generation.seed_generation_config(tokenizer, max_new_tokens=3)
    said = []
    answers = generation.answer_tasks(
        model, tokenizer, tasks, shots, embedder, config, k=2, window=window, batch_size=2, say=said.append
    )
    prompts = retrieval.fitted_prompts(inputs, pool, tokenizer, 2, window, say=lambda text: None)
    assert answers.task_ids == ["a", 1, 7]
    assert answers.prompt_tokens == [len(tokenizer(p.prompt)["input_ids"]) for p in prompts]
    assert answers.outputs == generation.generate(model, tokenizer, [p.prompt for p in prompts], config)
    assert prompts[0].dropped == 1
    assert said == [
        f"task {n}: prompt over {window} tokens; dropped the {p.dropped} least similar shots"
        for n, p in enumerate(prompts)
        if p.dropped
    ]


def test_tasks_and_shots_are_read_from_jsonl_rows(fixtures_dir, tmp_path):
    """The fixture's four tasks carry task_ids 0-3; its 24 shots are (input, output) pairs. A row without
    an input is an error naming the file and line."""
    tasks = generation.read_tasks(fixtures_dir / "data" / "tasks_sample.jsonl")
    assert [t["task_id"] for t in tasks] == [0, 1, 2, 3] and tasks[0]["input"] == "日本の首都について説明してください。"
    rows = [json.loads(line) for line in (fixtures_dir / "data" / "qa111_sample.jsonl").read_text().splitlines()]
    assert retrieval.read_shots(fixtures_dir / "data" / "qa111_sample.jsonl") == [
        (r["input"], r["output"]) for r in rows
    ]
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"input": "ok"}\n{"task_id": 1}\n', encoding="utf-8")
    with pytest.raises(InputError, match="tasks.jsonl, line 2: needs non-empty text in input"):
        generation.read_tasks(bad)


@pytest.mark.claim("C16", "C19")
def test_the_generate_command_answers_with_an_adapter_that_saved_no_tokenizer(
    tiny_gemma2_dir, adapter_dir, fixtures_dir, tmp_path, capsys
):
    """The base's tokenizer is used; one output row per task (the fixture has four)."""
    output = tmp_path / "output.jsonl"
    data = fixtures_dir / "data"
    argv = ["generate", "--model", str(tiny_gemma2_dir), "--adapter", str(adapter_dir)]
    argv += ["--tasks", str(data / "tasks_sample.jsonl"), "--shots", str(data / "qa111_sample.jsonl")]
    argv += ["--k", "1", "--max-new-tokens", "2", "--batch-size", "4", "--output", str(output)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["task_id"] for r in rows] == [0, 1, 2, 3]
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["max_new_tokens"] == 2 and report["settings"]["batch_size"] == 4


def alone(tokenizer, task: str) -> int:
    """Tokens of a task's prompt with no shot at all: the least it can be fitted to."""
    return retrieval.fit([], task, tokenizer, 100_000).tokens


LONG_TASK = "日本の首都について説明してください。" + "東京の歴史と文化を詳しく教えてください。" * 6
"""A task far longer than tasks_sample.jsonl's, so that it alone passes a window or context the others fit."""


@pytest.mark.claim("C21")
def test_a_task_longer_than_the_models_context_is_refused_naming_it_and_both_lengths(tiny_gemma2_dir, fixtures_dir):
    """The model's context (its config's max_position_embeddings, here lowered to the first task's prompt with
    no shot plus the answer's 3 new tokens) binds before the 4096-token window: what it leaves for a prompt is said
    once, the first task drops both its shots to fit it, and the second, which does not fit alone, is refused
    before anything is generated, named by its task_id and place, with its length and the room. (It used to be
    answered, with only transformers' warning about positions past the context.)"""
    model, tokenizer = generation.load_for_inference(tiny_gemma2_dir)
    short = "日本の首都について説明してください。"
    room = alone(tokenizer, short)
    model.config.max_position_embeddings = room + 3
    assert alone(tokenizer, LONG_TASK) > room
    tasks = [{"task_id": "short", "input": short}, {"task_id": "long", "input": LONG_TASK}]
    shots = retrieval.read_shots(fixtures_dir / "data" / "qa111_sample.jsonl")
    config = generation.seed_generation_config(tokenizer, max_new_tokens=3)
    said = []
    with pytest.raises(InputError) as refused:
        embedder = fixtures_dir / "models" / "tiny-embedder"
        generation.answer_tasks(model, tokenizer, tasks, shots, embedder, config, k=2, say=said.append)
    assert str(refused.value) == (
        f"task_id 'long' (number 1): the task alone takes {alone(tokenizer, LONG_TASK)} tokens, more than the "
        f"{room} tokens the model's context leaves for a prompt (max_position_embeddings less the answer's "
        "max_new_tokens); it is never cut"
    )
    assert said == [
        f"the 4096-token window is longer than what the model's context leaves for a prompt ({room} tokens: "
        f"max_position_embeddings less the answer's max_new_tokens): prompts are fitted to {room} tokens",
        f"task 0: prompt over {room} tokens; dropped the 2 least similar shots",
    ]


@pytest.mark.claim("C21")
def test_an_answer_as_long_as_the_models_context_is_refused(tiny_gemma2_dir, fixtures_dir):
    """max_new_tokens equal to max_position_embeddings leaves no room for any prompt: refused, naming both."""
    model, tokenizer = generation.load_for_inference(tiny_gemma2_dir)
    config = generation.seed_generation_config(tokenizer, max_new_tokens=model.config.max_position_embeddings)
    tasks = [{"task_id": "short", "input": "日本の首都は？"}]
    shots = retrieval.read_shots(fixtures_dir / "data" / "qa111_sample.jsonl")
    embedder = fixtures_dir / "models" / "tiny-embedder"
    with pytest.raises(InputError, match="the answer alone would fill the model's context"):
        generation.answer_tasks(model, tokenizer, tasks, shots, embedder, config, k=2, say=lambda _: None)


@pytest.mark.claim("C21")
def test_the_generate_command_names_the_task_that_does_not_fit_the_window_by_its_task_id_and_line(
    tiny_gemma2_dir, fixtures_dir, tmp_path
):
    """The window fits the first task's prompt with no shot but not the long task, on line 3 of the tasks file
    (line 2 is blank, so its place, 1, is not its line). `generate` exits 2 naming it, its length and the
    window (it used to say only "the task alone takes N tokens"), and writes nothing."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_gemma2_dir))
    tasks = tmp_path / "tasks.jsonl"
    rows = [{"task_id": 0, "input": "日本の首都について説明してください。"}, {"task_id": "long", "input": LONG_TASK}]
    tasks.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    window = alone(tokenizer, rows[0]["input"])
    argv = ["generate", "--model", tiny_gemma2_dir, "--tasks", tasks]
    argv += ["--shots", fixtures_dir / "data" / "qa111_sample.jsonl", "--k", "1", "--window", window]
    code, _, err = run_main(*argv, "--max-new-tokens", "1", "--output", tmp_path / "output.jsonl")
    assert code == 2
    assert (
        f"error: task_id 'long' ({tasks}, line 3): the task alone takes {alone(tokenizer, LONG_TASK)} tokens, "
        f"more than the {window}-token window (--window); it is never cut"
    ) in err
    assert not (tmp_path / "output.jsonl").exists()


SEEDS_ZERO_SHOT = (
    "質問・文章をよく読んで、正確で親切な回答を書きなさい。\n"
    "あなたは日本語が堪能な優秀な人間です。\n"
    "**文脈**を踏まえて、改行と箇条書きを駆使して、日本語で**詳細に**書きなさい。\n"
    "優秀な人間になりきって、推測をいれずに根拠をもってわかりやすく答えてください。"
    "### 質問:\n{task}\n\n### 回答:\n"
)
"""Seed 001 §2.3's prompt with no example between its header and its instructions, written out here."""


@pytest.mark.claim("C18")
def test_generate_answers_one_prompt_zero_shot_with_the_seeds_prompt_and_no_examples(
    tiny_gemma2_dir, gemma_tokenizer, capsys
):
    """`generate --prompt TEXT` without --shots: the prompt is the seed's with no examples (so no embedder loads),
    its tokens those of that text with BOS; the answer is printed, no file written."""
    task = "日本の首都について説明してください。"
    argv = ["generate", "--model", str(tiny_gemma2_dir), "--prompt", task, "--max-new-tokens", "3"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["prompt_tokens"] == len(gemma_tokenizer(SEEDS_ZERO_SHOT.format(task=task))["input_ids"])
    assert isinstance(report["answer"], str) and report["output"] is None and report["shots"] == 0


@pytest.mark.claim("C18")
def test_generate_with_shots_named_by_columns_retrieves_from_them(tiny_gemma2_dir, fixtures_dir, tmp_path, capsys):
    """A shot pool whose columns are question/answer, named by --columns, gives the prompt the QA111 file gives
    (the same examples retrieved); --prompt with --shots is few-shot."""
    rows = [json.loads(line) for line in (fixtures_dir / "data" / "qa111_sample.jsonl").read_text().splitlines()]
    renamed = tmp_path / "shots.jsonl"
    renamed.write_text(
        "".join(json.dumps({"question": r["input"], "answer": r["output"]}, ensure_ascii=False) + "\n" for r in rows),
        encoding="utf-8",
    )
    base = ["generate", "--model", str(tiny_gemma2_dir), "--prompt", "富士山", "--max-new-tokens", "1", "--k", "2"]
    tokens = []
    for shots in (["--shots", str(fixtures_dir / "data" / "qa111_sample.jsonl")], ["--shots", str(renamed)]):
        extra = ["--columns", "input=question,output=answer"] if shots[1] == str(renamed) else []
        assert cli.main([*base, *shots, *extra]) == 0, capsys.readouterr().err
        tokens.append(json.loads(capsys.readouterr().out)["prompt_tokens"])
    zero = cli.main(["generate", "--model", str(tiny_gemma2_dir), "--prompt", "富士山", "--max-new-tokens", "1"])
    assert zero == 0
    assert tokens[0] == tokens[1] > json.loads(capsys.readouterr().out)["prompt_tokens"]


@pytest.mark.claim("C18")
def test_generate_with_tasks_needs_shots_and_an_output(tiny_gemma2_dir, fixtures_dir, tmp_path):
    tasks = fixtures_dir / "data" / "tasks_sample.jsonl"
    code, out, err = run_main("generate", "--model", tiny_gemma2_dir, "--tasks", tasks, "--output", tmp_path / "o")
    assert code == 2 and "--tasks needs --shots" in err and out == ""
