"""What a `train` or `continue` run refuses, and how it says so (reference/methods/train.py,
reference/modeling/lora.py).

A2: a saved adapter loaded frozen (peft's default, is_trainable=False: seed 000's "it only learned the new
data") leaves nothing to train, and the run refuses before any step, naming the adapter it loaded; a fresh
run says it created its adapter. P2, L3: a malformed data row, a missing model or a bad recipe key is named
(file, row, key) with exit code 2 and no traceback, and nothing is written. The A2 tests continue the QLoRA
run of spec/sft_runs.py (the `sft_runs` fixture, shared with spec/test_train.py).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from reference import cli
from reference.errors import InputError
from reference.modeling import lora
from spec.cli_runner import QA, run_cli
from spec.observe import Observed, run_recipe
from spec.sft_runs import RUN, recipe_for

# ------------------------------------------------------------------ A2: nothing trainable is refused


def frozen_load(model, adapter_dir, trainable=True):
    """The user's mistake of seed 000: peft's default load, is_trainable=False, whatever was asked for."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir))


def nothing_written(output: Path) -> bool:
    written = [p for p in output.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors")]
    return not output.exists() or not written


@pytest.mark.slow
@pytest.mark.claim("A2")
def test_continuing_an_adapter_loaded_frozen_is_refused_before_any_step(
    sft_runs, tmp_path, monkeypatch, tiny_gemma2_dir
):
    """train.run with adapter=...: the saved adapter loaded as peft does by default has no trainable weight;
    the run says it loaded (not created) the adapter and refuses with the reason before the Trainer is built."""
    run = sft_runs("nf4")
    monkeypatch.setattr(lora, "load_adapter", frozen_load)
    observed = Observed()
    with pytest.raises(InputError) as error:
        run_recipe(
            recipe_for("nf4", run.device),
            tiny_gemma2_dir,
            run.data,
            tmp_path / "out",
            observed,
            adapter=str(run.output),
        )
    assert f"adapter loaded from {run.output}, not created" in str(error.value) and "is_trainable" in str(error.value)
    assert not hasattr(observed, "trainer") and nothing_written(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.claim("A2")
def test_the_continue_command_refuses_a_frozen_adapter_with_exit_2_and_writes_nothing(
    sft_runs, tmp_path, monkeypatch, capsys, tiny_gemma2_dir
):
    run = sft_runs("nf4")
    monkeypatch.setattr(lora, "load_adapter", frozen_load)
    code = cli.main(
        [
            "continue",
            "--model",
            str(tiny_gemma2_dir),
            "--adapter",
            str(run.output),
            "--data",
            str(run.data),
            "--columns",
            "instruction=input,response=output",
            "--output",
            str(tmp_path / "out"),
            *RUN,
            *(["use_cpu=true"] if run.device == "cpu" else []),
        ]
    )
    stderr = capsys.readouterr().err
    assert code == 2 and "adapter loaded from" in stderr and "is_trainable=False" in stderr
    assert "Traceback" not in stderr and nothing_written(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.claim("A2")
def test_a_fresh_run_says_it_created_the_adapter(sft_runs):
    run = sft_runs("nf4")
    assert any(
        line.startswith("adapter created fresh (r=64, lora_alpha=64), not loaded; 131,072 weights trainable")
        for line in run.observed.lines
    )


# ------------------------------------------------------------------ P2 and the command's errors


def train_command(*args: str, capsys) -> tuple[int, str]:
    """`ftref train ...` in this process (the same main() the console script runs): exit code and stderr."""
    code = cli.main(["train", *args])
    return code, capsys.readouterr().err


@pytest.fixture
def common(tmp_path, tiny_gemma2_dir):
    return [
        "--recipe",
        "llm2024",
        "--model",
        str(tiny_gemma2_dir),
        "--output",
        str(tmp_path / "o"),
        "--columns",
        "instruction=input,response=output",
    ]


@pytest.mark.claim("P2")
@pytest.mark.parametrize(
    "name, text, where",
    [
        (
            "broken.jsonl",
            '{"input": "a", "output": "b"}\n{"input": "c", "output": \n{"input": "d", "output": "e"}\n',
            "row 2 (line 2): not JSON",
        ),
        (
            "blank-then-list.jsonl",
            '{"input": "a", "output": "b"}\n\n[1, 2]\n',
            "row 2 (line 3): expected a JSON object",
        ),
        ("extra-field.csv", "input,output\na,b\nc,d,e\nf,g\n", "row 2 (line 3): 3 fields, the header has 2"),
        ("open-quote.csv", 'input,output\na,b\n\nc,d\n"e,f\ng,h\n', "row 3 (line 5)"),
        ("not-text.jsonl", '{"input": "a", "output": "b"}\n{"input": 3, "output": "c"}\n', "row 2, column 'input'"),
        ("missing-answer.csv", "input,output\na,b\nc\n", "row 2, column 'output'"),
    ],
    ids=[
        "jsonl-not-json",
        "jsonl-not-an-object",
        "csv-extra-field",
        "csv-open-quote",
        "jsonl-not-text",
        "csv-missing-field",
    ],
)
def test_a_malformed_row_on_the_train_path_names_the_file_and_the_row_with_exit_2(
    tmp_path, common, capsys, name, text, where
):
    """Rows count records from 1 (a blank line is no record; a CSV header is no record), lines count the
    file's lines: the third case's list is on line 3 but is the second record."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    code, stderr = train_command(*common, "--data", str(path), capsys=capsys)
    assert code == 2 and f"{path}, {where}" in stderr and "Traceback" not in stderr
    assert nothing_written(tmp_path / "o")


@pytest.mark.claim("P2", "L3")
def test_train_names_a_missing_model_and_a_bad_recipe_key_with_exit_2(tmp_path, common, capsys, fixtures_dir):
    data = ["--data", str(fixtures_dir / "data" / "qa111_sample.jsonl")]
    no_model = [*common[:2], "--model", str(tmp_path / "no-model"), *common[4:]]
    code, stderr = train_command(*no_model, *data, capsys=capsys)
    assert code == 2 and "no-model" in stderr and "HF_TOKEN" in stderr
    code, stderr = train_command(*common, *data, "lora.rank=8", capsys=capsys)
    assert code == 2 and "rank" in stderr
    code, stderr = train_command(*common, *data, "warmup_ratio_typo=0.1", capsys=capsys)
    assert code == 2 and "warmup_ratio_typo" in stderr


@pytest.mark.slow
@pytest.mark.claim("P2")
def test_the_train_command_exits_2_without_a_traceback_on_an_unreadable_row(tmp_path, tiny_gemma2_dir):
    """The console command itself (a separate process): exit status 2, the file and row on stderr."""
    broken = tmp_path / "broken.csv"
    with open(broken, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["input", "output"], ["a", "b"], ["c", "d", "e"]])
    on = ["--recipe", "llm2024", "--model", tiny_gemma2_dir, "--data", broken, *QA, "--output", tmp_path / "o"]
    result = run_cli("train", *on)
    assert result.returncode == 2 and f"{broken}, row 2 (line 3)" in result.stderr
    assert "Traceback" not in result.stderr
