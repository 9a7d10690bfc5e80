"""An adapter used on a model of another kind (A2, A3): refused by every command that loads one, even when the
folder of the base it was made on is gone.

tiny-llama and tiny-gemma2 have the same shapes (hidden 64, MLP 128, heads 4/2 of 16, 2 layers, vocab 2862),
so peft loads either's adapter onto the other without a word, and `merge` would write a silently wrong model.
peft 0.21 records only the base's path (base_model_name_or_path); the project records the base's kind as
well (model_type, architectures, shapes: reference/modeling/lora.py's RECORD, in peft's own `auto_mapping` field of
adapter_config.json), so the check no longer needs that folder. Adapters saved without the record (by older
runs, or other tools) are checked as before, against the folder when it is there, else only by shape, with a
note saying so.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

from reference.errors import InputError
from reference.modeling import adapter_records, lora, models
from spec.adapters import THREE_STEPS
from spec.cli_runner import QA, run_main

SECTION = {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}


def orphaned_llama_adapter(tiny_llama_dir, tmp_path, recorded: bool = True):
    """(adapter, the base folder it names, now deleted): an adapter made on a copy of tiny-llama, with the
    copy removed afterwards, as when a base is deleted or the adapter copied to another machine. With
    `recorded` False, adapter_config.json is as an older run saved it: no record of the base's kind."""
    base = tmp_path / "llama-base"
    shutil.copytree(tiny_llama_dir, base)
    llama, _ = models.load_causal_lm(base)
    adapter = tmp_path / "llama-adapter"
    lora.attach(llama, SECTION).save_pretrained(adapter)
    shutil.rmtree(base)
    if not recorded:
        settings = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        settings["auto_mapping"] = None
        (adapter / "adapter_config.json").write_text(json.dumps(settings), encoding="utf-8")
    return adapter, base.resolve()


@pytest.mark.claim("A2")
def test_an_adapter_records_its_bases_kind_so_another_architecture_is_refused_once_that_base_is_gone(
    tiny_llama_dir, tiny_gemma2_dir, tmp_path
):
    """The adapter's config holds the record (peft reads it back without a warning); with the llama folder
    deleted, loading the adapter onto tiny-gemma2 is refused, naming both models and what differs."""
    import peft

    adapter, base = orphaned_llama_adapter(tiny_llama_dir, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft warns about keys it does not know; the record is in one it does
        config = peft.PeftConfig.from_pretrained(str(adapter))
    assert config.base_model_name_or_path == str(base) and not base.exists()
    assert config.auto_mapping[adapter_records.RECORD]["model_type"] == "llama"
    assert config.auto_mapping[adapter_records.RECORD]["architectures"] == ["LlamaForCausalLM"]
    gemma, _ = models.load_causal_lm(tiny_gemma2_dir)
    with pytest.raises(InputError) as refused:
        lora.load_adapter(gemma, adapter, say=pytest.fail)
    message = str(refused.value)
    assert "does not fit this base" in message and "model_type 'llama' vs 'gemma2'" in message
    assert str(base) in message and "that folder is gone" in message
    assert str(tiny_gemma2_dir.resolve()) in message and "Gemma2ForCausalLM" in message


@pytest.mark.claim("A2", "A3")
@pytest.mark.parametrize("command", ["merge", "continue", "continue --mode merge", "generate"])
def test_every_command_that_loads_an_adapter_refuses_one_made_for_another_kind_of_model(
    command, tiny_llama_dir, tiny_gemma2_dir, fixtures_dir, tmp_path
):
    """`merge` once wrote a model from the llama adapter folded into tiny-gemma2 (exit 0); `continue` trained
    on it, `generate` answered with it. Each now exits 2 naming both models, and writes nothing."""
    adapter, base = orphaned_llama_adapter(tiny_llama_dir, tmp_path)
    data = fixtures_dir / "data"
    on = ["--model", tiny_gemma2_dir, "--adapter", adapter]
    argv = {
        "merge": ["merge", *on, "--output", tmp_path / "out"],
        "continue": ["continue", *on, "--data", data / "qa111_sample.jsonl", *QA, "--output", tmp_path / "out"],
        "continue --mode merge": [
            *["continue", "--mode", "merge", *on, "--data", data / "qa111_sample.jsonl", *QA],
            *["--output", tmp_path / "out", *THREE_STEPS],
        ],
        "generate": [
            *["generate", *on, "--tasks", data / "tasks_sample.jsonl", "--shots", data / "qa111_sample.jsonl"],
            *["--k", "1", "--max-new-tokens", "1", "--output", tmp_path / "out.jsonl"],
        ],
    }[command]
    code, _, err = run_main(*argv)
    assert code == 2, err
    assert "does not fit this base" in err and "model_type 'llama' vs 'gemma2'" in err
    assert str(base) in err and "tiny-gemma2" in err
    assert not (tmp_path / "out.jsonl").exists()
    assert not (tmp_path / "out" / "merged-base").exists() and not (tmp_path / "out" / "config.json").exists()


@pytest.mark.claim("A2")
@pytest.mark.filterwarnings("ignore:Could not find a config file")  # peft, saving: the base folder is gone
def test_an_adapter_saved_without_the_record_loads_as_before_with_a_note_and_records_its_base_when_saved_again(
    tiny_llama_dir, tiny_gemma2_dir, tmp_path
):
    """An older adapter, its base folder gone, has nothing to be checked against but peft's shapes: it loads
    as it always did, and a note says the kind of its base could not be checked. Trained and saved again, it
    records the base it was loaded on."""
    adapter, base = orphaned_llama_adapter(tiny_llama_dir, tmp_path, recorded=False)
    assert adapter_records.recorded_kind(adapter) is None
    gemma, _ = models.load_causal_lm(tiny_gemma2_dir)
    said = []
    loaded = lora.load_adapter(gemma, adapter, trainable=True, say=said.append)
    assert len(said) == 1 and said[0].startswith(f"note: adapter {adapter} records no kind of base")
    assert str(base) in said[0] and "cannot be checked" in said[0]
    loaded.save_pretrained(tmp_path / "again")
    assert adapter_records.recorded_kind(tmp_path / "again")["model_type"] == "gemma2"
