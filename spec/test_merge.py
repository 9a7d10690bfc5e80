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

import shutil
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel

from reference import continuation, lora, models, rundir
from reference.errors import InputError
from reference.recipes import apply_overrides, load_recipe
from spec.adapters import (
    THREE_STEPS,
    TOLERANCE,
    assert_same_tensors,
    base_plus_adapter_logits,
    logits_of,
    max_difference,
)

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


# --- A3: the merge route of `continue`, from Python ---


def an_old_run(directory):
    """A directory that holds a run (its run.json) and a file of that run's."""
    directory.mkdir()
    (directory / rundir.RUN).write_text("{}", encoding="utf-8")
    (directory / "old.txt").write_text("the old run's", encoding="utf-8")
    return directory


@pytest.mark.claim("A3")
def test_the_merge_route_checks_the_run_directory_before_it_merges_anything(
    saved_adapter, tiny_gemma2_dir, magpie_data, tmp_path
):
    """reference.rundir's rules come first: an output holding a run is refused without --resume or --overwrite,
    and --resume with --overwrite is refused; either way nothing is merged and the old run is left as it was."""
    output = an_old_run(tmp_path / "run")
    recipe = apply_overrides(load_recipe("llm2024"), THREE_STEPS)
    on = (recipe, tiny_gemma2_dir, saved_adapter, magpie_data, output)
    with pytest.raises(InputError, match="holds a run already"):
        continuation.continue_merged(*on, say=lambda _: None)
    with pytest.raises(InputError, match="choose one"):
        continuation.continue_merged(*on, resume=True, overwrite=True, say=lambda _: None)
    assert sorted(p.name for p in output.iterdir()) == ["old.txt", rundir.RUN]


@pytest.mark.slow
@pytest.mark.claim("A3", "A4")
def test_the_merge_route_replaces_an_old_run_then_resumes_on_the_base_it_merged(
    saved_adapter, tiny_gemma2_dir, magpie_data, tmp_path
):
    """continuation.continue_merged with overwrite: the old run's files are gone, the adapter is merged into
    OUTPUT/merged-base, and a fresh adapter trains there (3 steps, checkpoints at 2 and 3; the loss falls).
    checkpoint-3 is then removed, as if the run had been killed before writing it, and the route is called
    again with resume: it says nothing about merging (the merged base is the run's, kept), and the run goes
    on from checkpoint-2 at step 3 on that base."""
    output, said = an_old_run(tmp_path / "run"), []
    recipe = apply_overrides(load_recipe("llm2024"), [*THREE_STEPS, "save_steps=2"])
    on = (recipe, tiny_gemma2_dir, saved_adapter, magpie_data, output)
    first = continuation.continue_merged(*on, overwrite=True, say=said.append)
    merged = output / continuation.MERGED_BASE
    assert not (output / "old.txt").exists() and first.model["path"] == str(merged.resolve())
    assert any(line.startswith(f"merged {saved_adapter} into {tiny_gemma2_dir}") for line in said)
    assert first.adapter["mode"] == "created" and first.steps[-1]["loss"] < first.steps[0]["loss"]

    shutil.rmtree(output / "checkpoints" / "checkpoint-3")
    said.clear()
    resumed = continuation.continue_merged(*on, resume=True, say=said.append)
    assert not any(line.startswith("merged ") for line in said)
    assert resumed.resumed_from.endswith("checkpoint-2") and [s["step"] for s in resumed.steps] == [3]
    assert resumed.model["path"] == str(merged.resolve())
