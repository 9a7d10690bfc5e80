"""A whole SFT run (reference/train.py) on the tiny Gemma-2: real Trainer, real peft, real bitsandbytes.

One QLoRA run of the llm2024 recipe (NF4 base, r=64 on the seven projections, adamw_8bit, NEFTune 5,
gradient checkpointing) is shared by the tests that read its results; the recipe is cut to a few
steps and short sequences so it runs in seconds on 2 CPU cores.
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys

import pytest
import torch

from reference import lora, models, steps, train
from reference.recipes import apply_overrides, load_recipe
from reference.shapes import PROJECTIONS
from spec.observe import QA_COLUMNS, SHORT, Observed, assert_trained, run_recipe


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    from spec.conftest import FIXTURES

    observed = Observed()
    output = tmp_path_factory.mktemp("qlora")
    recipe = apply_overrides(load_recipe("llm2024"), SHORT)
    record = run_recipe(recipe, FIXTURES / "models" / "tiny-gemma2", FIXTURES / "data" / "qa111_sample.jsonl", output, observed)
    return record, observed, output


@pytest.mark.claim("D1", "C12", "C13")
def test_qlora_training_lowers_the_loss_and_changes_exactly_the_adapter_weights(qlora_run):
    record, observed, _ = qlora_run
    assert_trained(record, observed)
    config = json.loads(open(record.model["path"] + "/config.json").read())
    assert record.trainable_parameters == lora.trainable_parameters(config, 64, PROJECTIONS)
    assert record.model["quantization"] == "nf4"


@pytest.mark.claim("C13")
def test_the_recipes_adamw_8bit_is_bitsandbytes_8bit_adamw_running_on_the_cpu(qlora_run):
    import bitsandbytes as bnb

    _, observed, _ = qlora_run
    optimizer = observed.trainer.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    assert isinstance(inner, bnb.optim.AdamW) and inner.args.optim_bits == 8  # what transformers builds for adamw_8bit
    state = next(iter(inner.state.values()))
    assert state["state1"].dtype == torch.uint8 and state["state1"].device.type == "cpu"


@pytest.mark.claim("C15")
def test_use_cache_is_off_during_training_and_on_for_generation(qlora_run, gemma_tokenizer):
    record, observed, _ = qlora_run
    assert observed.use_cache == [False] * 4 and record.use_cache == {"during_training": False, "after_training": True}
    model = observed.trainer.model
    assert not model.training and not model.base_model.model.is_activation_checkpointing
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([[2, 100, 200]]), max_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True)
    assert out.past_key_values.get_seq_length() == 3 + 3 - 1  # the prompt and the new tokens but the last


@pytest.mark.claim("C16")
def test_the_saved_adapter_and_tokenizer_reload_and_give_the_trained_models_logits(qlora_run):
    """Every adapter tensor reloads bit for bit. The logits agree to bf16 precision only: training
    kept the norms in fp32 (peft's k-bit preparation), a fresh bf16 load keeps them in bf16."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    record, observed, output = qlora_run
    assert (output / "adapter_model.safetensors").is_file() and (output / "adapter_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    base, _ = models.load_causal_lm(record.model["path"], dtype="bfloat16", quantization="nf4")
    reloaded = PeftModel.from_pretrained(base, str(output)).eval()
    trained = observed.trainer.model
    saved = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert saved and all(torch.equal(p, dict(trained.named_parameters())[n]) for n, p in saved.items())
    ids = torch.tensor([tokenizer("日本の首都はどこですか。")["input_ids"]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16=True: how the Trainer ran it
        ours, theirs = reloaded(input_ids=ids).logits.float(), trained(input_ids=ids).logits.float()
    assert torch.allclose(ours, theirs, atol=2 ** -7)


@pytest.mark.claim("L2")
def test_progress_is_a_line_per_step_with_tokens_per_second_and_the_first_step_apart(qlora_run):
    record, observed, _ = qlora_run
    step_lines = [line for line in observed.lines if line.startswith("epoch ")]
    assert len(step_lines) == 4
    assert "step 1/4" in step_lines[0] and "warm-up, not in the steady rate" in step_lines[0]
    assert all("tok/s" in line and "steady" in line for line in step_lines[1:])
    steady = record.steps[1:]
    assert record.steady_tokens_per_second == pytest.approx(sum(s["tokens"] for s in steady) / sum(s["seconds"] for s in steady))
    assert record.warmup_step_seconds == record.steps[0]["seconds"]


@pytest.mark.claim("X2", "P12")
def test_the_manifest_holds_settings_versions_hashes_the_step_plan_and_per_step_loss(qlora_run, fixtures_dir):
    record, observed, output = qlora_run
    manifest = json.loads((output / train.MANIFEST).read_text())
    assert manifest["settings"]["training_arguments"]["optim"] == "adamw_8bit"
    assert "adam_beta2" in manifest["settings"]["training_arguments"]  # defaults written out too
    assert manifest["settings"]["versions"]["peft"] and manifest["settings"]["versions"]["bitsandbytes"]
    data = fixtures_dir / "data" / "qa111_sample.jsonl"
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    assert manifest["data"]["sha256"] == hashlib.sha256(f"{data.name}\0{digest}\n".encode()).hexdigest()
    assert manifest["model"]["weights_sha256"] == models.identity(fixtures_dir / "models" / "tiny-gemma2").weights_sha256
    expected_plan = steps.plan(steps.StepSettings(records=24, batch_size=4, max_steps=4, save_steps=2, logging_steps=1))
    assert manifest["step_plan"]["total_optimizer_steps"] == 4 == len(manifest["steps"]) == expected_plan.total_optimizer_steps
    assert [s["step"] for s in manifest["steps"]] == [1, 2, 3, 4]
    logged = [h["loss"] for h in observed.trainer.state.log_history if "loss" in h]
    assert [round(s["loss"], 4) for s in manifest["steps"]] == [round(x, 4) for x in logged]  # the Trainer's own figures
    assert sorted(p.name for p in (output / train.CHECKPOINTS).iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (output / train.CHECKPOINTS / "checkpoint-2" / "adapter_model.safetensors").is_file()  # weights as safetensors


@pytest.mark.claim("C13")
def test_auto_find_batch_size_shrinks_the_batch_on_out_of_memory_and_recomputes_the_step_plan(tmp_path, fixtures_dir):
    """A forward pass on more than 2 records raises the CPU allocator's own out-of-memory error. The
    Trainer retries through accelerate's find_executable_batch_size, which (accelerate 1.x) multiplies
    the batch by 0.9 rather than halving it as in the seed's day: int(4 x 0.9) = 3 fails too, int(3 x 0.9)
    = 2 runs. The run's plan follows, by hand: 24 records / 2 = 12 micro-batches, 6 steps at accumulation 2."""
    observed = Observed()
    recipe = apply_overrides(load_recipe("llm2024"), ["num_train_epochs=1", "per_device_train_batch_size=4",
                                                      "gradient_accumulation_steps=2", "warmup_steps=0", "save_steps=100",
                                                      "sft.max_seq_length=24", "quantization.load_in_4bit=false"])

    def limit_batch(trainer):
        observed.before_train(trainer)

        def hook(module, args, kwargs):
            if kwargs["input_ids"].shape[0] > 2:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes.")

        trainer.model.register_forward_pre_hook(hook, with_kwargs=True)

    record = train.run(recipe, str(fixtures_dir / "models" / "tiny-gemma2"), str(fixtures_dir / "data" / "qa111_sample.jsonl"),
                       str(tmp_path), columns=QA_COLUMNS, say=observed.lines.append, before_train=limit_batch)
    assert record.batch_size_attempts == [4, 3, 2]
    assert any("out of memory at batch size 4" in line and "retries with 3" in line for line in observed.lines)
    assert any("out of memory at batch size 3" in line and "retries with 2" in line for line in observed.lines)
    assert record.step_plan["micro_batches_per_epoch"] == 12 and record.step_plan["total_optimizer_steps"] == 6
    assert len(record.steps) == 6 and observed.trainer.state.global_step == 6


@pytest.mark.claim("D1")
@pytest.mark.parametrize("quantization", [{}, {"load_in_8bit": True}])
def test_lora_trains_on_a_bf16_and_an_int8_base_too(tmp_path, fixtures_dir, quantization):
    """D1's other two bases (NF4 is the shared run above): same adapter size, smaller weights for int8."""
    observed = Observed()
    recipe = apply_overrides(load_recipe("llm2024"), SHORT)
    recipe = copy.deepcopy(recipe)
    recipe.quantization = quantization
    record = run_recipe(recipe, fixtures_dir / "models" / "tiny-gemma2", fixtures_dir / "data" / "qa111_sample.jsonl",
                        tmp_path, observed)
    assert_trained(record, observed)
    config = json.loads((fixtures_dir / "models" / "tiny-gemma2" / "config.json").read_text())
    assert record.trainable_parameters == lora.trainable_parameters(config, 64, PROJECTIONS)
    from reference import memory

    assert record.weight_bytes == memory.weight_memory(memory.parameters(config), "int8" if quantization else "bf16")


@pytest.mark.gpu
@pytest.mark.claim("D1", "C15", "C16")
def test_qlora_training_on_cuda_packs_the_base_on_the_gpu_and_trains_the_adapter(tmp_path, fixtures_dir):
    observed = Observed()
    recipe = apply_overrides(load_recipe("llm2024"), SHORT)
    record = run_recipe(recipe, fixtures_dir / "models" / "tiny-gemma2", fixtures_dir / "data" / "qa111_sample.jsonl",
                        tmp_path, observed)
    assert_trained(record, observed)
    layer = observed.trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert layer.weight.device.type == "cuda" and layer.weight.dtype == torch.uint8
    assert record.use_cache == {"during_training": False, "after_training": True}
    assert (tmp_path / "adapter_model.safetensors").is_file()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reference", "train", *args], capture_output=True, text=True, timeout=300)


def test_train_names_a_missing_model_a_bad_recipe_key_and_unreadable_data_with_exit_2(tmp_path, fixtures_dir):
    data = str(fixtures_dir / "data" / "qa111_sample.jsonl")
    model = str(fixtures_dir / "models" / "tiny-gemma2")
    common = ["--recipe", "llm2024", "--output", str(tmp_path / "o"), "--columns", "instruction=input,response=output"]
    missing = run_cli(*common, "--model", str(tmp_path / "no-model"), "--data", data)
    assert missing.returncode == 2 and "no-model" in missing.stderr
    bad_key = run_cli(*common, "--model", model, "--data", data, "lora.rank=8")
    assert bad_key.returncode == 2 and "rank" in bad_key.stderr
    bad_argument = run_cli(*common, "--model", model, "--data", data, "warmup_ratio_typo=0.1")
    assert bad_argument.returncode == 2 and "warmup_ratio_typo" in bad_argument.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"input": "a", "output": "b"}\n{"input": 3, "output": "c"}\n', encoding="utf-8")
    unreadable = run_cli(*common, "--model", model, "--data", str(broken))
    assert unreadable.returncode == 2 and "broken.jsonl" in unreadable.stderr and "row 2" in unreadable.stderr
    for result in (missing, bad_key, bad_argument, unreadable):
        assert "Traceback" not in result.stderr
