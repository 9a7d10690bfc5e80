"""Continuing from a LoRA adapter (seed 000): the two routes, resume versus restart, surviving a kill.

A first run trains an adapter on the QA fixture (the "old" data); the tests continue from it on new
records (the magpie sample) the ways seed 000 asks about.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys

import pytest
import torch

from reference import checkpoints, lora, models, train
from reference.errors import InputError
from reference.recipes import apply_overrides, load_recipe
from reference.shapes import PROJECTIONS
from spec.observe import SHORT, Observed, assert_trained, run_recipe

TOLERANCE = 2 ** -7  # bf16 resolution near 1: fp32 norms in training vs bf16 ones in a plain reload


@pytest.fixture(scope="module")
def first_adapter(tmp_path_factory):
    from spec.conftest import FIXTURES

    output = tmp_path_factory.mktemp("first")
    run_recipe(apply_overrides(load_recipe("llm2024"), SHORT), FIXTURES / "models" / "tiny-gemma2",
               FIXTURES / "data" / "qa111_sample.jsonl", output, Observed())
    return output


def base_plus_adapter_logits(model_dir, adapter, ids, quantization="nf4"):
    base, _ = models.load_causal_lm(model_dir, dtype="bfloat16", quantization=quantization)
    model = lora.load_adapter(base, adapter, trainable=False).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(input_ids=ids).logits.float()


IDS = torch.tensor([[2, 120, 340, 560, 780, 1000, 1200]])


@pytest.mark.claim("A1")
def test_continuing_an_adapter_starts_from_base_plus_adapter_and_trains_it_further(first_adapter, tmp_path, fixtures_dir):
    """Before the first update the model is base + the saved adapter (logits equal to bf16 precision);
    then the loss falls, every adapter weight changes and the 4-bit base does not."""
    observed, seen = Observed(), {}

    def before_train(trainer):
        observed.before_train(trainer)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            seen["logits"] = trainer.model(input_ids=IDS).logits.float()

    recipe = apply_overrides(load_recipe("llm2024"), SHORT)
    record = train.run(recipe, str(fixtures_dir / "models" / "tiny-gemma2"), str(fixtures_dir / "data" / "qa111_sample.jsonl"),
                       str(tmp_path), columns={"instruction": "input", "response": "output"}, say=observed.lines.append,
                       before_train=before_train, adapter=str(first_adapter))
    assert record.adapter["mode"] == "loaded" and any("adapter loaded" in line for line in observed.lines)
    expected = base_plus_adapter_logits(fixtures_dir / "models" / "tiny-gemma2", first_adapter, IDS)
    assert torch.allclose(seen["logits"], expected, atol=TOLERANCE)
    assert_trained(record, observed)


@pytest.mark.claim("A2")
def test_peft_default_loads_the_adapter_frozen_and_training_it_is_refused(first_adapter, fixtures_dir):
    """Seed 000's "it only learned the new data": PeftModel.from_pretrained(base, dir) has
    is_trainable=False, so not one adapter weight can change. The project loads it trainable and
    refuses a model with nothing to train."""
    from peft import PeftModel

    base, _ = models.load_causal_lm(fixtures_dir / "models" / "tiny-gemma2")
    frozen = PeftModel.from_pretrained(base, str(first_adapter))
    assert lora.count_trainable(frozen)[0] == 0
    with pytest.raises(InputError, match="is_trainable"):
        lora.require_trainable(frozen)
    base, _ = models.load_causal_lm(fixtures_dir / "models" / "tiny-gemma2")
    ours = lora.load_adapter(base, first_adapter)
    config = json.loads((fixtures_dir / "models" / "tiny-gemma2" / "config.json").read_text())
    assert lora.require_trainable(ours) == lora.trainable_parameters(config, 64, PROJECTIONS)


@pytest.mark.claim("A2")
def test_an_adapter_made_for_another_base_is_a_clear_error(fixtures_dir, tmp_path):
    llama, _ = models.load_causal_lm(fixtures_dir / "models" / "tiny-llama")
    lora.attach(llama, {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}).save_pretrained(tmp_path / "llama-adapter")
    gemma, _ = models.load_causal_lm(fixtures_dir / "models" / "tiny-gemma2")
    with pytest.raises(InputError, match="does not fit"):
        lora.load_adapter(gemma, tmp_path / "llama-adapter")


@pytest.mark.claim("A3")
def test_merging_dequantises_the_nf4_base_and_gives_base_plus_adapter_logits(first_adapter, tmp_path, fixtures_dir):
    """W = dequant(W_nf4) + (alpha/r) B A in bf16: the merged model's logits equal base(NF4) + adapter's
    within bf16 resolution; then a fresh adapter trains on the merged base."""
    info = lora.merge(fixtures_dir / "models" / "tiny-gemma2", first_adapter, tmp_path / "merged", quantization="nf4")
    assert info["base_quantization"] == "nf4"
    merged, identity = models.load_causal_lm(tmp_path / "merged", dtype="bfloat16")
    assert identity.quantization == "none" and merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = merged(input_ids=IDS).logits.float()
    assert torch.allclose(ours, base_plus_adapter_logits(fixtures_dir / "models" / "tiny-gemma2", first_adapter, IDS), atol=4 * TOLERANCE)

    result = subprocess.run([sys.executable, "-m", "reference", "continue", "--mode", "merge", "--model",
                             str(fixtures_dir / "models" / "tiny-gemma2"), "--adapter", str(first_adapter),
                             "--data", str(fixtures_dir / "data" / "qa111_sample.jsonl"), "--columns", "instruction=input,response=output",
                             "--output", str(tmp_path / "continued"), *SHORT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["adapter"]["mode"] == "created" and summary["last_loss"] < summary["first_loss"]


def interrupted_after(step: int):
    """A callback that stops the run cleanly at `step` (after that step's checkpoint is written)."""
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_training_stop = True

    return Stop()


def adapter_tensors(directory) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


SIX_STEPS = ["max_steps=6", "per_device_train_batch_size=4", "gradient_accumulation_steps=1", "warmup_steps=2",
             "save_steps=3", "logging_steps=1", "learning_rate=2e-3", "sft.max_seq_length=40"]


@pytest.mark.claim("A4")
def test_resuming_a_checkpoint_finishes_exactly_as_the_uninterrupted_run_and_restarting_does_not(tmp_path, fixtures_dir):
    """Six steps (warmup 2, then linear decay to 0 at step 6, lr 2e-3) uninterrupted, against three
    steps + resume from checkpoint-3: the resumed run starts at step 4 with lr 2e-3 x (6-3)/(6-2) = 1.5e-3
    (optimizer, scheduler and RNG restored) and ends with bit-identical adapter weights. Continuing
    from the adapter instead starts a new schedule: its steps 1 and 2 are the warmup's 2e-3 x 0/2 = 0
    and 2e-3 x 1/2 = 1e-3 again."""
    recipe = apply_overrides(load_recipe("llm2024"), SIX_STEPS)
    model, data = fixtures_dir / "models" / "tiny-gemma2", fixtures_dir / "data" / "qa111_sample.jsonl"
    run_recipe(recipe, model, data, tmp_path / "whole", Observed())

    first_half = run_recipe(recipe, model, data, tmp_path / "cut", Observed(), callbacks=[interrupted_after(3)])
    assert [s["step"] for s in first_half.steps] == [1, 2, 3]
    resumed = run_recipe(recipe, model, data, tmp_path / "cut", Observed(), resume=True)
    assert resumed.resumed_from.endswith("checkpoint-3")
    assert [s["step"] for s in resumed.steps] == [4, 5, 6] and resumed.steps[0]["learning_rate"] == pytest.approx(1.5e-3)
    whole, again = adapter_tensors(tmp_path / "whole"), adapter_tensors(tmp_path / "cut")
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)

    restarted = run_recipe(recipe, model, data, tmp_path / "restart", Observed(), adapter=str(tmp_path / "cut" / "checkpoints" / "checkpoint-3"))
    assert [s["step"] for s in restarted.steps] == [1, 2, 3, 4, 5, 6] and restarted.resumed_from is None
    assert [s["learning_rate"] for s in restarted.steps[:2]] == pytest.approx([0.0, 1e-3])


@pytest.mark.claim("X1")
def test_a_run_killed_at_a_random_step_resumes_to_bit_identical_adapter_weights(tmp_path, fixtures_dir):
    """A real `train` process is sent SIGKILL after a random step past its first checkpoint; a
    half-written newer checkpoint is left beside the good ones. `train --resume` skips it (no marker),
    carries on from the newest complete checkpoint and ends with the uninterrupted run's exact weights."""
    settings = ["max_steps=8", "per_device_train_batch_size=4", "gradient_accumulation_steps=1", "warmup_steps=0",
                "save_steps=2", "logging_steps=1", "learning_rate=2e-3", "sft.max_seq_length=40"]
    command = [sys.executable, "-m", "reference", "train", "--recipe", "llm2024", "--model", str(fixtures_dir / "models" / "tiny-gemma2"),
               "--data", str(fixtures_dir / "data" / "qa111_sample.jsonl"), "--columns", "instruction=input,response=output"]
    whole = subprocess.run([*command, "--output", str(tmp_path / "whole"), *settings], capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr

    kill_after = random.Random(1234).randint(3, 7)  # a step after checkpoint-2
    process = subprocess.Popen([*command, "--output", str(tmp_path / "killed"), *settings], stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if line.startswith("epoch ") and f" step {kill_after}/8 " in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    saved = tmp_path / "killed" / "checkpoints"
    newest = checkpoints.last_complete(saved, say=lambda _: None)
    half = saved / "checkpoint-99"  # as a kill during a save leaves it: some files, no marker
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes((newest / "adapter_model.safetensors").read_bytes()[:100])

    resumed = subprocess.run([*command, "--output", str(tmp_path / "killed"), "--resume", *settings], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping checkpoint-99" in resumed.stderr and f"resuming from {newest.name}" in resumed.stderr
    ours, theirs = adapter_tensors(tmp_path / "killed"), adapter_tensors(tmp_path / "whole")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_checkpoint_changed_after_it_was_written_is_not_complete(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"12345")
    checkpoints.mark_complete(tmp_path)
    assert checkpoints.why_incomplete(tmp_path) is None
    (tmp_path / "a.bin").write_bytes(b"1234")
    assert "changed" in checkpoints.why_incomplete(tmp_path)
    (tmp_path / "a.bin").unlink()
    assert "missing" in checkpoints.why_incomplete(tmp_path)


@pytest.mark.claim("X3")
def test_torchrun_with_two_processes_follows_the_world_size_step_plan_and_keeps_both_in_step(tmp_path, fixtures_dir):
    """`torchrun --nproc_per_node 2` (DDP over gloo on the CPU) with the llm2024 recipe. By hand: 24 records,
    batch 2 on each of 2 processes = 6 micro-batches per process, accumulation 2 -> 3 optimizer steps in the
    epoch (a single process would take 6). Both processes end with the same adapter weights."""
    from reference import steps

    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "reference", "train", "--recipe", "llm2024",
         "--model", str(fixtures_dir / "models" / "tiny-gemma2"), "--data", str(fixtures_dir / "data" / "qa111_sample.jsonl"),
         "--columns", "instruction=input,response=output", "--output", str(tmp_path),
         "num_train_epochs=1", "per_device_train_batch_size=2", "gradient_accumulation_steps=2", "warmup_steps=0",
         "save_steps=100", "learning_rate=2e-3", "sft.max_seq_length=40"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / train.MANIFEST).read_text())
    assert manifest["step_plan"]["world_size"] == 2 and manifest["step_plan"]["micro_batches_per_epoch"] == 6
    assert manifest["step_plan"]["total_optimizer_steps"] == 3 == len(manifest["steps"])
    assert steps.plan(steps.StepSettings(records=24, batch_size=2, grad_accum=2, epochs=1, world_size=2)).total_optimizer_steps == 3
    digests = manifest["trainable_sha256_per_process"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert manifest["steps"][-1]["loss"] < manifest["steps"][0]["loss"]
    assert result.stdout.count('"manifest"') == 1  # one summary, from the main process


@pytest.mark.gpu
@pytest.mark.claim("A6", "A1")
def test_continuing_an_adapter_on_cuda_with_a_4bit_base(first_adapter, tmp_path, fixtures_dir):
    """The continuation spec on the GPU: the NF4 base packed on CUDA, the saved adapter loaded trainable."""
    observed = Observed()
    record = run_recipe(apply_overrides(load_recipe("llm2024"), SHORT), fixtures_dir / "models" / "tiny-gemma2",
                        fixtures_dir / "data" / "qa111_sample.jsonl", tmp_path, observed, adapter=str(first_adapter))
    assert record.adapter["mode"] == "loaded" and record.model["quantization"] == "nf4"
    layer = observed.trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert layer.weight.device.type == "cuda" and layer.weight.dtype == torch.uint8
    assert_trained(record, observed)


@pytest.mark.claim("A3", "A1")
def test_merge_and_continue_commands_work_and_name_a_missing_adapter(first_adapter, tmp_path, fixtures_dir):
    model = str(fixtures_dir / "models" / "tiny-gemma2")
    merged = subprocess.run([sys.executable, "-m", "reference", "merge", "--model", model, "--adapter", str(first_adapter),
                             "--output", str(tmp_path / "merged"), "--quantization", "nf4"], capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr
    assert json.loads(merged.stdout)["base_quantization"] == "nf4" and (tmp_path / "merged" / "model.safetensors").is_file()
    continued = subprocess.run([sys.executable, "-m", "reference", "continue", "--model", model, "--adapter", str(first_adapter),
                                "--data", str(fixtures_dir / "data" / "qa111_sample.jsonl"), "--columns", "instruction=input,response=output",
                                "--output", str(tmp_path / "more"), *SHORT], capture_output=True, text=True, timeout=300)
    assert continued.returncode == 0, continued.stderr
    assert json.loads(continued.stdout)["adapter"]["mode"] == "loaded"
    missing = subprocess.run([sys.executable, "-m", "reference", "continue", "--model", model, "--adapter", str(tmp_path / "no-adapter"),
                              "--data", str(fixtures_dir / "data" / "qa111_sample.jsonl"), "--columns", "instruction=input,response=output",
                              "--output", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no-adapter" in missing.stderr and "Traceback" not in missing.stderr
