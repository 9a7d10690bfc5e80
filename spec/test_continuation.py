"""Continuing from a LoRA adapter (seed 000): the two routes, resume versus restart, surviving a kill.

One uninterrupted run trains an adapter on the QA fixture for six steps (the "old" data; checkpoints at
steps 3 and 6); the tests continue from its checkpoint-3 the ways seed 000 asks about, resume an
interrupted copy of the same run, and merge. Expensive runs are module fixtures, shared by the tests
that look at them. The same continuation tests run on the CPU and, with a 4-bit base, on CUDA when a
GPU is there (A6; skipped with the reason when none is).

The schedule of every six-step run, by hand (lr 2e-3, warmup 2, then linear decay to 0 at step 6;
step s updates with the rate at scheduler count t = s - 1):
  t < 2:  lr = 2e-3 x t / 2            -> steps 1, 2: 0, 1e-3
  t >= 2: lr = 2e-3 x (6 - t) / (6 - 2) -> steps 3, 4, 5, 6: 2e-3, 1.5e-3, 1e-3, 5e-4
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reference import checkpoints, cli, lora, models, train
from reference.errors import InputError
from reference.recipes import apply_overrides, load_recipe
from spec.observe import Observed, assert_trained, run_recipe

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
THREE_STEPS = [
    "max_steps=3",
    "per_device_train_batch_size=4",
    "gradient_accumulation_steps=1",
    "warmup_steps=0",
    "save_steps=100",
    "logging_steps=1",
    "learning_rate=2e-3",
    "sft.max_seq_length=40",
    ON_THE_CPU,
]
QA = ["--columns", "instruction=input,response=output"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def tiny_gemma2(fixtures_dir) -> Path:
    return fixtures_dir / "models" / "tiny-gemma2"


def qa_data(fixtures_dir) -> Path:
    return fixtures_dir / "data" / "qa111_sample.jsonl"


def logits_of(model, device: str = "cpu") -> torch.Tensor:
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        return model(input_ids=IDS.to(device)).logits.float().cpu()


def base_logits(model_dir, device: str = "cpu", quantization: str = "nf4") -> torch.Tensor:
    base, _ = models.load_causal_lm(model_dir, dtype="bfloat16", quantization=quantization, device=device)
    return logits_of(base.eval(), device)


def base_plus_adapter_logits(model_dir, adapter, device: str = "cpu", quantization: str = "nf4") -> torch.Tensor:
    """The reference: peft's own frozen load of the adapter on the base, nothing of ours in between."""
    from peft import PeftModel

    base, _ = models.load_causal_lm(model_dir, dtype="bfloat16", quantization=quantization, device=device)
    return logits_of(PeftModel.from_pretrained(base, str(adapter)).eval(), device)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def adapter_tensors(directory) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]


def trained_b(tensors: dict) -> bool:
    """Whether some lora_B is no longer zero (B starts at zero, so only updates move it)."""
    return any(bool(t.any()) for name, t in tensors.items() if "lora_B" in name)


def run_cli(*argv) -> tuple[int, str, str]:
    """The command line in this process (no interpreter start-up): exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def uninterrupted(fixtures_dir, tmp_path_factory):
    """Six steps on the old data, never stopped; its checkpoint-3 is the saved adapter the tests continue."""
    output = tmp_path_factory.mktemp("uninterrupted")
    recipe = apply_overrides(load_recipe("llm2024"), SIX_STEPS)
    record = run_recipe(recipe, tiny_gemma2(fixtures_dir), qa_data(fixtures_dir), output, Observed())
    return SimpleNamespace(output=output, record=record, checkpoint=output / "checkpoints" / "checkpoint-3")


# --- A2: loading a saved adapter (fast: an untrained adapter is enough to count what is trainable) ---

TINY_GEMMA2_LORA_PER_LAYER = 1024
"""tiny-gemma2: hidden 64, 4 query heads and 2 key/value heads of 16, MLP 128. in + out per projection:
q 64+64, k 64+32, v 64+32, o 64+64, gate 64+128, up 64+128, down 128+64 = 128+96+96+128+192+192+192 = 1024."""


@pytest.fixture(scope="module")
def saved_fresh_adapter(fixtures_dir, tmp_path_factory):
    """The recipe's adapter (r=64, seven projections) saved untrained, as a checkpoint holds one."""
    directory = tmp_path_factory.mktemp("fresh") / "adapter"
    base, _ = models.load_causal_lm(tiny_gemma2(fixtures_dir))
    lora.attach(base, load_recipe("llm2024").lora).save_pretrained(directory)
    return directory


@pytest.mark.claim("A2")
def test_peft_default_loads_the_adapter_frozen_and_training_it_is_refused(saved_fresh_adapter, fixtures_dir):
    """Seed 000's "it only learned the new data": PeftModel.from_pretrained(base, dir) has
    is_trainable=False, so not one adapter weight can change. The project refuses a model with nothing to
    train, and loads the adapter trainable: r x 1024 per layer x 2 layers = 64 x 2048 = 131,072 weights."""
    from peft import PeftModel

    base, _ = models.load_causal_lm(tiny_gemma2(fixtures_dir))
    frozen = PeftModel.from_pretrained(base, str(saved_fresh_adapter))
    assert sum(p.numel() for p in frozen.parameters() if p.requires_grad) == 0
    with pytest.raises(InputError, match="is_trainable"):
        lora.require_trainable(frozen)
    base, _ = models.load_causal_lm(tiny_gemma2(fixtures_dir))
    ours = lora.load_adapter(base, saved_fresh_adapter)
    assert lora.require_trainable(ours) == 64 * TINY_GEMMA2_LORA_PER_LAYER * 2 == 131_072
    assert all(("lora_" in name) == p.requires_grad for name, p in ours.named_parameters())


@pytest.mark.claim("A2")
def test_an_adapter_loaded_to_generate_or_merge_stays_frozen(saved_fresh_adapter, fixtures_dir):
    """load_adapter(..., trainable=False) is peft's frozen load: generation and merging never train it."""
    base, _ = models.load_causal_lm(tiny_gemma2(fixtures_dir))
    frozen = lora.load_adapter(base, saved_fresh_adapter, trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.claim("A2")
def test_an_adapter_made_for_another_architecture_of_the_same_shapes_is_refused(fixtures_dir, tmp_path):
    """tiny-llama has tiny-gemma2's shapes (hidden 64, MLP 128, heads 4/2 of 16, 2 layers, vocab 2862), so
    peft would load its adapter onto Gemma without a word. The base the adapter records is read instead."""
    llama, _ = models.load_causal_lm(fixtures_dir / "models" / "tiny-llama")
    section = {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    lora.attach(llama, section).save_pretrained(tmp_path / "llama")
    gemma, _ = models.load_causal_lm(tiny_gemma2(fixtures_dir))
    with pytest.raises(InputError, match="model_type 'llama' vs 'gemma2'"):
        lora.load_adapter(gemma, tmp_path / "llama")


@pytest.mark.claim("A2")
def test_the_recorded_base_is_found_whatever_folder_the_command_runs_in(fixtures_dir, tmp_path, monkeypatch):
    """An adapter made on a base given by a relative path records the resolved directory, so the check
    above still finds the base when a later command runs from another folder."""
    monkeypatch.chdir(fixtures_dir.parent)
    llama, _ = models.load_causal_lm("fixtures/models/tiny-llama")
    lora.attach(llama, {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}).save_pretrained(tmp_path / "llama")
    recorded = json.loads((tmp_path / "llama" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((fixtures_dir / "models" / "tiny-llama").resolve())
    monkeypatch.chdir(tmp_path)
    gemma, _ = models.load_causal_lm(tiny_gemma2(fixtures_dir))
    with pytest.raises(InputError, match="model_type 'llama' vs 'gemma2'"):
        lora.load_adapter(gemma, tmp_path / "llama")


@pytest.mark.claim("A2")
def test_an_adapter_of_other_shapes_is_refused_even_when_its_recorded_base_is_gone(fixtures_dir, tmp_path):
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
    gemma, _ = models.load_causal_lm(tiny_gemma2(fixtures_dir))
    with pytest.raises(InputError, match="does not fit"):
        lora.load_adapter(gemma, tmp_path / "adapter")


@pytest.mark.claim("A2")
def test_an_adapter_missing_the_weights_of_a_layer_is_refused(saved_fresh_adapter, fixtures_dir, tmp_path):
    """peft only warns about missing adapter keys and leaves those layers' B at zero; that is an error here."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(saved_fresh_adapter, tmp_path / "partial")
    kept = {k: v for k, v in adapter_tensors(saved_fresh_adapter).items() if ".layers.1." not in k}
    save_file(kept, str(tmp_path / "partial" / "adapter_model.safetensors"))
    base, _ = models.load_causal_lm(tiny_gemma2(fixtures_dir))
    with pytest.raises(InputError, match="missing adapter keys"):
        lora.load_adapter(base, tmp_path / "partial")


class OpensAFile:
    """Unpickling this opens (creates) a file: the proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.claim("X6")
def test_an_adapter_with_only_pickled_weights_is_refused_without_unpickling_them(
    saved_fresh_adapter, fixtures_dir, tmp_path
):
    """Adapters load from safetensors only: adapter_model.bin is a pickle, and unpickling runs whatever it
    names. Here it would create `unpickled`; the merge command refuses with exit 2 and the file never appears."""
    import pickle
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(saved_fresh_adapter, pickled)
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(OpensAFile(tmp_path / "unpickled")))
    code, _, err = run_cli(
        "merge",
        "--model",
        str(tiny_gemma2(fixtures_dir)),
        "--adapter",
        str(pickled),
        "--output",
        str(tmp_path / "merged"),
    )
    assert code == 2 and "no adapter_model.safetensors" in err and "never unpickled" in err
    assert not (tmp_path / "unpickled").exists() and not (tmp_path / "merged").exists()


# --- A1, A4 (restart), A6, C15: continuing the saved adapter, on the CPU and on CUDA ---


@pytest.fixture(scope="module", params=DEVICES)
def continued(request, uninterrupted, fixtures_dir, tmp_path_factory):
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
        str(tiny_gemma2(fixtures_dir)),
        str(fixtures_dir / "data" / "magpie_sample.jsonl"),
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
    continued, uninterrupted, fixtures_dir
):
    """The continued model's logits equal peft's base(NF4) + checkpoint-3 within bf16 resolution, and are
    more than ten times that from the bare base's (a fresh adapter, B = 0, would give exactly the base's)."""
    expected = base_plus_adapter_logits(tiny_gemma2(fixtures_dir), uninterrupted.checkpoint, continued.device)
    assert max_difference(continued.before, expected) <= TOLERANCE
    assert max_difference(continued.before, base_logits(tiny_gemma2(fixtures_dir), continued.device)) > 10 * TOLERANCE
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
def test_the_continued_adapter_reloads_to_the_logits_it_trained_to(continued, fixtures_dir):
    """The saved output directory, loaded by peft onto a fresh NF4 base, gives the trained model's logits."""
    reloaded = base_plus_adapter_logits(tiny_gemma2(fixtures_dir), continued.output, continued.device)
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


def train_command(fixtures_dir, output) -> list[str]:
    return [
        sys.executable,
        "-m",
        "reference",
        "train",
        "--recipe",
        "llm2024",
        "--model",
        str(tiny_gemma2(fixtures_dir)),
        "--data",
        str(qa_data(fixtures_dir)),
        *QA,
        "--output",
        str(output),
        *SIX_STEPS,
    ]


@pytest.fixture(scope="module")
def killed_and_resumed(fixtures_dir, tmp_path_factory):
    """A real `train` process of the uninterrupted run's settings is sent SIGKILL after a random step past
    checkpoint-3 (4 or 5); a half-written newer checkpoint is left beside it, as a kill during a save
    leaves one (some bytes of a file, no marker); then `train --resume` runs to the end."""
    output = tmp_path_factory.mktemp("killed")
    kill_after = random.Random(1234).randint(4, 5)
    process = subprocess.Popen(train_command(fixtures_dir, output), stderr=subprocess.PIPE, text=True)
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
    resumed = subprocess.run(
        [*train_command(fixtures_dir, output), "--resume"], capture_output=True, text=True, timeout=600
    )
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
    """Resumed from checkpoint-3 the run goes on at step 4 (the global step restored) with lr 1.5e-3 (the
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


# --- A3: merge the adapter into the (dequantised) base, then a fresh adapter on top ---


@pytest.fixture(scope="module")
def merged(uninterrupted, fixtures_dir, tmp_path_factory):
    """`merge --quantization nf4` of checkpoint-3 into tiny-gemma2, through the command line."""
    output = tmp_path_factory.mktemp("merged") / "model"
    code, out, err = run_cli(
        "merge",
        "--model",
        tiny_gemma2(fixtures_dir),
        "--adapter",
        uninterrupted.checkpoint,
        "--output",
        output,
        "--quantization",
        "nf4",
    )
    assert code == 0, err
    return SimpleNamespace(output=output, summary=json.loads(out))


@pytest.mark.slow
@pytest.mark.claim("A3")
def test_merging_dequantises_the_nf4_base_and_gives_base_plus_adapter_logits(merged, uninterrupted, fixtures_dir):
    """W = dequant(W_nf4) + (alpha/r) B A, saved in bf16: its logits equal peft's base(NF4) + adapter
    within 4 x bf16 resolution. Merging onto the bf16 weights the NF4 ones were made from (no
    dequantisation: peft's own merge on the unquantised base) misses by more than that tolerance."""
    from peft import PeftModel

    model_dir = tiny_gemma2(fixtures_dir)
    assert merged.summary["base_quantization"] == "nf4"
    model, identity = models.load_causal_lm(merged.output, dtype="bfloat16")
    assert identity.quantization == "none" and model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    expected = base_plus_adapter_logits(model_dir, uninterrupted.checkpoint)
    assert max_difference(logits_of(model.eval()), expected) <= 4 * TOLERANCE

    unquantised, _ = models.load_causal_lm(model_dir, dtype="bfloat16")
    naive = PeftModel.from_pretrained(unquantised, str(uninterrupted.checkpoint)).merge_and_unload()
    assert max_difference(logits_of(naive.eval()), expected) > 4 * TOLERANCE


@pytest.mark.slow
@pytest.mark.claim("A3")
def test_continuing_by_merging_trains_a_fresh_adapter_on_the_merged_base(uninterrupted, fixtures_dir, tmp_path):
    """`continue --mode merge`: the merged base (the recipe's NF4 dequantised, as above) gets a new adapter
    that starts at zero and trains: the run says it created one, and its loss falls."""
    code, out, err = run_cli(
        "continue",
        "--mode",
        "merge",
        "--model",
        tiny_gemma2(fixtures_dir),
        "--adapter",
        uninterrupted.checkpoint,
        "--data",
        fixtures_dir / "data" / "magpie_sample.jsonl",
        "--output",
        tmp_path,
        *THREE_STEPS,
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["adapter"]["mode"] == "created" and summary["last_loss"] < summary["first_loss"]
    merged_base, identity = models.load_causal_lm(tmp_path / "merged-base", dtype="bfloat16")
    expected = base_plus_adapter_logits(tiny_gemma2(fixtures_dir), uninterrupted.checkpoint)
    assert identity.quantization == "none" and max_difference(logits_of(merged_base.eval()), expected) <= 4 * TOLERANCE


@pytest.mark.slow
@pytest.mark.claim("A1")
def test_the_continue_command_keeps_training_the_saved_adapter(uninterrupted, fixtures_dir, tmp_path):
    code, out, err = run_cli(
        "continue",
        "--model",
        tiny_gemma2(fixtures_dir),
        "--adapter",
        uninterrupted.checkpoint,
        "--data",
        fixtures_dir / "data" / "magpie_sample.jsonl",
        "--output",
        tmp_path,
        *THREE_STEPS,
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["adapter"]["mode"] == "loaded"
    assert summary["adapter"]["path"] == str(uninterrupted.checkpoint.resolve())
    assert summary["steps"] == 3 and summary["last_loss"] < summary["first_loss"]


@pytest.mark.claim("A1")
def test_a_missing_adapter_is_named_with_exit_code_2(fixtures_dir, tmp_path):
    code, _, err = run_cli(
        "continue",
        "--model",
        tiny_gemma2(fixtures_dir),
        "--adapter",
        tmp_path / "no-adapter",
        "--data",
        qa_data(fixtures_dir),
        *QA,
        "--output",
        tmp_path / "x",
    )
    assert code == 2 and str(tmp_path / "no-adapter") in err and "no adapter_config.json" in err


# --- X3: torchrun ---


def rank_logs(log_dir: Path) -> dict[str, str]:
    """Every file torchrun wrote per rank (stdout.log, stderr.log), whole, by path."""
    return {str(p.relative_to(log_dir)): p.read_text(errors="replace") for p in sorted(log_dir.rglob("*.log"))}


def torchrun_failure(result, log_dir: Path) -> str:
    logs = "".join(f"\n===== {name} =====\n{text}" for name, text in rank_logs(log_dir).items())
    return f"torchrun exit {result.returncode}\n===== launcher stderr =====\n{result.stderr}{logs}"


SLOW_RANK_1 = """
import os
if os.environ.get("RANK") == "1":  # the second process writes its part of each checkpoint 2 s late
    import time
    from transformers import Trainer
    save_rng_state = Trainer._save_rng_state
    def late(self, output_dir):
        time.sleep(2)
        save_rng_state(self, output_dir)
    Trainer._save_rng_state = late
"""


@pytest.mark.slow
@pytest.mark.claim("X3")
def test_torchrun_with_two_processes_follows_the_world_size_step_plan_and_keeps_both_in_step(tmp_path, fixtures_dir):
    """`torchrun --nproc_per_node 2` (DDP over gloo on the CPU) with the llm2024 recipe. By hand: 24 records,
    batch 2 on each of 2 processes = 6 micro-batches per process, accumulation 2 -> 3 optimizer steps in the
    epoch (a single process would take 6). Both processes end with the same, trained adapter weights.

    Each process writes its own RNG state into a checkpoint; the Trainer's save of it is made 2 s late on
    rank 1 (a sitecustomize on its path), and the final checkpoint must still be marked complete with both
    files in the marker: the marker waits for every process.

    The rendezvous store binds port 0 itself (a free port, chosen by the OS when it binds: no clash with a
    run beside this one, no window between finding the port and taking it). Each rank's whole stdout and
    stderr go to files, shown in full on failure; faulthandler dumps every thread's stack on a fatal signal."""
    logs, hooks = tmp_path / "logs", tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_RANK_1)
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "127.0.0.1:0",
        "--rdzv-id",
        uuid.uuid4().hex,
        "--log-dir",
        str(logs),
        "--redirects",
        "3",
    ]
    command = [
        "-m",
        "reference",
        "train",
        "--recipe",
        "llm2024",
        "--model",
        str(tiny_gemma2(fixtures_dir)),
        "--data",
        str(qa_data(fixtures_dir)),
        *QA,
        "--output",
        str(tmp_path / "run"),
        "num_train_epochs=1",
        "per_device_train_batch_size=2",
        "gradient_accumulation_steps=2",
        "warmup_steps=0",
        "save_steps=100",
        "learning_rate=2e-3",
        "sft.max_seq_length=40",
        ON_THE_CPU,
    ]  # gloo, on a GPU machine too
    path = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONFAULTHANDLER": "1", "TORCH_SHOW_CPP_STACKTRACES": "1"}
    result = subprocess.run([*launcher, *command], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, torchrun_failure(result, logs)

    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["step_plan"]["world_size"] == 2 and manifest["step_plan"]["micro_batches_per_epoch"] == 6
    assert manifest["step_plan"]["total_optimizer_steps"] == 3 == len(manifest["steps"])
    digests = manifest["trainable_sha256_per_process"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert manifest["steps"][-1]["loss"] < manifest["steps"][0]["loss"]
    assert trained_b(adapter_tensors(tmp_path / "run"))
    final = tmp_path / "run" / "checkpoints" / "checkpoint-3"
    marked = json.loads((final / "complete.json").read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(marked) and checkpoints.why_incomplete(final) is None
    outputs = {name: text for name, text in rank_logs(logs).items() if name.endswith("stdout.log")}
    assert sorted(text.count('"manifest"') for text in outputs.values()) == [0, 1]  # one summary, from rank 0


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
