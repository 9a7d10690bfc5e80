"""Merging a LoRA adapter into its base (A3): the library calls, and the `continue` route that trains on the result.

The library calls this file is about, shown beside the project's function that wraps them:

    base.dequantize(); PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
                                                                     the merge route (A3)    = lora.merge

The adapter merged is checkpoint-3 of the uninterrupted six-step run (the `uninterrupted` fixture of
spec/conftest.py), trained on an NF4 base; merging it once is a module fixture shared by the tests that look
at it. The merge route of seed 000 (continuation.continue_merged: merge into OUTPUT/merged-base, train a
fresh adapter there) is called from Python here, and from the command line in spec/test_cli.py.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel

from reference.errors import InputError
from reference.methods import continuation
from reference.modeling import adapter_records, lora, models
from reference.settings.recipes import apply_overrides, load_recipe
from reference.training import rundir
from spec.adapters import (
    THREE_STEPS,
    TOLERANCE,
    assert_same_tensors,
    base_plus_adapter_logits,
    logits_of,
    max_difference,
)
from spec.cli_runner import run_main

# --- A3: merge the adapter into the (dequantised) base ---


@pytest.fixture(scope="module")
def merged(uninterrupted, tiny_gemma2_dir, tmp_path_factory):
    """lora.merge of checkpoint-3 into tiny-gemma2 loaded as the adapter was trained on it, in NF4."""
    output = tmp_path_factory.mktemp("merged") / "model"
    summary = lora.merge(tiny_gemma2_dir, uninterrupted.checkpoint, output, quantization="nf4")
    return SimpleNamespace(output=output, summary=summary)


@pytest.mark.slow
@pytest.mark.claim("A3")
def test_merge_is_peft_merge_and_unload_on_the_dequantised_base(merged, uninterrupted, tiny_gemma2_dir):
    """lora.merge saves what peft's calls give: the NF4 base dequantised (transformers' dequantize()), the
    adapter loaded on it and folded in (merge_and_unload()), every weight equal."""
    base, _ = models.load_causal_lm(tiny_gemma2_dir, dtype="bfloat16", quantization="nf4")
    theirs = PeftModel.from_pretrained(base.dequantize(), str(uninterrupted.checkpoint)).merge_and_unload()
    ours, _ = models.load_causal_lm(merged.output, dtype="bfloat16")
    assert_same_tensors(ours.state_dict(), theirs.state_dict())


@pytest.mark.slow
@pytest.mark.claim("A3")
def test_merging_dequantises_the_nf4_base_and_gives_base_plus_adapter_logits(merged, uninterrupted, tiny_gemma2_dir):
    """W = dequant(W_nf4) + (alpha/r) B A, saved in bf16: its logits equal peft's base(NF4) + adapter
    within 4 x bf16 resolution. Merging onto the bf16 weights the NF4 ones were made from (no
    dequantisation: peft's own merge on the unquantised base) misses by more than that tolerance."""
    assert merged.summary["base_quantization"] == "nf4"
    model, identity = models.load_causal_lm(merged.output, dtype="bfloat16")
    assert identity.quantization == "none" and model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    expected = base_plus_adapter_logits(tiny_gemma2_dir, uninterrupted.checkpoint)
    assert max_difference(logits_of(model.eval()), expected) <= 4 * TOLERANCE

    unquantised, _ = models.load_causal_lm(tiny_gemma2_dir, dtype="bfloat16")
    naive = PeftModel.from_pretrained(unquantised, str(uninterrupted.checkpoint)).merge_and_unload()
    assert max_difference(logits_of(naive.eval()), expected) > 4 * TOLERANCE


# --- A3: the base loaded as the adapter's run recorded it ---


@pytest.mark.slow
@pytest.mark.claim("A3")
def test_merge_loads_the_base_as_the_adapters_run_recorded_it_unless_told(
    merged, uninterrupted, tiny_gemma2_dir, tmp_path
):
    """The six-step run trained on an NF4 base and says so: run.json (beside checkpoints/) and manifest.json
    (beside the final adapter) record model.quantization "nf4". With no --quantization, the command's
    default, lora.merge follows that record: the base is loaded in NF4 and dequantised, and the merged model
    is, weight for weight, the one merged with quantization="nf4" given. (It used to merge into the bf16
    base the adapter never saw, with exit 0 and no word.) The Trainer's checkpoint also records its base's
    kind (reference/modeling/lora.py's RECORD)."""
    run = uninterrupted.output
    assert adapter_records.recorded_quantization(uninterrupted.checkpoint) == ("nf4", str(run / rundir.RUN))
    assert adapter_records.recorded_quantization(run) == ("nf4", str(run / "manifest.json"))
    assert adapter_records.recorded_kind(uninterrupted.checkpoint)["model_type"] == "gemma2"
    said = []
    summary = lora.merge(tiny_gemma2_dir, uninterrupted.checkpoint, tmp_path / "model", say=said.append)
    assert said == [] and summary["base_quantization"] == summary["recorded_quantization"] == "nf4"
    assert summary["quantization_record"] == str(run / rundir.RUN)
    ours, _ = models.load_causal_lm(tmp_path / "model", dtype="bfloat16")
    told, _ = models.load_causal_lm(merged.output, dtype="bfloat16")
    assert_same_tensors(ours.state_dict(), told.state_dict())


@pytest.mark.slow
@pytest.mark.claim("A3")
def test_a_merge_quantisation_that_contradicts_the_record_is_refused_naming_both_unless_overridden(
    uninterrupted, tiny_gemma2_dir, tmp_path
):
    """`merge --quantization none` of the NF4-trained checkpoint exits 2 before any model loads, naming the
    choice, the record and the file it is in, and the two ways on; nothing is written. With
    --override-record (folding a QLoRA adapter into the full-precision base on purpose) it merges as told,
    says so, and the summary keeps both. --override-record with nothing to override with is refused."""
    on = ["merge", "--model", tiny_gemma2_dir, "--adapter", uninterrupted.checkpoint]
    code, _, err = run_main(*on, "--output", tmp_path / "refused", "--quantization", "none")
    assert code == 2 and not (tmp_path / "refused").exists()
    assert "--quantization none" in err and "loaded nf4" in err and str(uninterrupted.output / rundir.RUN) in err
    assert "Leave --quantization out" in err and "--override-record" in err
    code, out, err = run_main(*on, "--output", tmp_path / "model", "--quantization", "none", "--override-record")
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["base_quantization"], summary["recorded_quantization"]) == ("none", "nf4")
    assert "note: merging onto the base loaded none, as asked" in err
    code, _, err = run_main(*on, "--output", tmp_path / "vague", "--override-record")
    assert code == 2 and "give the --quantization" in err and not (tmp_path / "vague").exists()


@pytest.mark.claim("A3")
def test_an_adapter_without_a_run_record_merges_onto_the_base_as_saved_and_says_it_could_not_tell(
    saved_adapter, tiny_gemma2_dir, tmp_path
):
    """The `saved_adapter` fixture was saved by peft alone: no manifest.json or run.json beside it.
    The default then is what it always was, the base as saved (none), with a note naming the flag to use for
    an adapter trained on a 4-bit base; an explicit choice is taken as given."""
    code, out, err = run_main(
        "merge", "--model", tiny_gemma2_dir, "--adapter", saved_adapter, "--output", tmp_path / "m"
    )
    assert code == 0, err
    assert json.loads(out)["base_quantization"] == "none" and json.loads(out)["recorded_quantization"] is None
    assert f"note: adapter {saved_adapter} has no run record beside it" in err and "--quantization nf4" in err
    assert adapter_records.merge_quantization(saved_adapter, "nf4", say=pytest.fail) == "nf4"


# --- A3: the merge route of `continue`, from Python ---


def an_old_run(directory):
    """A directory that holds a run (its run.json) and a file of that run's that a new run does not write again (a
    tokenizer.model, by the name transformers saves it; the fixtures' tokenizers have none)."""
    directory.mkdir()
    (directory / rundir.RUN).write_text("{}", encoding="utf-8")
    (directory / "tokenizer.model").write_text("the old run's", encoding="utf-8")
    return directory


@pytest.mark.claim("A3")
def test_the_merge_route_checks_the_run_directory_before_it_merges_anything(
    saved_adapter, tiny_gemma2_dir, magpie_data, tmp_path
):
    """reference.training.rundir's rules come first: an output holding a run is refused without --resume or --overwrite,
    and --resume with --overwrite is refused; either way nothing is merged and the old run is left as it was."""
    output = an_old_run(tmp_path / "run")
    recipe = apply_overrides(load_recipe("llm2024"), THREE_STEPS)
    on = (recipe, tiny_gemma2_dir, saved_adapter, magpie_data, output)
    with pytest.raises(InputError, match="holds a run already"):
        continuation.continue_merged(*on, say=lambda _: None)
    with pytest.raises(InputError, match="choose one"):
        continuation.continue_merged(*on, resume=True, overwrite=True, say=lambda _: None)
    assert sorted(p.name for p in output.iterdir()) == [rundir.RUN, "tokenizer.model"]


@pytest.mark.slow
@pytest.mark.claim("A3", "A4")
def test_the_merge_route_replaces_an_old_run_then_resumes_on_the_base_it_merged(
    saved_adapter, tiny_gemma2_dir, magpie_data, tmp_path
):
    """continuation.continue_merged with overwrite: the old run's files are gone, the adapter is merged into
    OUTPUT/merged-base, and a fresh adapter trains there (3 steps, checkpoints at 2 and 3; the loss falls).
    checkpoint-3 and the manifest are then removed, as if the run had been killed before writing them, and the
    route is called again with resume: it says nothing about merging (the merged base is the run's, kept), and
    the run goes on from checkpoint-2 at step 3 on that base."""
    output, said = an_old_run(tmp_path / "run"), []
    recipe = apply_overrides(load_recipe("llm2024"), [*THREE_STEPS, "save_steps=2"])
    on = (recipe, tiny_gemma2_dir, saved_adapter, magpie_data, output)
    first = continuation.continue_merged(*on, overwrite=True, say=said.append)
    merged = output / continuation.MERGED_BASE
    assert not (output / "tokenizer.model").exists() and first.model["path"] == str(merged.resolve())
    assert any(line.startswith(f"merged {saved_adapter} into {tiny_gemma2_dir}") for line in said)
    assert first.adapter["mode"] == "created" and first.steps[-1]["loss"] < first.steps[0]["loss"]

    shutil.rmtree(output / "checkpoints" / "checkpoint-3")
    (output / "manifest.json").unlink()  # killed before its last checkpoint: no manifest either
    said.clear()
    resumed = continuation.continue_merged(*on, resume=True, say=said.append)
    assert not any(line.startswith("merged ") for line in said)
    assert resumed.resumed_from.endswith("checkpoint-2") and [s["step"] for s in resumed.steps] == [3]
    assert resumed.model["path"] == str(merged.resolve())


@pytest.mark.slow
@pytest.mark.claim("A3")
def test_the_merge_route_merges_an_adapter_as_its_run_recorded_whatever_the_new_recipe_loads(
    uninterrupted, tiny_gemma2_dir, magpie_data, tmp_path
):
    """checkpoint-3 trained on the NF4 base (its run.json says so); continuing it by merging under a recipe that
    loads the base unquantised still folds it into the dequantised NF4 weights it was trained on: the merged base
    equals `lora.merge(..., quantization="nf4")` byte for byte, with no note of a departure."""
    recipe = apply_overrides(load_recipe("llm2024"), [*THREE_STEPS, "quantization.load_in_4bit=false"])
    said = []
    continuation.continue_merged(
        recipe, tiny_gemma2_dir, uninterrupted.checkpoint, magpie_data, tmp_path / "run", say=said.append
    )
    lora.merge(tiny_gemma2_dir, uninterrupted.checkpoint, tmp_path / "nf4", quantization="nf4", say=pytest.fail)
    route = tmp_path / "run" / continuation.MERGED_BASE / "model.safetensors"
    assert route.read_bytes() == (tmp_path / "nf4" / "model.safetensors").read_bytes()
    assert not any("note: merging onto the base loaded" in line for line in said)


@pytest.mark.slow
@pytest.mark.claim("A3", "C1")
def test_merge_loads_the_base_with_the_bnb_settings_the_adapters_run_recorded(tiny_gemma2_dir, fixtures_dir, tmp_path):
    """Double quantisation stores each block's scale quantised again, so the dequantised base differs with it. An
    adapter trained on an NF4 base without it (`quantization.bnb_4bit_use_double_quant=false`) is merged onto that
    same base by default, as its run.json records: equal to a merge told so, byte for byte, and not to a merge onto
    the double-quantised default."""
    from reference.methods import train
    from spec.observe import QA_COLUMNS, SHORT

    recipe = apply_overrides(load_recipe("llm2024"), [*SHORT, "quantization.bnb_4bit_use_double_quant=false"])
    data = fixtures_dir / "data" / "qa111_sample.jsonl"
    train.run(recipe, str(tiny_gemma2_dir), str(data), str(tmp_path / "run"), QA_COLUMNS, say=lambda _: None)
    adapter = tmp_path / "run"
    assert adapter_records.recorded_bnb_4bit(adapter)["bnb_4bit_use_double_quant"] is False

    def merged(name, **told) -> bytes:
        lora.merge(tiny_gemma2_dir, adapter, tmp_path / name, say=lambda _: None, **told)
        return (tmp_path / name / "model.safetensors").read_bytes()

    by_default = merged("default")
    assert by_default == merged("told", quantization_section={"bnb_4bit_use_double_quant": False})
    assert by_default != merged("double", quantization_section={})


@pytest.mark.slow
@pytest.mark.claim("A3", "X5")
def test_the_merge_route_holds_its_directory_from_the_merge_to_the_end_of_training(
    saved_adapter, tiny_gemma2_dir, magpie_data, tmp_path
):
    """One lock from the merge to the last step: the lock file seen when the merge is said and when training
    starts is the same file (a lock released and taken again would be a new one), so no other run can take the
    directory in between."""
    output, seen = tmp_path / "run", []

    def say(line: str) -> None:
        if line.startswith(("merged ", "training ")):
            seen.append((output / rundir.LOCK).stat().st_ctime_ns)

    recipe = apply_overrides(load_recipe("llm2024"), THREE_STEPS)
    continuation.continue_merged(recipe, tiny_gemma2_dir, saved_adapter, magpie_data, output, say=say)
    assert len(seen) == 2 and seen[0] == seen[1]
    assert not (output / rundir.LOCK).exists()
