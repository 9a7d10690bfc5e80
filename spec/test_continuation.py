"""Continuing from a LoRA adapter (seed 000): the two routes, resume versus restart, surviving a kill.

The library calls this file is about, each shown in a test beside the project's function that wraps it:

    PeftModel.from_pretrained(base, adapter_dir)                     frozen: peft's default (A2)
    PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)  training goes on (A1)   = lora.load_adapter
    base.dequantize(); PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
                                                                     the merge route (A3)    = lora.merge
    Trainer.train(resume_from_checkpoint=checkpoint_dir)             resuming a run (A4)     = train.run(resume=True)

One uninterrupted run trains an adapter on the QA fixture for six steps (the "old" data; checkpoints at
steps 3 and 6); the tests continue from its checkpoint-3 the ways seed 000 asks about, resume an
interrupted copy of the same run, and merge. Expensive runs are module fixtures, shared by the tests
that look at them. The same continuation tests run on the CPU and, with a 4-bit base, on CUDA when a
GPU is there (A6; skipped with the reason when none is). The `continue` and `merge` commands built on
these calls are checked in spec/test_cli.py.

The schedule of every six-step run, by hand (lr 2e-3, warmup 2, then linear decay to 0 at step 6;
step s updates with the rate at scheduler count t = s - 1):
  t < 2:  lr = 2e-3 x t / 2            -> steps 1, 2: 0, 1e-3
  t >= 2: lr = 2e-3 x (6 - t) / (6 - 2) -> steps 3, 4, 5, 6: 2e-3, 1.5e-3, 1e-3, 5e-4
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from reference import checkpoints, lora, models, train
from reference.errors import InputError
from reference.recipes import apply_overrides, load_recipe
from spec.cli_runner import cli_command, offline_env, run_cli
from spec.observe import Observed, assert_trained, run_recipe
from spec.trainer_probe import OneWeight, one_weight_dataset

TOLERANCE = 2**-7  # bf16 resolution near 1: fp32 norms in training vs bf16 ones in a plain reload
IDS = torch.tensor([[2, 120, 340, 560, 780, 1000, 1200]])
ON_THE_CPU = "use_cpu=true"  # bit-identical resumption is claimed on the CPU; a GPU machine runs these there too
SIX_STEPS = [
    "max_steps=6",
    "per_device_train_batch_size=4",
    "gradient_accumulation_steps=1",
    "warmup_steps=2",
    "save_steps=3",
    "logging_steps=1",
    "learning_rate=2e-3",
    "sft.max_seq_length=40",
    ON_THE_CPU,
]
SCHEDULE = [0.0, 1e-3, 2e-3, 1.5e-3, 1e-3, 5e-4]  # the module docstring's derivation, steps 1..6
QA = ["--columns", "instruction=input,response=output"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def logits_of(model, device: str = "cpu") -> torch.Tensor:
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        return model(input_ids=IDS.to(device)).logits.float().cpu()


def base_logits(model_dir, device: str = "cpu", quantization: str = "nf4") -> torch.Tensor:
    base, _ = models.load_causal_lm(model_dir, dtype="bfloat16", quantization=quantization, device=device)
    return logits_of(base.eval(), device)


def base_plus_adapter_logits(model_dir, adapter, device: str = "cpu", quantization: str = "nf4") -> torch.Tensor:
    """The reference: peft's own frozen load of the adapter on the base, nothing of ours in between."""
    base, _ = models.load_causal_lm(model_dir, dtype="bfloat16", quantization=quantization, device=device)
    return logits_of(PeftModel.from_pretrained(base, str(adapter)).eval(), device)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def adapter_tensors(directory) -> dict:
    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def trainable_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]


def trained_b(tensors: dict) -> bool:
    """Whether some lora_B is no longer zero (B starts at zero, so only updates move it)."""
    return any(bool(t.any()) for name, t in tensors.items() if "lora_B" in name)


@pytest.fixture(scope="module")
def uninterrupted(tiny_gemma2_dir, qa_data, tmp_path_factory):
    """Six steps on the old data, never stopped; its checkpoint-3 is the saved adapter the tests continue."""
    output = tmp_path_factory.mktemp("uninterrupted")
    recipe = apply_overrides(load_recipe("llm2024"), SIX_STEPS)
    record = run_recipe(recipe, tiny_gemma2_dir, qa_data, output, Observed())
    return SimpleNamespace(output=output, record=record, checkpoint=output / "checkpoints" / "checkpoint-3")


# --- A2: loading a saved adapter (fast: an untrained adapter is enough to count what is trainable) ---

TINY_GEMMA2_LORA_PER_LAYER = 1024
"""tiny-gemma2: hidden 64, 4 query heads and 2 key/value heads of 16, MLP 128. in + out per projection:
q 64+64, k 64+32, v 64+32, o 64+64, gate 64+128, up 64+128, down 128+64 = 128+96+96+128+192+192+192 = 1024."""


@pytest.fixture(scope="module")
def saved_fresh_adapter(tiny_gemma2_dir, tmp_path_factory):
    """The recipe's adapter (r=64, seven projections) saved untrained, as a checkpoint holds one."""
    directory = tmp_path_factory.mktemp("fresh") / "adapter"
    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    lora.attach(base, load_recipe("llm2024").lora).save_pretrained(directory)
    return directory


@pytest.mark.claim("A2")
def test_peft_loads_a_saved_adapter_frozen_unless_asked_for_is_trainable(saved_fresh_adapter, tiny_gemma2_dir):
    """Seed 000's "it only learned the new data": PeftModel.from_pretrained(base, dir) has
    is_trainable=False, so not one adapter weight can change. With is_trainable=True every LoRA weight
    trains and nothing else does: r x 1024 per layer x 2 layers = 64 x 2048 = 131,072 weights."""
    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    frozen = PeftModel.from_pretrained(base, str(saved_fresh_adapter))
    assert sum(p.numel() for p in frozen.parameters() if p.requires_grad) == 0

    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    trainable = PeftModel.from_pretrained(base, str(saved_fresh_adapter), is_trainable=True)
    assert sum(w.numel() for w in trainable_weights(trainable).values()) == 64 * TINY_GEMMA2_LORA_PER_LAYER * 2
    assert all("lora_" in name for name in trainable_weights(trainable))


@pytest.mark.claim("A2")
def test_training_an_adapter_peft_loaded_frozen_is_refused(saved_fresh_adapter, tiny_gemma2_dir):
    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    frozen = PeftModel.from_pretrained(base, str(saved_fresh_adapter))
    with pytest.raises(InputError, match="is_trainable"):
        lora.require_trainable(frozen)


@pytest.mark.claim("A1", "A2")
def test_load_adapter_is_peft_loading_it_with_is_trainable_true(saved_fresh_adapter, tiny_gemma2_dir):
    """lora.load_adapter(base, dir) checks the adapter first (below), then gives what peft's call gives: the
    same weights under the same names, trainable; 131,072 of them, the LoRA weights and nothing else."""
    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    ours = lora.load_adapter(base, saved_fresh_adapter)
    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    theirs = PeftModel.from_pretrained(base, str(saved_fresh_adapter), is_trainable=True)
    assert_same_tensors(trainable_weights(ours), trainable_weights(theirs))
    assert lora.require_trainable(ours) == 64 * TINY_GEMMA2_LORA_PER_LAYER * 2 == 131_072
    assert all(("lora_" in name) == p.requires_grad for name, p in ours.named_parameters())


@pytest.mark.claim("A2")
def test_an_adapter_loaded_to_generate_or_merge_stays_frozen(saved_fresh_adapter, tiny_gemma2_dir):
    """load_adapter(..., trainable=False) is peft's default, frozen load: generation and merging never train it."""
    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    frozen = lora.load_adapter(base, saved_fresh_adapter, trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    assert_same_tensors(frozen.state_dict(), PeftModel.from_pretrained(base, str(saved_fresh_adapter)).state_dict())


@pytest.mark.claim("A2")
def test_an_adapter_made_for_another_architecture_of_the_same_shapes_is_refused(
    tiny_llama_dir, tiny_gemma2_dir, tmp_path
):
    """tiny-llama has tiny-gemma2's shapes (hidden 64, MLP 128, heads 4/2 of 16, 2 layers, vocab 2862), so
    peft would load its adapter onto Gemma without a word. The base the adapter records is read instead."""
    llama, _ = models.load_causal_lm(tiny_llama_dir)
    section = {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    lora.attach(llama, section).save_pretrained(tmp_path / "llama")
    gemma, _ = models.load_causal_lm(tiny_gemma2_dir)
    with pytest.raises(InputError, match="model_type 'llama' vs 'gemma2'"):
        lora.load_adapter(gemma, tmp_path / "llama")


@pytest.mark.claim("A2")
def test_the_recorded_base_is_found_whatever_folder_the_command_runs_in(
    fixtures_dir, tiny_llama_dir, tiny_gemma2_dir, tmp_path, monkeypatch
):
    """An adapter made on a base given by a relative path records the resolved directory, so the check
    above still finds the base when a later command runs from another folder."""
    monkeypatch.chdir(fixtures_dir.parent)
    llama, _ = models.load_causal_lm("fixtures/models/tiny-llama")
    lora.attach(llama, {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}).save_pretrained(tmp_path / "llama")
    recorded = json.loads((tmp_path / "llama" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(tiny_llama_dir.resolve())
    monkeypatch.chdir(tmp_path)
    gemma, _ = models.load_causal_lm(tiny_gemma2_dir)
    with pytest.raises(InputError, match="model_type 'llama' vs 'gemma2'"):
        lora.load_adapter(gemma, tmp_path / "llama")


@pytest.mark.claim("A2")
def test_an_adapter_of_other_shapes_is_refused_even_when_its_recorded_base_is_gone(tiny_gemma2_dir, tmp_path):
    """A Llama of hidden size 32 gets an adapter; its base directory is then deleted, so only peft's
    shape check is left: the error names the adapter and the base it does not fit."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_hidden_layers=2,
        vocab_size=2862,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "small")
    small, _ = models.load_causal_lm(tmp_path / "small")
    lora.attach(small, {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}).save_pretrained(tmp_path / "adapter")
    shutil.rmtree(tmp_path / "small")
    gemma, _ = models.load_causal_lm(tiny_gemma2_dir)
    with pytest.raises(InputError, match="does not fit"):
        lora.load_adapter(gemma, tmp_path / "adapter")


@pytest.mark.claim("A2")
def test_an_adapter_missing_the_weights_of_a_layer_is_refused(saved_fresh_adapter, tiny_gemma2_dir, tmp_path):
    """peft only warns about missing adapter keys and leaves those layers' B at zero; that is an error here."""
    import shutil

    shutil.copytree(saved_fresh_adapter, tmp_path / "partial")
    kept = {k: v for k, v in adapter_tensors(saved_fresh_adapter).items() if ".layers.1." not in k}
    save_file(kept, str(tmp_path / "partial" / "adapter_model.safetensors"))
    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    with pytest.raises(InputError, match="missing adapter keys"):
        lora.load_adapter(base, tmp_path / "partial")


# --- A1, A4 (restart), A6, C15: continuing the saved adapter, on the CPU and on CUDA ---


@pytest.fixture(scope="module", params=DEVICES)
def continued(request, uninterrupted, tiny_gemma2_dir, magpie_data, tmp_path_factory):
    """Six steps on the new data (the magpie sample) from the uninterrupted run's checkpoint-3, on
    `device`; the logits are taken before the first update and after the last."""
    device = request.param
    output, observed, seen = tmp_path_factory.mktemp(f"continued-{device}"), Observed(), {}

    def before_train(trainer):
        observed.before_train(trainer)
        seen["before"] = logits_of(trainer.model, device)

    overrides = [*SIX_STEPS, f"use_cpu={str(device == 'cpu').lower()}"]  # the later setting wins
    record = train.run(
        apply_overrides(load_recipe("llm2024"), overrides),
        str(tiny_gemma2_dir),
        str(magpie_data),
        str(output),
        say=observed.lines.append,
        before_train=before_train,
        adapter=str(uninterrupted.checkpoint),
    )
    return SimpleNamespace(
        device=device,
        record=record,
        observed=observed,
        output=output,
        before=seen["before"],
        after=logits_of(observed.trainer.model, device),
    )


@pytest.mark.slow
@pytest.mark.claim("A1", "A6")
def test_before_the_first_update_the_model_is_base_plus_the_saved_adapter_not_the_base(
    continued, uninterrupted, tiny_gemma2_dir
):
    """The continued model's logits equal peft's base(NF4) + checkpoint-3 within bf16 resolution, and are
    more than ten times that from the bare base's (a fresh adapter, B = 0, would give exactly the base's)."""
    expected = base_plus_adapter_logits(tiny_gemma2_dir, uninterrupted.checkpoint, continued.device)
    assert max_difference(continued.before, expected) <= TOLERANCE
    assert max_difference(continued.before, base_logits(tiny_gemma2_dir, continued.device)) > 10 * TOLERANCE
    assert continued.record.adapter["mode"] == "loaded"
    assert any("adapter loaded" in line for line in continued.observed.lines)


@pytest.mark.slow
@pytest.mark.claim("A1", "A6")
def test_continuing_trains_the_loaded_adapter_and_leaves_the_4bit_base_frozen(continued):
    """The loss falls, every adapter weight changes, no base weight does; the base stays packed 4-bit
    (uint8 storage) on the device it trains on."""
    layer = continued.observed.trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert continued.record.model["quantization"] == "nf4"
    assert layer.weight.dtype == torch.uint8 and layer.weight.device.type == continued.device
    assert_trained(continued.record, continued.observed)
    assert all(("lora_" in name) == p.requires_grad for name, p in continued.observed.trainer.model.named_parameters())


@pytest.mark.slow
@pytest.mark.claim("A1", "A6", "C16")
def test_the_continued_adapter_reloads_to_the_logits_it_trained_to(continued, tiny_gemma2_dir):
    """The saved output directory, loaded by peft onto a fresh NF4 base, gives the trained model's logits."""
    reloaded = base_plus_adapter_logits(tiny_gemma2_dir, continued.output, continued.device)
    assert max_difference(continued.after, reloaded) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.claim("C15", "A6")
def test_use_cache_is_off_at_every_training_step_and_on_again_after(continued):
    assert continued.observed.use_cache == [False] * 6
    assert continued.observed.trainer.model.config.use_cache is True
    assert continued.record.use_cache == {"during_training": False, "after_training": True}


@pytest.mark.slow
@pytest.mark.claim("A4", "A6")
def test_continuing_from_adapter_weights_starts_a_new_schedule_at_step_0(continued):
    """checkpoint-3 holds the old run's optimizer and scheduler at step 3; continuing from its adapter
    weights ignores them: steps 1..6 again, warmup first (lr 0, 1e-3: the module docstring)."""
    assert [s["step"] for s in continued.record.steps] == [1, 2, 3, 4, 5, 6] and continued.record.resumed_from is None
    assert [s["learning_rate"] for s in continued.record.steps] == pytest.approx(SCHEDULE)


# --- A4 (resume) and X1: a run killed mid-way carries on from its last complete checkpoint ---


class StepsRun(TrainerCallback):
    """The optimizer steps a Trainer takes in this process."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def one_weight_trainer(output_dir: Path, model: OneWeight | None = None) -> Trainer:
    """Six steps of y = w x (spec/trainer_probe.py) with Adam: warmup 2, linear decay, a checkpoint every 3."""
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        max_steps=6,
        warmup_steps=2,
        save_steps=3,
        logging_steps=1,
        learning_rate=0.1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    return Trainer(model=model or OneWeight(), args=args, train_dataset=one_weight_dataset(12), callbacks=[StepsRun()])


def steps_run(trainer: Trainer) -> list[int]:
    return next(c.steps for c in trainer.callback_handler.callbacks if isinstance(c, StepsRun))


def rates_logged(trainer: Trainer) -> list[tuple[int, float, float]]:
    return [(e["step"], e["learning_rate"], e["loss"]) for e in trainer.state.log_history if "loss" in e]


@pytest.mark.claim("A4")
def test_trainer_train_resume_from_checkpoint_goes_on_at_its_step_with_its_schedule(tmp_path):
    """The library call under `train --resume`: Trainer.train(resume_from_checkpoint=DIR), on a one-weight
    model. A new Trainer resumed from checkpoint-3 of a six-step run takes steps 4-6 only, at the same
    rates and losses, and ends at the same weight bit for bit. Trained from checkpoint-3's weight alone
    (no resume), it starts a new schedule: steps 1-6 again, the first at lr 0 (warmup)."""
    whole = one_weight_trainer(tmp_path / "whole")
    whole.train()
    resumed = one_weight_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    assert steps_run(resumed) == [4, 5, 6]
    assert rates_logged(resumed) == rates_logged(whole)  # 1-3 read back from the checkpoint, 4-6 trained again
    assert torch.equal(resumed.model.w, whole.model.w)

    weight_only = OneWeight()
    weight_only.load_state_dict(load_file(str(tmp_path / "whole" / "checkpoint-3" / "model.safetensors")))
    restarted = one_weight_trainer(tmp_path / "restarted", weight_only)
    restarted.train()
    assert steps_run(restarted) == [1, 2, 3, 4, 5, 6] and rates_logged(restarted)[0][1] == 0.0


def train_command(model, data, output) -> list:
    """`train` with the uninterrupted run's settings: the llm2024 recipe cut to six steps."""
    return ["train", "--recipe", "llm2024", "--model", model, "--data", data, *QA, "--output", output, *SIX_STEPS]


@pytest.fixture(scope="module")
def killed_and_resumed(tiny_gemma2_dir, qa_data, tmp_path_factory):
    """A real `train` process of the uninterrupted run's settings is sent SIGKILL after a random step past
    checkpoint-3 (4 or 5); a half-written newer checkpoint is left beside it, as a kill during a save
    leaves one (some bytes of a file, no marker); then `train --resume` runs to the end."""
    output = tmp_path_factory.mktemp("killed")
    command = train_command(tiny_gemma2_dir, qa_data, output)
    kill_after = random.Random(1234).randint(4, 5)
    process = subprocess.Popen(cli_command(*command), stderr=subprocess.PIPE, text=True, env=offline_env())
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith("epoch ") and f" step {kill_after}/6 " in line:
            process.send_signal(signal.SIGKILL)
            break
    process.stderr.close()
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(seen)
    saved = output / "checkpoints"
    half = saved / "checkpoint-99"
    half.mkdir()
    written = (saved / "checkpoint-3" / "adapter_model.safetensors").read_bytes()
    (half / "adapter_model.safetensors").write_bytes(written[:100])
    resumed = run_cli(*command, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    return SimpleNamespace(
        output=output,
        stderr=resumed.stderr,
        manifest=json.loads((output / "manifest.json").read_text(encoding="utf-8")),
    )


@pytest.mark.slow
@pytest.mark.claim("A4")
def test_resuming_a_checkpoint_goes_on_at_its_step_with_its_optimizer_scheduler_and_rng(
    killed_and_resumed, uninterrupted
):
    """`train --resume` hands the newest complete checkpoint to Trainer.train(resume_from_checkpoint=...).
    Resumed from checkpoint-3 the run goes on at step 4 (the global step restored) with lr 1.5e-3 (the
    scheduler), and ends with the uninterrupted run's adapter bit for bit, which needs Adam's moments (the
    optimizer) and NEFTune's noise and the data order (the RNG states) restored as well."""
    manifest = killed_and_resumed.manifest
    assert manifest["resumed_from"].endswith("checkpoint-3")
    assert [s["step"] for s in manifest["steps"]] == [4, 5, 6]
    assert [s["learning_rate"] for s in manifest["steps"]] == pytest.approx(SCHEDULE[3:])
    assert_same_tensors(adapter_tensors(killed_and_resumed.output), adapter_tensors(uninterrupted.output))


@pytest.mark.slow
@pytest.mark.claim("X1")
def test_a_run_killed_at_a_random_step_resumes_to_bit_identical_adapter_weights(killed_and_resumed, uninterrupted):
    """`train --resume` skips the half-written checkpoint-99 (no marker), says so, carries on from the
    newest complete checkpoint and ends with the uninterrupted run's exact weights."""
    assert "skipping checkpoint-99: no complete.json" in killed_and_resumed.stderr
    assert "resuming from checkpoint-3" in killed_and_resumed.stderr
    assert_same_tensors(adapter_tensors(killed_and_resumed.output), adapter_tensors(uninterrupted.output))
    assert trained_b(adapter_tensors(killed_and_resumed.output))  # the weights compared are trained ones


@pytest.mark.slow
@pytest.mark.claim("X8", "X1")
def test_verify_says_the_resumed_run_reproduces_the_uninterrupted_one_it_continues(killed_and_resumed, uninterrupted):
    """The resumed run recorded steps 4-6 only; verify matches steps by number, so it compares losses at 4-6
    (equal bit for bit on the CPU: rtol 0) and notes that steps 1-3 belong to the run before the resume."""
    from reference import manifest

    verdict = manifest.compare(manifest.load(uninterrupted.output), manifest.load(killed_and_resumed.output), rtol=0)
    assert verdict.reproduces, verdict.differences
    assert verdict.steps_compared == [4, 5, 6] and verdict.max_loss_difference == 0
    assert any(note.startswith("3 steps, 1 to 3 only in A: B resumed from") for note in verdict.notes)


def whole_checkpoint(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True)
    for name, content in files.items():
        (directory / name).write_bytes(content)
    checkpoints.mark_complete(directory)
    return directory


@pytest.mark.claim("X1")
def test_a_checkpoint_is_complete_only_with_its_marker_and_every_file_as_written(tmp_path):
    checkpoint = whole_checkpoint(tmp_path / "checkpoint-2", {"a.bin": b"12345", "optimizer.pt": b"x"})
    assert checkpoints.why_incomplete(checkpoint) is None
    (checkpoint / "a.bin").write_bytes(b"1234")
    assert checkpoints.why_incomplete(checkpoint) == "changed since written: a.bin"
    (checkpoint / "a.bin").unlink()
    assert checkpoints.why_incomplete(checkpoint) == "missing a.bin"
    (checkpoint / "complete.json").write_text("{")
    assert checkpoints.why_incomplete(checkpoint) == "complete.json is unreadable"
    (checkpoint / "complete.json").unlink()
    assert checkpoints.why_incomplete(checkpoint).startswith("no complete.json")


@pytest.mark.claim("X1")
def test_resuming_takes_the_newest_complete_checkpoint_by_step_and_names_the_ones_it_skips(tmp_path):
    """Steps 9 and 10 are whole; 11 changed after its marker; 12 has no marker (killed while writing);
    'checkpoint-final' is not a step. Newest by step number (10 > 9, though "10" < "9" as text)."""
    for step in (9, 10, 11):
        whole_checkpoint(tmp_path / f"checkpoint-{step}", {"adapter_model.safetensors": bytes([step])})
    (tmp_path / "checkpoint-11" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "checkpoint-12").mkdir()
    (tmp_path / "checkpoint-12" / "adapter_model.safetensors").write_bytes(b"half")
    whole_checkpoint(tmp_path / "checkpoint-final", {"adapter_model.safetensors": b"?"})
    said = []
    assert checkpoints.last_complete(tmp_path, say=said.append) == tmp_path / "checkpoint-10"
    assert said == [
        "skipping checkpoint-12: no complete.json (the run stopped while writing it)",
        "skipping checkpoint-11: changed since written: adapter_model.safetensors",
    ]


@pytest.mark.claim("X1")
def test_resuming_with_no_complete_checkpoint_is_refused(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(InputError, match="no complete checkpoint"):
        checkpoints.last_complete(tmp_path, say=lambda _: None)


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
