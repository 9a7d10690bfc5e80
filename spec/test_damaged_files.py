"""Damaged and surprising input files, as the commands meet them: each is refused with exit code 2 and one
message that names the file (and its row or line where it has one), with no traceback, every input left as it
was and nothing written; a surprise that is harmless is read as meant.

* an adapter whose adapter_model.safetensors or adapter_config.json was cut short (an interrupted copy or save),
  given to `generate`, `merge` or `continue` (reference/modeling/adapter_records.py's check_adapter_files, before peft
  or
  safetensors read it);
* a tokenizer with more tokens than the model has embedding rows (its ids past the last row would fail inside the
  model, mid-run), given to `train` or `generate` (reference/modeling/models.py's check_vocabulary); one with fewer
  tokens
  is a padded vocabulary, the normal case, and is used;
* a JSON Lines row that gives a key twice, in every file of rows a command reads (reference/records/file_faults.py's
  UNIQUE_KEYS): json and pyarrow keep one of the values without a word;
* a UTF-8 byte order mark at the start of a JSON Lines file (Windows editors write one): skipped by every reader,
  as pyarrow's loader skipped it already;
* a cut manifest.json given to `verify`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from reference.records.synthetic import magpie_records, write_jsonl
from spec.cli_runner import QA, run_cli, run_main

BOM = b"\xef\xbb\xbf"


def files_under(*paths: Path) -> dict[str, bytes]:
    """Every file at or under `paths`, by path, with its bytes: what "left as it was" compares."""
    found = {}
    for path in paths:
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            found[str(file)] = file.read_bytes()
    return found


def assert_refused(ran, named: list[str], output: Path) -> str:
    """Exit 2, one error line naming every string of `named`, no traceback, nothing on stdout, and no file written
    at or under `output` (a run directory the command made may stay, empty). Returns the error line."""
    code, out, err = ran
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert all(name in errors[0] for name in named), err
    assert "Traceback" not in err and out == ""
    assert not output.exists() or not [p for p in output.rglob("*") if p.is_file()]
    return errors[0]


def cut_in_half(path: Path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


@pytest.fixture
def inputs(tmp_path, fixtures_dir):
    """Tasks and shots for `generate` (the QA fixture's first rows), and where each command writes."""
    qa = (fixtures_dir / "data" / "qa111_sample.jsonl").read_text(encoding="utf-8").splitlines()
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "tasks.jsonl").write_text(
        "".join(json.dumps({"task_id": n, "input": json.loads(line)["input"]}) + "\n" for n, line in enumerate(qa[:2])),
        encoding="utf-8",
    )
    (folder / "shots.jsonl").write_text("\n".join(qa[2:6]) + "\n", encoding="utf-8")
    return folder


def command(name: str, model: Path, adapter: Path, inputs: Path, qa_data: Path, output: Path) -> list:
    """The argv of `name` (generate, merge, continue, continue-merge) with the adapter, writing to `output`."""
    on = ["--model", model, "--adapter", adapter]
    if name == "generate":
        return [
            "generate",
            *on,
            "--tasks",
            inputs / "tasks.jsonl",
            "--shots",
            inputs / "shots.jsonl",
            "--output",
            output,
        ]
    if name == "merge":
        return ["merge", *on, "--output", output]
    mode = ["--mode", "merge"] if name == "continue-merge" else []
    return ["continue", *mode, *on, "--data", qa_data, *QA, "--output", output, "max_steps=1", "use_cpu=true"]


# --- adapters cut short (1, 2) ---


@pytest.mark.claim("C16", "X6")
@pytest.mark.parametrize(
    "damaged, says", [("adapter_model.safetensors", "truncated"), ("adapter_config.json", "damaged or truncated")]
)
@pytest.mark.parametrize("name", ["generate", "merge", "continue", "continue-merge"])
def test_an_adapter_file_cut_short_is_named_as_damaged_by_every_command_that_loads_it(
    name, damaged, says, saved_adapter, tiny_gemma2_dir, qa_data, inputs, tmp_path
):
    """The file cut to half its bytes: the safetensors one ended in a safetensors traceback, the config in a
    message that named neither its path nor the damage. Both are named now, before peft reads either."""
    adapter = tmp_path / "adapter"
    shutil.copytree(saved_adapter, adapter)
    cut_in_half(adapter / damaged)
    before = files_under(adapter, tiny_gemma2_dir, inputs, qa_data)
    output = tmp_path / "output"
    ran = run_main(*command(name, tiny_gemma2_dir, adapter, inputs, qa_data, output))
    line = assert_refused(ran, [str(adapter / damaged), says], output)
    if damaged == "adapter_model.safetensors":
        size = (adapter / damaged).stat().st_size
        assert f"{size:,} bytes of the {2 * size:,} its header describes" in line
    else:
        assert "not valid JSON" in line
    assert files_under(adapter, tiny_gemma2_dir, inputs, qa_data) == before


def test_a_whole_adapter_passes_the_file_check_and_any_cut_of_its_weights_does_not(saved_adapter, tmp_path):
    """Every length short of the whole file is refused (the header alone, or part of it, included); the whole
    file loads."""
    from reference.errors import InputError
    from reference.modeling import lora

    assert lora.check_adapter_files(saved_adapter)["peft_type"] == "LORA"
    adapter = tmp_path / "adapter"
    shutil.copytree(saved_adapter, adapter)
    weights = (saved_adapter / "adapter_model.safetensors").read_bytes()
    for length in (0, 7, 8, 100, len(weights) // 2, len(weights) - 1):
        (adapter / "adapter_model.safetensors").write_bytes(weights[:length])
        with pytest.raises(InputError, match="adapter_model.safetensors cannot be read whole"):
            lora.check_adapter_files(adapter)


# --- a tokenizer larger than the embeddings (3) ---


@pytest.fixture
def larger_tokenizer(tiny_gemma2_dir, tmp_path):
    """tiny-gemma2 (2,862 embedding rows) with two tokens added to its tokenizer only (2,864 tokens)."""
    from reference.modeling import vocab

    model = tmp_path / "model"
    shutil.copytree(tiny_gemma2_dir, model)
    tokenizer = vocab.load_tokenizer(model)
    tokenizer.add_tokens(["<extra_0>", "<extra_1>"])
    tokenizer.save_pretrained(model)
    assert len(vocab.load_tokenizer(model)) == 2864
    return model


@pytest.mark.claim("C16")
@pytest.mark.parametrize("name", ["train", "generate", "generate --adapter", "continue"])
def test_a_tokenizer_larger_than_the_models_embeddings_is_refused_naming_both_sizes(
    name, larger_tokenizer, saved_adapter, tiny_gemma2_dir, inputs, tmp_path
):
    """Text that uses the added tokens ended in an index-out-of-range traceback inside the embedding, mid-run.
    The tokenizer is the model's own, or one saved beside an adapter (which the adapter's commands prefer)."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"input": "質問 <extra_1>", "output": "答え <extra_0>"}) + "\n", encoding="utf-8")
    tasks, shots = inputs / "tasks.jsonl", inputs / "shots.jsonl"
    tasks.write_text(json.dumps({"input": "質問 <extra_1>"}) + "\n", encoding="utf-8")
    output, model, holder = tmp_path / "output", larger_tokenizer, larger_tokenizer
    if name in ("generate --adapter", "continue"):  # the base's own tokenizer, a larger one beside the adapter
        model, holder = tiny_gemma2_dir, tmp_path / "adapter"
        shutil.copytree(saved_adapter, holder)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(larger_tokenizer / file, holder / file)
    adapter = ["--adapter", holder] if holder != model else []
    if name in ("train", "continue"):
        argv = [name, "--recipe", "llm2024", "--model", model, *adapter, "--data", data, *QA, "--output", output]
        argv += ["max_steps=1", "use_cpu=true"]
    else:
        argv = ["generate", "--model", model, *adapter, "--tasks", tasks, "--shots", shots, "--output", output]
        argv += ["--max-new-tokens", "2"]
    before = files_under(holder, model, inputs, data)
    assert_refused(run_main(*argv), [f"tokenizer {holder}", "2,864 tokens", "2,862 rows", f"model {model}"], output)
    assert files_under(holder, model, inputs, data) == before


@pytest.mark.claim("C16")
def test_a_tokenizer_smaller_than_the_embeddings_a_padded_vocabulary_is_used(tiny_gemma2_dir, inputs, tmp_path):
    """Vocabularies are often padded to a multiple of 64: 2,862 tokens on 2,880 rows generate as before."""
    from reference.modeling import models

    model, _ = models.load_causal_lm(tiny_gemma2_dir)
    model.resize_token_embeddings(2880, mean_resizing=False)
    padded = tmp_path / "padded"
    model.save_pretrained(padded)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_gemma2_dir / name, padded / name)
    assert models.embedding_rows(padded) == 2880
    output = tmp_path / "answers.jsonl"
    code, out, err = run_main(
        "generate", "--model", padded, "--tasks", inputs / "tasks.jsonl", "--shots", inputs / "shots.jsonl",
        "--output", output, "--max-new-tokens", "2",
    )  # fmt: skip
    assert code == 0, err
    assert [json.loads(line)["task_id"] for line in output.read_text(encoding="utf-8").splitlines()] == [0, 1]


# --- a key given twice in a row (4) ---


REPEATED = '{"input": "一", "input": "二", "output": "三"}'


@pytest.mark.claim("P2")
@pytest.mark.parametrize(
    "name, row, where",
    [
        ("train", REPEATED, "row 2 (line 2): key 'input'"),
        ("generate --tasks", REPEATED, "line 2: key 'input'"),
        ("generate --shots", REPEATED, "line 2: key 'input'"),
        ("dpo", '{"prompt": "p", "chosen": "a", "chosen": "b", "rejected": "c"}', "line 2: key 'chosen'"),
        (
            "preference",
            '{"prompt": "p", "response_a": "a", "response_b": "b", "response_b": "c"}',
            "line 2: key 'response_b'",
        ),
        ("filter --strict", '{"instruction": "a", "instruction": "b", "response": "c"}', "line 2: key 'instruction'"),
    ],
)
def test_a_row_that_gives_a_key_twice_is_refused_naming_file_line_and_key(
    name, row, where, tiny_gemma2_dir, inputs, fixtures_dir, tmp_path
):
    """Which of the two values was meant cannot be told; the last one was taken without a word (the filter's
    parser, tasks, shots, DPO pairs, preference rows), or the datasets loader failed naming no row."""
    good = {
        "train": '{"input": "一", "output": "三"}',
        "generate --tasks": '{"input": "一"}',
        "generate --shots": '{"input": "一", "output": "三"}',
        "dpo": '{"prompt": "p", "chosen": "a", "rejected": "c"}',
        "preference": (fixtures_dir / "data" / "lmsys_sample.jsonl").read_text(encoding="utf-8").splitlines()[0],
        "filter --strict": '{"instruction": "a", "response": "c"}',
    }[name]
    data = inputs / "rows.jsonl"
    data.write_text(f"{good}\n{row}\n", encoding="utf-8")
    output = tmp_path / "output"
    model = ["--model", tiny_gemma2_dir]
    tasks, shots = inputs / "tasks.jsonl", inputs / "shots.jsonl"
    argv = {
        "train": ["train", "--recipe", "llm2024", *model, "--data", data, *QA, "--output", output, "use_cpu=true"],
        "generate --tasks": ["generate", *model, "--tasks", data, "--shots", shots, "--output", output],
        "generate --shots": ["generate", *model, "--tasks", tasks, "--shots", data, "--output", output],
        "dpo": ["dpo", *model, "--data", data, "--output", output],
        "preference": ["preference", "train", *model, "--data", data, "--output", output],
        "filter --strict": ["filter", "--input", data, "--output", output, "--rejects", tmp_path / "rejects.jsonl"],
    }[name] + (["--strict"] if name == "filter --strict" else [])
    before = files_under(inputs, tiny_gemma2_dir)
    assert_refused(run_main(*argv), [f"{data}, {where}", "appears twice"], output)
    assert files_under(inputs, tiny_gemma2_dir) == before and not (tmp_path / "rejects.jsonl").exists()


@pytest.mark.claim("C9")
def test_the_filter_rejects_a_row_that_gives_a_key_twice_as_unreadable_naming_the_key(tmp_path):
    """Without --strict an unreadable row is a reject with its rule and why, like any other."""
    data = tmp_path / "in.jsonl"
    data.write_text('{"instruction": "a", "instruction": "b", "response": "c"}\n', encoding="utf-8")
    rejects = tmp_path / "rejects.jsonl"
    code, _, err = run_main("filter", "--input", data, "--output", tmp_path / "kept.jsonl", "--rejects", rejects)
    assert code == 0, err
    reject = json.loads(rejects.read_text(encoding="utf-8"))
    assert (reject["line"], reject["rule"]) == (1, "unreadable")
    assert reject["detail"] == "key 'instruction' appears twice in one object"


# --- a byte order mark at the start of a JSON Lines file (5) ---


@pytest.mark.claim("C9")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_filter_reads_a_file_that_starts_with_a_byte_order_mark_as_the_same_file_without_it(workers, tmp_path):
    """Line 1 was rejected as unreadable ("Expecting value"). With the mark skipped, the outputs are byte for byte
    those of the file without it, in one process and in forked workers (the input is over the 1 MiB below which
    one process reads it)."""
    plain = tmp_path / "plain.jsonl"
    write_jsonl(magpie_records(1500, seed=3), plain)
    assert plain.stat().st_size > 1 << 20
    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(BOM + plain.read_bytes())
    outputs = {}
    for source in (plain, marked):
        kept, rejects = tmp_path / f"{source.stem}-kept.jsonl", tmp_path / f"{source.stem}-rejects.jsonl"
        ran = run_cli("filter", "--input", source, "--output", kept, "--rejects", rejects, "--workers", workers)
        assert ran.returncode == 0, ran.stderr
        chars = kept.with_suffix(".chars.tsv")
        outputs[source] = (kept.read_bytes(), rejects.read_bytes(), chars.read_bytes())
    assert outputs[marked] == outputs[plain]
    assert b"unreadable" not in outputs[marked][1]


@pytest.mark.claim("C18")
def test_generate_reads_tasks_and_shots_that_start_with_a_byte_order_mark(tiny_gemma2_dir, inputs, tmp_path):
    """Both files were refused at line 1 ("not JSON: Unexpected UTF-8 BOM"), where the training data, read by
    the datasets loader, was taken with its mark; every JSON Lines reader now takes it."""
    for name in ("tasks.jsonl", "shots.jsonl"):
        (inputs / name).write_bytes(BOM + (inputs / name).read_bytes())
    output = tmp_path / "answers.jsonl"
    code, _, err = run_main(
        "generate", "--model", tiny_gemma2_dir, "--tasks", inputs / "tasks.jsonl", "--shots", inputs / "shots.jsonl",
        "--output", output, "--max-new-tokens", "2",
    )  # fmt: skip
    assert code == 0, err
    assert [json.loads(line)["task_id"] for line in output.read_text(encoding="utf-8").splitlines()] == [0, 1]


# --- verify with a cut manifest ---


@pytest.mark.claim("X2")
def test_verify_names_a_manifest_cut_short_with_exit_2(fixtures_dir, tmp_path):
    """A run directory whose manifest.json lost its second half (a copy that stopped) is bad input, not a run
    that differs: exit 2 naming the file, both manifests left as they were."""
    runs = {}
    for name in ("a", "b"):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        shutil.copy(fixtures_dir / "reference-run" / "sft" / "manifest.json", runs[name] / "manifest.json")
    cut_in_half(runs["b"] / "manifest.json")
    before = files_under(tmp_path)
    line = assert_refused(run_main("verify", runs["a"], runs["b"]), [str(runs["b"] / "manifest.json")], tmp_path / "x")
    assert "not a readable manifest" in line and files_under(tmp_path) == before
