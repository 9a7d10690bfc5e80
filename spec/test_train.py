"""A whole SFT run (reference/train.py) on the tiny Gemma-2: real Trainer, real peft, real bitsandbytes.

The llm2024 recipe is cut to 4 optimizer steps of 2 micro-batches of 2 short records (RUN) and trained on
four bases: LoRA on an NF4 base (the recipe's QLoRA), on an int8 and on a bf16 base, and full fine-tuning
(the recipe without its [lora] section). Each run is made once per module and device and shared by the tests
that read it; every test runs on the CPU and, when CUDA is present, again on the GPU with the same
assertions (`gpu`-marked parameters are reported as skipped, not passed, without one).

By hand, for the tiny Gemma-2 (hidden 64, 4 query heads and 2 key/value heads of 16, MLP 128, 2 layers,
vocabulary 2,862, tied head). Projection weights (out x in) per layer: q 64x64 = 4,096, k 32x64 = 2,048,
v 2,048, o 64x64 = 4,096, gate 128x64 = 8,192, up 8,192, down 64x128 = 8,192; 36,864 a layer, 73,728 in all.
Everything else: embeddings 2,862 x 64 = 183,168, four RMSNorms of 64 a layer (512) and the final norm (64):
183,744. So 257,472 parameters, all trainable in full fine-tuning.

LoRA r = 64 on the seven projections trains r x (in + out) each: q 64x128 = 8,192, k 64x96 = 6,144,
v 6,144, o 8,192, gate 64x192 = 12,288, up 12,288, down 12,288 = 65,536 a layer, 131,072 in all.

Weight memory as loaded (the non-projection parameters always bf16: 183,744 x 2 = 367,488 bytes):
* bf16: 257,472 x 2 = 514,944 bytes;
* int8: each projection n bytes + one fp32 scale per output row: q 4,096 + 256, k 2,048 + 128, v the same,
  o 4,352, gate 8,192 + 512, up the same, down 8,192 + 256 -> 4,352 + 2,176 + 2,176 + 4,352 + 8,704 + 8,704
  + 8,448 = 38,912 a layer, 77,824 + 367,488 = 445,312 bytes;
* NF4 with double quantisation (the recipe): n/2 packed bytes, one uint8 absmax per 64 values, one fp32
  absmax per 256 of those and an fp32 offset, the 16-value fp32 NF4 map (64 bytes) and the 256-value fp32
  map of the absmaxes (1,024 bytes): q 2,048 + 64 + 4 + 4 + 64 + 1,024 = 3,208, k 1,024 + 32 + 4 + 4 + 1,088
  = 2,152, v 2,152, o 3,208, gate/up/down 4,096 + 128 + 8 + 1,088 = 5,320 each -> 26,680 a layer, 53,360
  + 367,488 = 420,848 bytes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from reference import cli, lora, models, train
from reference.errors import InputError
from reference.recipes import apply_overrides, load_recipe
from spec.observe import QA_COLUMNS, Observed, assert_trained, run_recipe, unwrapped

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
RUN = [
    "max_steps=4",
    "per_device_train_batch_size=2",
    "gradient_accumulation_steps=2",
    "warmup_steps=0",
    "save_steps=2",
    "logging_steps=1",
    "learning_rate=2e-3",
    "sft.max_seq_length=64",
]
"""By hand: 24 records / batch 2 = 12 micro-batches an epoch, 6 optimizer steps at accumulation 2; max_steps 4
stops inside the first epoch after 8 micro-batches (16 records). Checkpoints at steps 2 and 4."""
QUANTIZATION = {"nf4": load_recipe("llm2024").quantization, "int8": {"load_in_8bit": True}, "bf16": {}, "full": {}}
IDS = torch.tensor([[2, 100, 200, 300, 400, 500, 600, 700]])
TIED_TOLERANCE = 2**-7  # bf16 resolution near 1: training keeps norms in fp32 (peft), a plain reload in bf16

LORA_TRAINABLE, FULL_PARAMETERS = 131_072, 257_472
WEIGHT_BYTES = {"nf4": 420_848, "int8": 445_312, "bf16": 514_944, "full": 514_944}


@dataclass
class Run:
    record: train.RunRecord
    observed: Observed
    output: Path
    device: str
    data: Path


def mixed_length_records(directory: Path) -> Path:
    """The QA fixture with each question cut to 12 characters and each answer to 4, 11, 18 or 25: records of
    about 58 to 92 tokens, so with max_seq_length 64 some micro-batches are padded and some are not."""
    from spec.conftest import FIXTURES

    lines = (FIXTURES / "data" / "qa111_sample.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    path = directory / "qa_mixed.jsonl"
    path.write_text(
        "".join(
            json.dumps({"input": r["input"][:12], "output": r["output"][: 4 + 7 * (i % 4)]}, ensure_ascii=False) + "\n"
            for i, r in enumerate(rows)
        ),
        encoding="utf-8",
    )
    return path


def recipe_for(base: str, device: str):
    """llm2024 cut to RUN, on `base`; on the CPU even where CUDA is present (use_cpu) for the cpu parameter."""
    recipe = apply_overrides(load_recipe("llm2024"), RUN + (["use_cpu=true"] if device == "cpu" else []))
    recipe.quantization = dict(QUANTIZATION[base])
    if base == "full":
        recipe.lora = {}
    return recipe


def autocast(device: str):
    return torch.autocast(device, dtype=torch.bfloat16)  # bf16=True: how the Trainer runs the forward pass


def watch_logits(observed: Observed, device: str, seen: dict):
    """before_train: also the logits before the first update, with the adapter and (LoRA) without it."""

    def before_train(trainer):
        observed.before_train(trainer)
        model, ids = trainer.model, IDS.to(device)
        with torch.no_grad(), autocast(device):
            seen["model"] = model(input_ids=ids).logits.float()
            if hasattr(model, "disable_adapter"):
                with model.disable_adapter():
                    seen["base"] = model(input_ids=ids).logits.float()

    return before_train


def train_on(base: str, device: str, data: Path, output: Path) -> Run:
    from spec.conftest import FIXTURES

    observed, seen = Observed(), {}
    record = train.run(
        recipe_for(base, device),
        str(FIXTURES / "models" / "tiny-gemma2"),
        str(data),
        str(output),
        columns=QA_COLUMNS,
        say=observed.lines.append,
        before_train=watch_logits(observed, device, seen),
    )
    observed.logits_before = seen
    return Run(record, observed, output, device, data)


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="module")
def runs(device, tmp_path_factory):
    """runs(base) trains on that base once per module and device."""
    data = mixed_length_records(tmp_path_factory.mktemp("data"))
    done = {}

    def run(base: str) -> Run:
        if base not in done:
            done[base] = train_on(base, device, data, tmp_path_factory.mktemp(f"{base}-{device}"))
        return done[base]

    return run


# ------------------------------------------------------------------ D1: one method on every base


@pytest.mark.slow
@pytest.mark.claim("D1", "C12")
@pytest.mark.parametrize("base", ["nf4", "int8", "bf16"])
def test_lora_on_each_base_lowers_the_loss_and_trains_exactly_the_adapter(runs, base):
    """Loss fell, every LoRA weight changed, nothing else did; trainable parameters and weight memory as
    derived in the module docstring, reported in the run's own line and record."""
    run = runs(base)
    record, observed = run.record, run.observed
    assert_trained(record, observed)
    trainable = {n for n, p in observed.trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert record.adapter["mode"] == "created"
    assert record.trainable_parameters == LORA_TRAINABLE and record.weight_bytes == WEIGHT_BYTES[base]
    reported = f"{LORA_TRAINABLE:,} of", f"weights {WEIGHT_BYTES[base]:,} bytes"
    assert any(all(part in line for part in reported) for line in observed.lines)


@pytest.mark.slow
@pytest.mark.claim("D1")
def test_full_fine_tuning_without_a_lora_section_trains_every_weight(runs):
    """A recipe with no [lora] section: no adapter, all 257,472 parameters trainable, every one changes, the
    loss falls, and the whole model is saved (it reloads with the trained weights)."""
    run = runs("full")
    record, observed = run.record, run.observed
    assert record.adapter["mode"] == "none (full fine-tuning)"
    assert record.trainable_parameters == record.all_parameters == FULL_PARAMETERS
    assert record.weight_bytes == WEIGHT_BYTES["full"]
    assert all(p.requires_grad for p in observed.trainer.model.parameters())
    assert_trained(record, observed)
    assert any("full fine-tuning" in line for line in observed.lines)
    reloaded, _ = models.load_causal_lm(run.output, dtype="bfloat16")
    trained = dict(observed.trainer.model.named_parameters())
    assert all(torch.equal(p.cpu(), trained[n].detach().cpu()) for n, p in reloaded.named_parameters())


@pytest.mark.slow
@pytest.mark.claim("C1", "D1")
def test_the_qlora_base_is_nf4_with_double_quantisation_and_bf16_compute_packed_where_it_trains(runs):
    """The recipe's BitsAndBytesConfig reaches the layers: packed uint8 weights on the training device, an
    8-bit absmax with a nested fp32 state (double quantisation), bf16 compute, NF4 blocks of 64."""
    import bitsandbytes as bnb

    run = runs("nf4")
    layer = unwrapped(run.observed.trainer.model).model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.compute_dtype == torch.bfloat16
    state = layer.weight.quant_state
    assert layer.weight.dtype == torch.uint8 and layer.weight.device.type == run.device
    assert state.quant_type == "nf4" and state.blocksize == 64
    assert state.nested and state.absmax.dtype == torch.uint8 and state.state2.absmax.dtype == torch.float32
    assert run.record.model["quantization"] == "nf4"


@pytest.mark.claim("C1", "D2")
@pytest.mark.parametrize(
    "double_quant, compute, weight_bytes", [(True, "bfloat16", 420_848), (False, "float16", 409_856)]
)
def test_the_recipes_quantization_section_reaches_the_base_a_run_loads(
    fixtures_dir, double_quant, compute, weight_bytes
):
    """The run's base follows the recipe's [quantization], not a default: with double quantisation off and
    fp16 compute the layers say so, and the weights take 409,856 bytes (derived in test_models.py) instead
    of 420,848."""
    recipe = load_recipe("llm2024")
    recipe.quantization.update(bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute)
    model, identity, measured, _ = train.prepare_model(
        recipe, fixtures_dir / "models" / "tiny-gemma2", "cpu", False, "bfloat16", None, say=lambda text: None
    )
    layer = unwrapped(model).model.layers[0].self_attn.q_proj.base_layer
    assert layer.weight.quant_state.nested is double_quant and layer.compute_dtype == getattr(torch, compute)
    assert (identity.quantization, measured) == ("nf4", weight_bytes)


@pytest.mark.slow
@pytest.mark.claim("C12")
def test_before_the_first_update_the_model_gives_the_bases_logits(runs):
    """B starts at zero, so base + adapter is the base exactly until the first update; after training the
    adapter changes the logits."""
    run = runs("nf4")
    seen = run.observed.logits_before
    assert torch.equal(seen["model"], seen["base"])
    model = run.observed.trainer.model
    with torch.no_grad(), autocast(run.device):
        after = model(input_ids=IDS.to(run.device)).logits.float()
    assert not torch.allclose(after, seen["base"], atol=TIED_TOLERANCE)


# ------------------------------------------------------------------ C13, C15, C16 on the QLoRA run


@pytest.mark.slow
@pytest.mark.claim("C13")
def test_the_run_trains_with_the_recipes_optimizer_schedule_and_settings(runs):
    """adamw_8bit is bitsandbytes' 8-bit AdamW with uint8 state on the training device; weight decay 0.01;
    NEFTune alpha 5, seed 3407, bf16, auto_find_batch_size and keep-10 reach the Trainer. The rate each step
    used, linear from 2e-3 to 0 over 4 steps without warmup: 2e-3 x (4 - s)/4 = 2e-3, 1.5e-3, 1e-3, 5e-4."""
    import bitsandbytes as bnb

    run = runs("nf4")
    trainer = run.observed.trainer
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(inner, bnb.optim.AdamW) and inner.args.optim_bits == 8
    state = next(iter(inner.state.values()))
    assert state["state1"].dtype == torch.uint8 and state["state1"].device.type == run.device
    assert {g["weight_decay"] for g in inner.param_groups if g["params"]} == {0.01}
    args = trainer.args
    assert (args.optim, args.neftune_noise_alpha, args.seed, args.bf16) == ("adamw_8bit", 5, 3407, True)
    assert (args.auto_find_batch_size, args.save_total_limit, args.lr_scheduler_type) == (True, 10, "linear")
    assert [s["learning_rate"] for s in run.record.steps] == pytest.approx([2e-3, 1.5e-3, 1e-3, 5e-4], rel=1e-9)


@pytest.mark.slow
@pytest.mark.claim("C15")
def test_use_cache_is_off_and_checkpointing_on_during_training_and_the_reverse_for_generation(runs):
    run = runs("nf4")
    record, observed = run.record, run.observed
    assert observed.use_cache == [False] * 4 and observed.checkpointing == [True] * 4
    assert record.use_cache == {"during_training": False, "after_training": True}
    model = observed.trainer.model
    assert not model.training and not unwrapped(model).is_activation_checkpointing
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([[2, 100, 200]], device=run.device),
            max_new_tokens=3,
            do_sample=False,
            return_dict_in_generate=True,
        )
    assert out.past_key_values.get_seq_length() == 3 + 3 - 1  # the prompt and the new tokens but the last


@pytest.mark.slow
@pytest.mark.claim("C16")
def test_the_saved_adapter_and_tokenizer_reload_and_give_the_trained_models_logits(runs):
    """Every adapter tensor reloads bit for bit. The logits agree to bf16 precision only: training
    kept the norms in fp32 (peft's k-bit preparation), a fresh bf16 load keeps them in bf16."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    run = runs("nf4")
    output, trained = run.output, run.observed.trainer.model
    assert (output / "adapter_model.safetensors").is_file() and (output / "adapter_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    base, _ = models.load_causal_lm(
        run.record.model["path"],
        dtype="bfloat16",
        quantization="nf4",
        device=f"{run.device}:0" if run.device == "cuda" else None,
    )
    reloaded = PeftModel.from_pretrained(base, str(output)).eval()
    saved = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    weights = dict(trained.named_parameters())
    assert len(saved) == 2 * 7 * 2 and all(torch.equal(p, weights[n]) for n, p in saved.items())  # A and B, 7 x 2
    ids = torch.tensor([tokenizer("日本の首都はどこですか。")["input_ids"]], device=run.device)
    with torch.no_grad(), autocast(run.device):
        ours, theirs = reloaded(input_ids=ids).logits.float(), trained(input_ids=ids).logits.float()
    assert torch.allclose(ours, theirs, atol=TIED_TOLERANCE)


# ------------------------------------------------------------------ L2: progress and tokens/s


@pytest.mark.slow
@pytest.mark.claim("L2")
def test_each_steps_token_count_is_the_real_tokens_of_its_micro_batches(runs):
    """What the model was fed, seen by a forward hook: per optimizer step, 2 micro-batches, each the sum of
    its attention mask (padding left out; some micro-batches were padded, so counting positions would not
    do). The manifest's per-step counts are those sums, and each step's rate is its tokens / its seconds."""
    run = runs("nf4")
    manifest = json.loads((run.output / train.MANIFEST).read_text())
    fed = run.observed.step_tokens
    assert [len(micro_batches) for micro_batches in fed] == [2, 2, 2, 2]
    assert run.observed.padded_micro_batches > 0
    assert [s["tokens"] for s in manifest["steps"]] == [sum(micro_batches) for micro_batches in fed]
    assert all(0 < s["tokens"] <= 2 * 2 * 64 for s in manifest["steps"])  # 4 records of at most 64 tokens
    assert all(s["tokens_per_second"] == pytest.approx(s["tokens"] / s["seconds"]) for s in manifest["steps"])


@pytest.mark.slow
@pytest.mark.claim("L2")
def test_progress_is_a_line_per_step_and_the_first_step_is_left_out_of_the_steady_rate(runs):
    """Steady rate by hand from the per-step records: tokens of steps 2..4 over their seconds. The first step
    (allocation, warm-up) is reported apart, its seconds recorded on their own."""
    run = runs("nf4")
    manifest = json.loads((run.output / train.MANIFEST).read_text())
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


# ------------------------------------------------------------------ X2, X8, P12: the run record


@pytest.mark.slow
@pytest.mark.claim("X8", "P12")
def test_the_manifests_settings_are_exactly_the_arguments_the_trainer_ran_with(runs):
    """Key by key: every field of the Trainer's own `args.to_dict()` (taken when the Trainer was built and
    again after training) is in the manifest with the same value, and nothing else is. The three run-time
    settings a second, recipe-only TrainingArguments would get wrong are checked by name."""
    run = runs("nf4")
    recorded = json.loads((run.output / train.MANIFEST).read_text())["settings"]["training_arguments"]
    for ran in (run.observed.arguments, run.observed.trainer.args.to_dict()):
        ran = json.loads(json.dumps(ran, default=str))  # as a JSON file holds it
        assert sorted(recorded) == sorted(ran)
        differing = {k: (recorded[k], ran[k]) for k in ran if recorded[k] != ran[k]}
        assert differing == {}
    run_settings = ("activation_checkpointing", "remove_unused_columns", "disable_tqdm", "use_cache")
    assert tuple(recorded[name] for name in run_settings) == (True, False, True, False)
    assert recorded["hub_token"] == "<HUB_TOKEN>"  # transformers' own placeholder, never a value


@pytest.mark.slow
@pytest.mark.claim("X2", "P12", "C1")
def test_the_manifest_holds_versions_hashes_seeds_the_step_plan_and_per_step_loss(runs, fixtures_dir):
    """Step plan by hand (RUN's docstring): 12 micro-batches an epoch, 6 steps an epoch, 4 steps in all taking
    8 micro-batches, effective batch 2 x 2 = 4, checkpoints at 2 and 4, a loss line every step; the custom
    loop's STEPS_PER_EPOCH = 24 // 2 = 12. Losses are the Trainer's own logged figures."""
    import peft
    import transformers

    run = runs("nf4")
    manifest = json.loads((run.output / train.MANIFEST).read_text())
    settings = manifest["settings"]
    assert (settings["versions"]["transformers"], settings["versions"]["peft"]) == (
        transformers.__version__,
        peft.__version__,
    )
    assert (settings["training_arguments"]["seed"], settings["lora"]["random_state"]) == (3407, 3407)
    assert "adam_beta2" in settings["training_arguments"]  # defaults written out too
    digest = hashlib.sha256(run.data.read_bytes()).hexdigest()
    assert manifest["data"]["sha256"] == hashlib.sha256(f"{run.data.name}\0{digest}\n".encode()).hexdigest()
    weights = hashlib.sha256((fixtures_dir / "models" / "tiny-gemma2" / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["model"]["weights_sha256"] == hashlib.sha256(f"model.safetensors\0{weights}\n".encode()).hexdigest()
    assert manifest["model"]["path"] == str((fixtures_dir / "models" / "tiny-gemma2").resolve())
    plan = manifest["step_plan"]
    per_epoch = (plan["micro_batches_per_epoch"], plan["optimizer_steps_per_epoch"])
    assert per_epoch == (12, 6) and plan["total_optimizer_steps"] == 4
    assert (plan["micro_batches"], plan["effective_batch_size"], plan["warmup_steps"]) == (8, 4, 0)
    assert (plan["checkpoint_steps_kept"], plan["log_lines"], plan["custom_loop_steps_per_epoch"]) == ([2, 4], 4, 12)
    assert [s["step"] for s in manifest["steps"]] == [1, 2, 3, 4]
    logged = [h["loss"] for h in run.observed.trainer.state.log_history if "loss" in h]
    assert [round(s["loss"], 4) for s in manifest["steps"]] == [round(x, 4) for x in logged]
    assert sorted(p.name for p in (run.output / train.CHECKPOINTS).iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (run.output / train.CHECKPOINTS / "checkpoint-2" / "adapter_model.safetensors").is_file()


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
def test_continuing_an_adapter_loaded_frozen_is_refused_before_any_step(runs, tmp_path, monkeypatch, fixtures_dir):
    """train.run with adapter=...: the saved adapter loaded as peft does by default has no trainable weight;
    the run says it loaded (not created) the adapter and refuses with the reason before the Trainer is built."""
    run = runs("nf4")
    monkeypatch.setattr(lora, "load_adapter", frozen_load)
    observed = Observed()
    with pytest.raises(InputError) as error:
        run_recipe(
            recipe_for("nf4", run.device),
            fixtures_dir / "models" / "tiny-gemma2",
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
    runs, tmp_path, monkeypatch, capsys, fixtures_dir
):
    run = runs("nf4")
    monkeypatch.setattr(lora, "load_adapter", frozen_load)
    code = cli.main(
        [
            "continue",
            "--model",
            str(fixtures_dir / "models" / "tiny-gemma2"),
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
def test_a_fresh_run_says_it_created_the_adapter(runs):
    run = runs("nf4")
    assert any(
        line.startswith("adapter created fresh (r=64, lora_alpha=64), not loaded; 131,072 weights trainable")
        for line in run.observed.lines
    )


# ------------------------------------------------------------------ C13: auto_find_batch_size


@pytest.mark.slow
@pytest.mark.claim("C13")
def test_auto_find_batch_size_shrinks_the_batch_on_out_of_memory_and_recomputes_the_step_plan(tmp_path, fixtures_dir):
    """A forward pass on more than 2 records raises the CPU allocator's own out-of-memory error. The
    Trainer retries through accelerate's find_executable_batch_size, which (accelerate 1.x) multiplies
    the batch by 0.9 rather than halving it as in the seed's day: int(4 x 0.9) = 3 fails too, int(3 x 0.9)
    = 2 runs. The run's plan follows, by hand: 24 records / 2 = 12 micro-batches, 6 steps at accumulation 2."""
    observed = Observed()
    recipe = apply_overrides(
        load_recipe("llm2024"),
        [
            "num_train_epochs=1",
            "per_device_train_batch_size=4",
            "gradient_accumulation_steps=2",
            "warmup_steps=0",
            "save_steps=100",
            "sft.max_seq_length=24",
            "quantization.load_in_4bit=false",
        ],
    )

    def limit_batch(trainer):
        observed.before_train(trainer)

        def hook(module, args, kwargs):
            if kwargs["input_ids"].shape[0] > 2:
                raise RuntimeError(
                    "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes."
                )

        trainer.model.register_forward_pre_hook(hook, with_kwargs=True)

    record = train.run(
        recipe,
        str(fixtures_dir / "models" / "tiny-gemma2"),
        str(fixtures_dir / "data" / "qa111_sample.jsonl"),
        str(tmp_path),
        columns=QA_COLUMNS,
        say=observed.lines.append,
        before_train=limit_batch,
    )
    assert record.batch_size_attempts == [4, 3, 2]
    assert any("out of memory at batch size 4" in line and "retries with 3" in line for line in observed.lines)
    assert any("out of memory at batch size 3" in line and "retries with 2" in line for line in observed.lines)
    assert record.step_plan["micro_batches_per_epoch"] == 12 and record.step_plan["total_optimizer_steps"] == 6
    assert len(record.steps) == 6 and observed.trainer.state.global_step == 6


@pytest.mark.claim("C13", "P3")
def test_the_sequence_length_defaults_to_2048_and_the_loss_to_the_response(tmp_path, gemma_tokenizer):
    """A recipe that names neither: records are cut at 2048 tokens (seed 001's max_seq_length) and prompt
    tokens carry -100. By hand: a record of 3,000 characters "あ" is longer than 2048 tokens."""
    recipe = load_recipe("llm2024")
    del recipe.sft["max_seq_length"], recipe.sft["loss_on"]
    path = tmp_path / "long.jsonl"
    row = {"instruction": "質問", "response": "あ" * 3000}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    encoded, info = train.encode_data(recipe, gemma_tokenizer, str(path), None)
    assert (info["max_seq_length"], info["loss_on"]) == (2048, "response")
    assert len(encoded[0]["input_ids"]) == 2048 and encoded[0]["labels"][1] == -100


# ------------------------------------------------------------------ P2 and the command's errors


def train_command(*args: str, capsys) -> tuple[int, str]:
    """`ftref train ...` in this process (the same main() the console script runs): exit code and stderr."""
    code = cli.main(["train", *args])
    return code, capsys.readouterr().err


@pytest.fixture
def common(tmp_path, fixtures_dir):
    return [
        "--recipe",
        "llm2024",
        "--model",
        str(fixtures_dir / "models" / "tiny-gemma2"),
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
def test_the_train_command_exits_2_without_a_traceback_on_an_unreadable_row(tmp_path, fixtures_dir):
    """The console command itself (a separate process): exit status 2, the file and row on stderr."""
    broken = tmp_path / "broken.csv"
    with open(broken, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["input", "output"], ["a", "b"], ["c", "d", "e"]])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "reference",
            "train",
            "--recipe",
            "llm2024",
            "--model",
            str(fixtures_dir / "models" / "tiny-gemma2"),
            "--data",
            str(broken),
            "--output",
            str(tmp_path / "o"),
            "--columns",
            "instruction=input,response=output",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and f"{broken}, row 2 (line 3)" in result.stderr
    assert "Traceback" not in result.stderr
