"""Training further from a saved LoRA adapter (seed 000): the two routes, callable from Python.

Seed 000 asks how to go on from an adapter trained on old data. `continue_training` takes one of two routes,
named by its `mode` (the `continue` command's --mode):

* "adapter" (A1): keep training the same adapter, loaded trainable (`train.run(..., adapter=DIR)`);
* "merge" (A3): fold the adapter into the base (`lora.merge`: W = W0 + s B A, the base dequantised first
  when the recipe loads it in NF4 or 8-bit, as the adapter saw it; an adapter that records another loading
  of its base is noted, and one made for another kind of model refused) and save the result as the run's
  own OUTPUT/merged-base; then train a fresh adapter on that base (`continue_merged`).

The run directory follows reference.training.rundir's rules for both routes: it is held while the merge writes into
it, an old run is removed first on `overwrite`, and on `resume` the merged base already there is the one
the run trains on, so it is not merged again. Either way a new schedule starts at step 0 unless resuming
(A4). Not handled: merging several adapters, or keeping the merged base outside the run directory (the
`merge` command writes one anywhere).
"""

from __future__ import annotations

from pathlib import Path

from reference import messages
from reference.errors import InputError
from reference.methods import train
from reference.modeling import adapter_records, lora, models
from reference.training import rundir
from reference.training.manifest import RunManifest

MODES = ("adapter", "merge")
MERGED_BASE = rundir.MERGED_BASE
"""The merge route's base, inside the run directory."""


def continue_training(
    recipe,
    model_dir: str,
    adapter_dir: str,
    data_path: str,
    output_dir: str,
    mode: str = "adapter",
    columns: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    say=messages.say,
) -> RunManifest:
    """Train further from the adapter at `adapter_dir`, made on `model_dir`, by the route `mode` names (MODES)."""
    if mode == "adapter":
        return train.run(
            recipe,
            model_dir,
            data_path,
            output_dir,
            columns=columns,
            say=say,
            adapter=adapter_dir,
            resume=resume,
            overwrite=overwrite,
        )
    if mode == "merge":
        return continue_merged(recipe, model_dir, adapter_dir, data_path, output_dir, columns, resume, overwrite, say)
    raise InputError(f"mode {mode!r}: expected one of {', '.join(MODES)}")


def continue_merged(
    recipe,
    model_dir: str,
    adapter_dir: str,
    data_path: str,
    output_dir: str,
    columns: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    say=messages.say,
) -> RunManifest:
    """Merge the adapter into its base as OUTPUT/merged-base, then train a fresh adapter on that base. The base is
    loaded for the merge as the adapter's run recorded it (the weights the adapter was trained on); an adapter
    without a record is merged onto the base as this recipe loads it."""
    merged = Path(output_dir) / MERGED_BASE
    with rundir.claimed(output_dir, resume, overwrite, say):  # the reuse rules, before anything is written
        if not (resume and merged.is_dir()):
            if adapter_records.recorded_quantization(adapter_dir):  # as the adapter's run loaded the base
                lora.merge(model_dir, adapter_dir, merged, say=say)
            else:  # no record: as this recipe loads it
                quantization, bnb_4bit_settings = models.recipe_quantization(recipe.quantization)
                lora.merge(
                    model_dir, adapter_dir, merged, quantization, say=say, quantization_section=bnb_4bit_settings
                )
            say(f"merged {adapter_dir} into {model_dir} -> {merged}; training a new adapter on it")
        # in the same claim: no other run can take the directory between the merge and the training
        return train.run_claimed(recipe, str(merged), data_path, output_dir, columns=columns, say=say, resume=resume)
