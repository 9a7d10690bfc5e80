"""What a run's manifest.json records and what the run says while it trains (reference/training/runs.py writes it
for every method, reference/training/manifest.py defines it): per-step tokens and the steady rate (L2), the Trainer's
own arguments (X8, P12), versions, hashes, seeds, the step plan and the per-step loss (X2).

Read off spec/sft_runs.py's QLoRA run (the `sft_runs` fixture: made once per session and device, shared
with spec/test_train.py); the expected numbers are worked by hand from its RUN settings, the hashes with
hashlib here.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from reference.methods import train

# ------------------------------------------------------------------ L2: progress and tokens/s


@pytest.mark.slow
@pytest.mark.claim("L2")
def test_each_steps_token_count_is_the_real_tokens_of_its_micro_batches(sft_runs):
    """What the model was fed, seen by a forward hook: per optimizer step, 2 micro-batches, each the sum of
    its attention mask (padding left out; some micro-batches were padded, so counting positions would not
    do). The manifest's per-step counts are those sums, and each step's rate is its tokens / its seconds."""
    run = sft_runs("nf4")
    manifest = json.loads((run.output / "manifest.json").read_text())
    fed = run.observed.step_tokens
    assert [len(micro_batches) for micro_batches in fed] == [2, 2, 2, 2]
    assert run.observed.padded_micro_batches > 0
    assert [s["tokens"] for s in manifest["steps"]] == [sum(micro_batches) for micro_batches in fed]
    assert all(0 < s["tokens"] <= 2 * 2 * 64 for s in manifest["steps"])  # 4 records of at most 64 tokens
    assert all(s["tokens_per_second"] == pytest.approx(s["tokens"] / s["seconds"]) for s in manifest["steps"])


@pytest.mark.slow
@pytest.mark.claim("L2")
def test_progress_is_a_line_per_step_and_the_first_step_is_left_out_of_the_steady_rate(sft_runs):
    """Steady rate by hand from the per-step logs: tokens of steps 2..4 over their seconds. The first step
    (allocation, warm-up) is reported apart, its seconds recorded on their own."""
    run = sft_runs("nf4")
    manifest = json.loads((run.output / "manifest.json").read_text())
    step_lines = [line for line in run.observed.lines if line.startswith("epoch ")]
    assert [line.split(" loss")[0] for line in step_lines] == [f"epoch 1/1 step {k}/4" for k in (1, 2, 3, 4)]
    assert "warm-up, not in the steady rate" in step_lines[0] and "tok/s" not in step_lines[0]
    assert all("tok/s" in line and "steady" in line for line in step_lines[1:])
    steps = manifest["steps"]
    tokens = steps[1]["tokens"] + steps[2]["tokens"] + steps[3]["tokens"]
    seconds = steps[1]["seconds"] + steps[2]["seconds"] + steps[3]["seconds"]
    assert manifest["steady_tokens_per_second"] == pytest.approx(tokens / seconds, rel=1e-12)
    assert manifest["warmup_step_seconds"] == steps[0]["seconds"]
    assert f"(steady {tokens / seconds:,.0f} tok/s)" in step_lines[-1]
    assert sum(s["seconds"] for s in steps) <= manifest["train_seconds"]


# ------------------------------------------------------------------ X2, X8, P12: what the run ran with


@pytest.mark.slow
@pytest.mark.claim("X8", "P12")
def test_the_manifests_settings_are_exactly_the_arguments_the_trainer_ran_with(sft_runs):
    """Key by key: every field of the Trainer's own `args.to_dict()` (taken when the Trainer was built and
    again after training) is in the manifest with the same value, and nothing else is. The three run-time
    settings a second, recipe-only TrainingArguments would get wrong are checked by name."""
    run = sft_runs("nf4")
    recorded = json.loads((run.output / "manifest.json").read_text())["settings"]["training_arguments"]
    for ran in (run.observed.arguments, run.observed.args.to_dict()):
        ran = json.loads(json.dumps(ran, default=str))  # as a JSON file holds it
        assert sorted(recorded) == sorted(ran)
        differing = {k: (recorded[k], ran[k]) for k in ran if recorded[k] != ran[k]}
        assert differing == {}
    run_settings = ("activation_checkpointing", "remove_unused_columns", "disable_tqdm", "use_cache")
    assert tuple(recorded[name] for name in run_settings) == (True, False, True, False)
    assert recorded["hub_token"] == "<HUB_TOKEN>"  # transformers' own placeholder, never a value


@pytest.mark.slow
@pytest.mark.claim("X2", "P12", "C1")
def test_the_manifest_holds_versions_hashes_seeds_the_step_plan_and_per_step_loss(sft_runs, fixtures_dir):
    """Step plan by hand (RUN's docstring): 12 micro-batches an epoch, 6 steps an epoch, 4 steps in all taking
    8 micro-batches, effective batch 2 x 2 = 4, checkpoints at 2 and 4, a loss line every step; the custom
    loop's STEPS_PER_EPOCH = 24 // 2 = 12. Losses are the Trainer's own logged figures. The data and weight
    hashes with hashlib: SHA-256 of the listing `name NUL sha256(file bytes) LF` (one file each here)."""
    import peft
    import transformers

    run = sft_runs("nf4")
    manifest = json.loads((run.output / "manifest.json").read_text())
    settings = manifest["settings"]
    assert (settings["versions"]["transformers"], settings["versions"]["peft"]) == (
        transformers.__version__,
        peft.__version__,
    )
    assert (settings["training_arguments"]["seed"], settings["lora"]["random_state"]) == (3407, 3407)
    assert "adam_beta2" in settings["training_arguments"]  # defaults written out too
    digest = hashlib.sha256(run.data.read_bytes()).hexdigest()
    assert manifest["data"]["sha256"] == hashlib.sha256(f"{run.data.name}\0{digest}\n".encode()).hexdigest()
    weights = hashlib.sha256((fixtures_dir / "models" / "tiny-gemma2" / "model.safetensors").read_bytes())
    listing = f"model.safetensors\0{weights.hexdigest()}\n"
    assert manifest["model"]["weights_sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert manifest["model"]["path"] == str((fixtures_dir / "models" / "tiny-gemma2").resolve())
    plan = manifest["step_plan"]
    per_epoch = (plan["micro_batches_per_epoch"], plan["optimizer_steps_per_epoch"])
    assert per_epoch == (12, 6) and plan["total_optimizer_steps"] == 4
    assert (plan["micro_batches"], plan["effective_batch_size"], plan["warmup_steps"]) == (8, 4, 0)
    assert (plan["checkpoint_steps_kept"], plan["log_lines"], plan["custom_loop_steps_per_epoch"]) == ([2, 4], 4, 12)
    assert [s["step"] for s in manifest["steps"]] == [1, 2, 3, 4]
    logged = [h["loss"] for h in run.observed.state.log_history if "loss" in h]
    assert [round(s["loss"], 4) for s in manifest["steps"]] == [round(x, 4) for x in logged]
    assert sorted(p.name for p in (run.output / train.CHECKPOINTS).iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (run.output / train.CHECKPOINTS / "checkpoint-2" / "adapter_model.safetensors").is_file()
