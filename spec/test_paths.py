"""Inputs are sacred, outputs whole (reference/paths.py, claim X6): the checks every writing command runs
before it starts, and the write-then-rename every output goes through."""

from __future__ import annotations

import pytest

from reference.errors import InputError
from reference.paths import check_outputs, write_text_atomic


@pytest.mark.claim("X6")
@pytest.mark.parametrize("output,relation", [("model", "is"), ("model/merged", "is inside"), (".", "holds")])
def test_an_output_equal_to_inside_or_holding_an_input_is_refused_naming_both(tmp_path, monkeypatch, output, relation):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    with pytest.raises(InputError) as error:
        check_outputs({"--output": output}, {"--model": "model"})
    assert str(error.value).startswith(f"--output {output} {relation} --model model:")


@pytest.mark.claim("X6")
def test_the_same_file_by_another_spelling_is_still_the_same_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tasks.jsonl").write_text("{}\n")
    with pytest.raises(InputError, match="--output ./sub/../tasks.jsonl is --tasks tasks.jsonl"):
        check_outputs({"--output": "./sub/../tasks.jsonl"}, {"--tasks": "tasks.jsonl", "--shots": None})


@pytest.mark.claim("X6")
def test_a_sibling_output_is_accepted(tmp_path):
    """`model-nf4` begins as `model` does but is not inside it: accepted; `model/nf4` is inside it: refused."""
    (tmp_path / "model").mkdir()
    check_outputs({"--output": tmp_path / "model-nf4"}, {"--model": tmp_path / "model"})
    with pytest.raises(InputError, match="an output never overwrites an input"):
        check_outputs({"--output": tmp_path / "model" / "nf4"}, {"--model": tmp_path / "model"})


@pytest.mark.claim("X6")
def test_an_output_under_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_outputs({"--output": tmp_path / "a-file" / "out.jsonl"}, {})


@pytest.mark.claim("X6")
def test_an_output_appears_under_its_final_name_only_when_complete(tmp_path, monkeypatch):
    """The text goes to a temporary file beside the target, renamed into place: an interrupted write leaves
    the old file (here: none) and no temporary behind."""
    target = tmp_path / "out" / "result.json"
    write_text_atomic(target, "whole\n")
    assert target.read_text() == "whole\n" and [p.name for p in target.parent.iterdir()] == ["result.json"]

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(OSError):
        write_text_atomic(target, "half")
    assert target.read_text() == "whole\n" and [p.name for p in target.parent.iterdir()] == ["result.json"]


@pytest.mark.claim("X6")
@pytest.mark.parametrize(
    "command",
    [
        ["merge", "--model", "{model}", "--adapter", "{adapter}", "--output", "{model}"],
        ["quantize", "--model", "{model}", "--output", "{model}"],
        ["add-tokens", "--model", "{model}", "--tokens", "<user_name>", "--output", "{model}"],
        ["generate", "--model", "{model}", "--tasks", "{tasks}", "--shots", "{tasks}", "--output", "{tasks}"],
        ["train", "--recipe", "llm2024", "--model", "{model}", "--data", "{tasks}", "--output", "{tasks}"],
        ["continue", "--model", "{model}", "--adapter", "{adapter}", "--data", "{tasks}", "--output", "{adapter}/more"],
        ["filter", "--input", "{tasks}", "--output", "{tasks}", "--rejects", "{tmp}/rejects.jsonl"],
        ["dpo", "--model", "{model}", "--data", "{tasks}", "--output", "{model}/dpo"],
        ["preference", "train", "--model", "{model}", "--data", "{tasks}", "--output", "{model}"],
    ],
)
def test_every_writing_command_refuses_an_output_over_an_input_before_any_work(tmp_path, capsys, command):
    """The inputs are copies whose bytes are compared after the refusal: nothing was touched."""
    from reference import cli

    model, adapter, tasks = tmp_path / "model", tmp_path / "adapter", tmp_path / "tasks.jsonl"
    for folder in (model, adapter):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    tasks.write_text('{"input": "日本の首都は？"}\n', encoding="utf-8")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    argv = [part.format(model=model, adapter=adapter, tasks=tasks, tmp=tmp_path) for part in command]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "an output never overwrites an input" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.claim("X6")
def test_an_output_where_the_file_system_refuses_files_is_refused_before_any_work():
    """/proc takes no new files, even from root (for whom os.access says yes)."""
    with pytest.raises(InputError, match="/proc is not writable"):
        check_outputs({"--output": "/proc/ftref-test/out"}, {})


@pytest.mark.claim("X6")
def test_a_saved_model_directory_gets_its_files_only_once_all_are_written(tmp_path):
    """Files are saved into a hidden folder beside the target and moved in at the end; a save that fails
    half-way leaves the target as it was and no hidden folder behind."""
    from reference.paths import complete_directory

    target = tmp_path / "model"
    target.mkdir()
    (target / "kept.txt").write_text("a file of the user's")
    with pytest.raises(RuntimeError):
        with complete_directory(target) as partial:
            (partial / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("killed mid-save")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and [p.name for p in target.iterdir()] == [
        "kept.txt"
    ]
    with complete_directory(target) as partial:
        (partial / "model.safetensors").write_bytes(b"whole")
        assert not (target / "model.safetensors").exists()
    assert sorted(p.name for p in target.iterdir()) == ["kept.txt", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
