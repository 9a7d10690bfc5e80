"""Beyond one device (X10): the recipe under torchrun with FSDP2, shown on the CPU over gloo, against one process.

    torchrun --nproc_per_node 2 -m reference train --recipe llm2024 ... fsdp=true

shards the LoRA run over two processes: transformers builds accelerate's FSDP2 plugin from `fsdp` and
`fsdp_config`, and reference.training.distributed turns it on where accelerate would not (a CPU run). The same recipe in
one process with twice the batch is the reference. By hand, with the 24 QA records:

    FSDP:  batch 2 on each of 2 processes; 24 / 2 = 12 batches dealt out to 2 processes = 6 micro-batches each;
           accumulation 2 -> 3 optimizer steps of 2 x 2 x 2 = 8 records.
    one:   batch 4 in 1 process; 24 / 4 = 6 micro-batches; accumulation 2 -> 3 optimizer steps of 4 x 2 = 8 records.

Each step takes the same 8 records in both: the sampler shuffles once with the seed, and accelerate deals the
batches of 2 out in turn (process 0 takes batches 0, 2, 4 ..., process 1 batches 1, 3, 5 ...), so step 1 is
records 0..7 of the shuffled order either way. Each process's loss is its share of the global batch's loss
times the number of processes (the Trainer's `average_tokens_across_devices`); the step's loss is their mean.

What would make the two differ for reasons other than sharding is set alike: fp32 weights instead of NF4/bf16
(a bf16 sum rounds differently in another order), no NEFTune noise (each process draws its own), torch's AdamW
(bitsandbytes' 8-bit AdamW cannot step FSDP's sharded weights), and records cut at 64 tokens, not 40 (every
record opens with the same 40-token alpaca-ja preamble, so at 40 all records are one and the same).

Tolerance: per-step losses equal within a relative 1e-5. Both sum the same fp32 terms in another order (each
process's gradient added to the other's by the reduce-scatter; micro-batches of 2 rows instead of 4), so they
may differ by fp32 rounding, 2^-24 ~ 6e-8 relative per operation, carried through three AdamW steps: here they
differ by 8e-8. The same records in another order (data_seed=1 against 42) move the losses by 2e-4 and more, twenty
times the tolerance; the adapters' logits then differ by 0.1, against 4e-7 here and a tolerance of 1e-5.

QLoRA under FSDP (llm2024-fsdp): bitsandbytes packs 4-bit weights into uint8 by default, and accelerate then
leaves them out of the sharding (whole on every process, with a warning); `bnb_4bit_quant_storage = "bfloat16"`,
the dtype of the rest of each layer, lets fully_shard split them too. Shown on the CPU and, on a machine with
two GPUs, over NCCL (skipped here with its reason).

What ran is observed from outside the code under test: a sitecustomize on the processes' path (SHARDS) writes,
after the Trainer's train(), accelerate's distributed type and each parameter's class and local/whole sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel

from reference.errors import InputError
from reference.modeling import models
from reference.settings.recipes import load_recipe
from reference.settings.training_arguments import resolve, resolved_settings, run_arguments
from reference.training import checkpoints, distributed
from spec.adapters import adapter_tensors, trained_b
from spec.cli_runner import QA, cli_command, offline_env, run_cli
from spec.test_cli import torchrun_failure

SAME_STEPS = ["num_train_epochs=1", "gradient_accumulation_steps=2", "warmup_steps=0", "learning_rate=2e-3"]
ALIKE = ["quantization.load_in_4bit=false", "bf16=false", "neftune_noise_alpha=0", "optim=adamw_torch"]
ON_THE_CPU = ["use_cpu=true"]  # gloo, on a GPU machine too
SHORT = ["sft.max_seq_length=64"]  # every record starts with the same 40-token alpaca-ja preamble: 24 tokens its own
LOSS_TOLERANCE = 1e-5  # relative; see the module docstring
LOGIT_TOLERANCE = 1e-5  # see the module docstring
IDS = torch.tensor([[2, 120, 340, 560, 780, 1000, 1200]])
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
SHARDS = """
import json, os
from transformers import Trainer

train = Trainer.train


def observed(self, *args, **kwargs):
    result = train(self, *args, **kwargs)
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p
    parameters = {
        name: {"class": type(p).__name__, "dtype": str(p.dtype), "whole": p.numel(), "local": local(p).numel()}
        for name, p in self.model.named_parameters()
    }
    seen = {"distributed_type": str(self.accelerator.distributed_type), "parameters": parameters}
    with open(os.path.join(os.environ["SHARDS_SEEN"], "rank" + os.environ.get("RANK", "0") + ".json"), "w") as f:
        json.dump(seen, f)
    return result


Trainer.train = observed
"""


def torchrun(tmp: Path, train_args: list, env: dict | None = None) -> dict:
    """`torchrun --nproc_per_node 2 -m reference train ...` (rendezvous on a port the OS picks), with SHARDS on
    the processes' path; returns what SHARDS saw on each rank. Each rank's whole log is shown on failure."""
    hooks, seen, logs = tmp / "hooks", tmp / "seen", tmp / "logs"
    hooks.mkdir()
    seen.mkdir()
    (hooks / "sitecustomize.py").write_text(SHARDS)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", uuid.uuid4().hex]
    launcher += ["--log-dir", str(logs), "--redirects", "3"]
    path = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
    environment = offline_env(PYTHONPATH=path, SHARDS_SEEN=str(seen), PYTHONFAULTHANDLER="1", **(env or {}))
    command = [*launcher, "-m", "reference", "train", *map(str, train_args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, torchrun_failure(result, logs)
    return {rank: json.loads((seen / f"rank{rank}.json").read_text()) for rank in (0, 1)}


def manifest_of(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def runs(tiny_gemma2_dir, qa_data, tmp_path_factory) -> SimpleNamespace:
    """The llm2024 LoRA run sharded over 2 processes (FSDP, batch 2 each) and in one process (batch 4)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    data = ["--recipe", "llm2024", "--model", tiny_gemma2_dir, "--data", qa_data, *QA]
    alike = [*SAME_STEPS, *ALIKE, *SHORT, *ON_THE_CPU]
    seen = torchrun(tmp, [*data, "--output", tmp / "fsdp", *alike, "per_device_train_batch_size=2", "fsdp=true"])
    one = cli_command("train", *data, "--output", tmp / "one", *alike, "per_device_train_batch_size=4")
    result = subprocess.run(one, capture_output=True, text=True, timeout=600, env=offline_env())
    assert result.returncode == 0, result.stderr
    return SimpleNamespace(fsdp=tmp / "fsdp", one=tmp / "one", seen=seen)


@pytest.mark.slow
@pytest.mark.claim("X10")
def test_fsdp_over_two_processes_trains_to_the_per_step_losses_of_one_process_on_the_same_global_batch(runs):
    """Three steps of 8 records each way (module docstring); each step's loss within a relative 1e-5, its real
    tokens counted over both processes equal to the one process's, and the loss falls."""
    sharded, one = manifest_of(runs.fsdp)["steps"], manifest_of(runs.one)["steps"]
    assert len(sharded) == len(one) == 3
    assert [s["loss"] for s in sharded] == pytest.approx([s["loss"] for s in one], rel=LOSS_TOLERANCE)
    assert [s["tokens"] for s in sharded] == [s["tokens"] for s in one]
    assert sharded[-1]["loss"] < sharded[0]["loss"]


@pytest.mark.slow
@pytest.mark.claim("X10")
def test_under_fsdp_each_process_holds_a_shard_of_every_weight_not_a_copy(runs):
    """What ran was FSDP, not data parallelism with whole copies (what accelerate alone does on a CPU): on both
    processes accelerate says FSDP and every weight, frozen or trained, is a DTensor whose two local pieces make
    the whole weight once, and the recipe's checkpoint is written whole under FSDP too."""
    for rank in (0, 1):
        assert runs.seen[rank]["distributed_type"] == "DistributedType.FSDP"
        assert {p["class"] for p in runs.seen[rank]["parameters"].values()} == {"DTensor"}
    for name, whole in runs.seen[0]["parameters"].items():
        pieces = [runs.seen[rank]["parameters"][name]["local"] for rank in (0, 1)]
        assert sum(pieces) == whole["whole"] and max(pieces) < whole["whole"], name
    final = runs.fsdp / "checkpoints" / "checkpoint-3"
    assert checkpoints.why_incomplete(final) is None


@pytest.mark.slow
@pytest.mark.claim("X10", "X3")
def test_the_step_plan_and_the_manifest_count_the_world_size(runs):
    """By hand (module docstring): 6 micro-batches per process either way, 3 optimizer steps of 8 records; the
    FSDP run's manifest records 2 processes and the settings it ran with (fsdp on, FSDP2 by default)."""
    sharded, one = manifest_of(runs.fsdp), manifest_of(runs.one)
    assert sharded["step_plan"]["world_size"] == 2 and one["step_plan"]["world_size"] == 1
    for plan in (sharded["step_plan"], one["step_plan"]):
        assert plan["micro_batches_per_epoch"] == 6 and plan["total_optimizer_steps"] == 3
        assert plan["effective_batch_size"] == 8
    assert sharded["settings"]["training_arguments"]["fsdp"] is True
    assert one["settings"]["training_arguments"]["fsdp"] in (None, False)


@pytest.mark.slow
@pytest.mark.claim("X10")
def test_the_adapter_saved_under_fsdp_loads_with_peft_and_generates_as_the_one_process_adapter_does(
    runs, tiny_gemma2_dir
):
    """The adapter is gathered whole before it is saved: peft's own PeftModel.from_pretrained on the base
    reads every LoRA weight the one-process run's adapter has, trained (B moved from zero), and the model gives
    that adapter's logits within fp32 rounding and generates the same 4 new tokens greedily."""
    sharded, one = adapter_tensors(runs.fsdp), adapter_tensors(runs.one)
    assert sharded.keys() == one.keys() and all(sharded[k].shape == one[k].shape for k in one)
    assert trained_b(sharded)
    logits, generated = {}, {}
    for name, adapter in (("fsdp", runs.fsdp), ("one", runs.one)):
        base, _ = models.load_causal_lm(tiny_gemma2_dir)
        model = PeftModel.from_pretrained(base, str(adapter)).eval()
        with torch.no_grad():
            logits[name] = model(input_ids=IDS).logits
            generated[name] = model.generate(input_ids=IDS, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert float((logits["fsdp"] - logits["one"]).abs().max()) <= LOGIT_TOLERANCE
    assert generated["fsdp"].shape == (1, IDS.shape[1] + 4) and torch.equal(generated["fsdp"], generated["one"])


# --- QLoRA under FSDP: the llm2024-fsdp recipe ---

SHARDING = {"fsdp", "fsdp_config", "optim"}


def test_the_fsdp_recipe_is_llm2024_with_only_the_sharding_settings_changed():
    """llm2024-fsdp adds fsdp, fsdp_config and the 4-bit storage, and swaps the 8-bit optimizer (a departure,
    with its reason); every other setting is llm2024's."""
    sharded, plain = load_recipe("llm2024-fsdp"), load_recipe("llm2024")
    kept = {k: v for k, v in sharded.training_arguments.items() if k not in SHARDING}
    assert kept == {k: v for k, v in plain.training_arguments.items() if k not in SHARDING}
    assert sharded.training_arguments["optim"] == "adamw_torch" and plain.training_arguments["optim"] == "adamw_8bit"
    assert sharded.departures == {**plain.departures, "optim": sharded.departures["optim"]}
    assert sharded.departures["optim"]["source_value"] == "adamw_8bit"
    assert sharded.quantization == {**plain.quantization, "bnb_4bit_quant_storage": "bfloat16"}
    assert (sharded.lora, sharded.sft, sharded.format, sharded.base_model) == (
        plain.lora,
        plain.sft,
        plain.format,
        plain.base_model,
    )


def test_the_fsdp_recipe_asks_for_fsdp2_and_stores_its_4bit_weights_in_the_compute_dtype(tmp_path):
    """The Trainer's arguments carry accelerate's FSDP2 plugin settings as the recipe writes them, and the 4-bit
    storage is the compute dtype (bf16), so a layer's packed weights shard with its other weights."""
    recipe = load_recipe("llm2024-fsdp")
    args = run_arguments(recipe, str(tmp_path))
    assert args.fsdp is True
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": True,
        "cpu_ram_efficient_loading": False,
        "state_dict_type": "FULL_STATE_DICT",
    }
    quantization = recipe.quantization
    assert quantization["bnb_4bit_quant_storage"] == quantization["bnb_4bit_compute_dtype"] == "bfloat16"
    bnb_4bit = {k: v for k, v in quantization.items() if k.startswith("bnb_4bit")}
    assert models.bnb_config("nf4", bnb_4bit).bnb_4bit_quant_storage is torch.bfloat16


@pytest.mark.slow
@pytest.mark.claim("X10")
def test_the_fsdp_recipe_in_one_process_is_refused_before_the_model_loads_naming_torchrun(tmp_path, fixtures_dir):
    """Without torchrun there is one process and nothing to shard over: exit 2 with the command that starts
    several (the Trainer would raise a bare ValueError once the model is loaded), and no run written."""
    data = fixtures_dir / "data" / "qa111_sample.jsonl"
    model = fixtures_dir / "models" / "tiny-gemma2"
    code, _, err = run_cli(
        "train", "--recipe", "llm2024-fsdp", "--model", model, "--data", data, *QA, "--output", tmp_path / "run"
    )
    assert code == 2, err
    assert "fsdp: FSDP shards the model over several processes" in err and "torchrun --nproc_per_node" in err
    assert "Traceback" not in err and "Loading weights" not in err
    assert not (tmp_path / "run" / "manifest.json").exists()


@pytest.mark.claim("X10")
def test_fsdps_own_activation_checkpointing_with_an_adapter_is_refused_before_the_model_loads(tmp_path):
    """With a LoRA adapter FSDP's checkpoint wrapper renames the layers and peft 0.21 saves an empty adapter: the
    recipe keeps the Trainer's activation_checkpointing, and asking for FSDP's is refused, naming the setting; full
    fine-tuning (no adapter) may use it."""
    recipe = load_recipe("llm2024-fsdp")
    recipe.training_arguments["fsdp_config"] = {
        **recipe.training_arguments["fsdp_config"],
        "activation_checkpointing": True,
    }
    args = run_arguments(recipe, str(tmp_path))
    with pytest.raises(InputError, match="fsdp_config activation_checkpointing with a LoRA adapter"):
        distributed.check_arguments(args, adapter=True)
    with pytest.raises(
        InputError, match="FSDP shards the model over several processes"
    ):  # full fine-tuning: next check
        distributed.check_arguments(args, adapter=False)


@pytest.mark.claim("X8")
def test_the_manifest_records_the_fsdp_config_as_the_recipe_gives_it(tmp_path):
    """TrainingArguments fills fsdp_config's defaults in (min_num_params, xla ...) into the dict it is given:
    into its own copy, so the settings as given stay the recipe's four, while the arguments record all."""
    recipe = load_recipe("llm2024-fsdp")
    settings = resolved_settings(recipe, str(tmp_path), resolve(recipe, str(tmp_path)))
    given = settings["training_arguments_given"]["fsdp_config"]
    assert given == {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": True,
        "state_dict_type": "FULL_STATE_DICT",
    }
    assert recipe.training_arguments["fsdp_config"] == given
    assert settings["training_arguments"]["fsdp_config"]["min_num_params"] == 0


@pytest.mark.slow
@pytest.mark.claim("X10")
@pytest.mark.parametrize("device", DEVICES)
def test_qlora_under_fsdp_shards_the_4bit_weights_stored_as_bf16_and_saves_a_trained_adapter(
    device, tiny_gemma2_dir, qa_data, tmp_path
):
    """The llm2024-fsdp recipe as written (NF4, bf16, the 4-bit weights stored as bf16) over 2 processes: every
    packed 4-bit weight is a bf16 DTensor split between them. By hand, a 64 x 64 q_proj holds 4,096 4-bit values
    = 2,048 bytes = 1,024 bf16 elements, 512 on each process. (With the default uint8 storage accelerate leaves
    these weights whole on each process.) The adapter is saved trained: 2 layers x 7 projections x (A, B)."""
    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip(f"FSDP over NCCL needs 2 GPUs; this machine has {torch.cuda.device_count()}")
    steps = ["max_steps=2", "per_device_train_batch_size=2", "gradient_accumulation_steps=1", "warmup_steps=0"]
    steps += ["learning_rate=2e-3", "sft.max_seq_length=24", *(ON_THE_CPU if device == "cpu" else [])]
    data = ["--recipe", "llm2024-fsdp", "--model", tiny_gemma2_dir, "--data", qa_data, *QA]
    seen = torchrun(tmp_path, [*data, "--output", tmp_path / "run", *steps])
    packed = [name for name in seen[0]["parameters"] if name.endswith("proj.base_layer.weight")]
    assert len(packed) == 14
    for name in packed:
        pieces = [seen[rank]["parameters"][name] for rank in (0, 1)]
        assert {(p["class"], p["dtype"]) for p in pieces} == {("DTensor", "torch.bfloat16")}, name
        assert sum(p["local"] for p in pieces) == pieces[0]["whole"] and pieces[0]["local"] < pieces[0]["whole"]
    q_proj = seen[0]["parameters"]["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert (q_proj["whole"], q_proj["local"]) == (1024, 512)
    manifest = manifest_of(tmp_path / "run")
    assert manifest["model"]["quantization"] == "nf4" and manifest["step_plan"]["world_size"] == 2
    assert manifest["steps"][-1]["loss"] < manifest["steps"][0]["loss"]
    tensors = adapter_tensors(tmp_path / "run")
    assert len(tensors) == 2 * 7 * 2 and trained_b(tensors)
