"""X13: benchmarks are a command (reference/commands/bench.py, reference/benchmarking/).

    bench                 the recipe's SFT step and the seed's generation on a local model, timed on this device
    bench --against trl   trl's SFTTrainer at its best setting for the device beside it
    bench --plan          memory and FLOPs of a published shape under a recipe, without weights

The plan's figures are held against what peft, torch and bitsandbytes allocate on the CPU at the tiny shape; the
measured path is run as a newcomer runs it, and a failure after a part was measured must not lose that part.
"""

from __future__ import annotations

import json

import pytest
import torch

from reference.benchmarking import plan as planning
from reference.modeling import lora, models, shapes
from spec.cli_runner import run_cli, run_main
from spec.conftest import FIXTURES

R = 64
"""At r = 64 the tiny Gemma-2's smallest LoRA matrix (k_proj's B: 32 x 64 = 2,048 values) keeps fp32 optimizer
states and the others (4,096 values and up) 8-bit ones: both of bitsandbytes' branches are held to the plan."""


def lora_on_tiny(tiny_gemma2_dir):
    model, _ = models.load_causal_lm(tiny_gemma2_dir)
    return lora.attach(model, {"r": R, "lora_alpha": R, "target_modules": list(shapes.PROJECTIONS)})


def one_step(model, optimizer) -> None:
    batch = torch.tensor([[2, 10, 11, 12, 13, 1]])
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()


def state_bytes(optimizer, names: tuple[str, ...]) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k in names)


@pytest.mark.claim("X13")
def test_the_plans_lora_parameters_and_gradients_are_what_peft_attaches(tiny_gemma2_dir):
    """r x (in + out) per projection and layer, counted by the plan without weights, equals the trainable
    parameters peft attaches to the real model; its fp32 weights and gradients are 4 bytes each."""
    config = shapes.load_config(tiny_gemma2_dir)
    model = lora_on_tiny(tiny_gemma2_dir)
    trainable = [p for p in model.parameters() if p.requires_grad]
    plan = planning.plan(config, "tiny", R, shapes.PROJECTIONS, 1, 8, "none", "adamw_torch", True)
    assert plan.lora_parameters == sum(p.numel() for p in trainable)
    assert plan.lora_bytes == sum(p.numel() * p.element_size() for p in trainable)
    assert sorted(planning.lora_matrices(config, R, shapes.PROJECTIONS)) == sorted(p.numel() for p in trainable)


@pytest.mark.claim("X13")
@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_8bit"])
def test_the_plans_optimizer_memory_is_what_the_optimizer_allocates_after_a_step(tiny_gemma2_dir, optimizer):
    """torch's AdamW keeps exp_avg and exp_avg_sq in fp32; bitsandbytes' 8-bit AdamW (what the Trainer builds for
    adamw_8bit) keeps uint8 state1/state2 with an fp32 absmax per 256 values, or fp32 states below 4,096 values.
    The plan's bytes equal the sum of those tensors after one real step (the shared quantisation maps and the step
    counters left out)."""
    import bitsandbytes as bnb

    config = shapes.load_config(tiny_gemma2_dir)
    model = lora_on_tiny(tiny_gemma2_dir)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw_torch":
        opt, names = torch.optim.AdamW(trainable, lr=1e-3), ("exp_avg", "exp_avg_sq")
    else:
        opt, names = bnb.optim.AdamW(trainable, lr=1e-3, optim_bits=8), ("state1", "state2", "absmax1", "absmax2")
    one_step(model, opt)
    planned = planning.optimizer_bytes(planning.lora_matrices(config, R, shapes.PROJECTIONS), optimizer)
    assert planned == state_bytes(opt, names)


@pytest.mark.claim("X13", "D2")
def test_the_plans_nf4_weights_are_what_bitsandbytes_allocates(tiny_gemma2_dir):
    """The plan's NF4 (double quantisation) weights of the tiny shape, from the config alone, equal the bytes of
    the loaded model's packed weights, their quantisation states and its bf16 other parameters."""
    from spec.test_memory import allocated_by_bitsandbytes

    model, _ = models.load_causal_lm(tiny_gemma2_dir, dtype="bfloat16", quantization="nf4")
    layers, rest = allocated_by_bitsandbytes(model)
    plan = planning.plan(shapes.load_config(tiny_gemma2_dir), "tiny", 8, ["q_proj"], 1, 8, "nf4-dq", "adamw_8bit", True)
    assert plan.weights["nf4-dq"] == sum(layers.values()) + rest


@pytest.mark.slow
@pytest.mark.claim("X13")
def test_the_plan_answers_the_seeds_question_for_gemma_2_27b_at_r_64_and_128(tmp_path):
    """`bench --plan --shape gemma-2-27b` with the llm2024 recipe (NF4 + double quantisation, adamw_8bit, batch 4
    x 2,048, checkpointing): r = 128 doubles the LoRA (913,440,768 parameters, 2 x 456,720,384) and its fp32
    weights and gradients grow by 8 bytes a parameter, 3.4 GiB; on a 24 GB card (an L4, an RTX 4090) r = 64 fits
    below its lower bound and r = 128 cannot (the seed's trial 3: メモリ不足, out of memory)."""
    code, out, err = run_main("bench", "--plan", "--shape", "gemma-2-27b", "--output", tmp_path)
    assert code == 0, err
    assert "r=64 on q_proj" in out and "456,720,384 parameters" in out
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "fits" in rows["L4 (22.49 GiB)"] and "does NOT" not in rows["L4 (22.49 GiB)"]
    code, out, _ = run_main("bench", "--plan", "--shape", "gemma-2-27b", "--output", tmp_path, "lora.r=128")
    assert code == 0 and "913,440,768 parameters" in out
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "does NOT fit" in rows["L4 (22.49 GiB)"] and "does NOT fit" in rows["RTX 4090 (23.99 GiB)"]
    assert "fits" in rows["A100 40GB (40.00 GiB)"] and "NOT" not in rows["A100 40GB (40.00 GiB)"]


@pytest.mark.claim("X13")
def test_a_layers_activations_planned_on_the_meta_device_are_what_the_same_forward_saves_in_real_tensors():
    """The plan builds the shape on the meta device (no memory) and counts what one decoder layer saves for its
    backward; the same forward on the CPU, with real tensors, saves exactly as many bytes (tiny Gemma-2 shape,
    LoRA r=8 on the seven projections, a batch of 2 x 32)."""
    import transformers

    from reference.training import recompute

    config = shapes.load_config(FIXTURES / "configs" / "tiny-gemma2")
    planned, attention = planning.measured_layer_bytes(config, 8, shapes.PROJECTIONS, 2, 32)
    settings = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    real = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(config["model_type"], **settings), dtype=torch.bfloat16
    )
    real = lora.attach(real, {"r": 8, "lora_alpha": 8, "target_modules": list(shapes.PROJECTIONS)})
    real.activation_checkpointing_enable({"use_reentrant": False})
    real.train()
    assert planned == recompute.saved_bytes_per_layer(real, (2, 32), recompute.decoder_layers(real))
    assert attention == real.config._attn_implementation == "eager"


@pytest.mark.slow
@pytest.mark.claim("X13")
def test_gemma_2_27b_keeps_its_attention_scores_for_each_layer_not_checkpointed(tmp_path):
    """By hand: eager attention keeps the softmax's fp32 output and the bf16 probabilities the value product reads,
    batch x heads x T x T = 4 x 32 x 2,048 x 2,048 values at 4 + 2 bytes: at least 3 GiB a layer, which is why the
    seed checkpoints every layer; of the GPUs named only those with room to spare after the lower bound keep any."""
    code, out, err = run_main("bench", "--plan", "--shape", "gemma-2-27b", "--output", tmp_path)
    planned = json.loads((tmp_path / "bench.json").read_text())["plan"]
    assert code == 0 and planned["layer_bytes"] >= 4 * 32 * 2048 * 2048 * (4 + 2)
    assert planned["gpus"]["L4"]["kept_layers"] == 0 and planned["gpus"]["H100 80GB"]["kept_layers"] >= 1


@pytest.mark.slow
@pytest.mark.claim("X13")
def test_bench_on_the_fixture_model_prints_its_table_and_writes_what_the_run_measured(tmp_path):
    """`python -m reference bench` as a newcomer runs it (the fixture model, the llm2024 recipe), cut to 3 steps and
    4 new tokens: exit 0, a table with the training and generation rows, and bench.json whose training rate is the
    steady rate of the run's own manifest (steps 2 and 3: their real tokens over their seconds)."""
    result = run_cli("bench", "--output", tmp_path, "--steps", 3, "--new-tokens", 4, "--batch-size", 2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "real tokens/s" in result.stdout and "new tokens/s" in result.stdout and "MFU" in result.stdout
    measured = json.loads((tmp_path / "bench.json").read_text())
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    steady = manifest["steps"][1:]
    assert measured["training"]["tokens_per_second"] == pytest.approx(
        sum(s["tokens"] for s in steady) / sum(s["seconds"] for s in steady), rel=1e-9
    )
    assert measured["generation"]["new_tokens"] == 4 and measured["errors"] == []


@pytest.mark.slow
@pytest.mark.claim("X13")
def test_a_part_that_fails_loses_nothing_already_measured_and_a_missing_trl_says_how_to_add_it(tmp_path, monkeypatch):
    """Generation fails after training was measured (here a fault injected in place of it): bench.json keeps the
    training results and names the failure, exit 2. Without trl, --against trl is a note with the install
    command, not a failure."""
    from reference.benchmarking import measure, peer

    def fails(*args, **kwargs):
        raise RuntimeError("the device went away")

    monkeypatch.setattr(measure, "generation", fails)
    monkeypatch.setattr(peer, "available", lambda: False)
    code, out, err = run_main("bench", "--output", tmp_path, "--steps", "2", "--against", "trl")
    measured = json.loads((tmp_path / "bench.json").read_text())
    assert code == 2 and measured["training"]["steps"] == 2
    assert measured["errors"] == ["generation: RuntimeError: the device went away"]
    assert measured["notes"] == [peer.install_hint()] and "pip install 'trl==" in err


@pytest.mark.claim("X13", "C1")
@pytest.mark.parametrize("quantization, marked", [("", "nf4-dq"), ("bnb_4bit_use_double_quant = false\n", "nf4")])
def test_the_plan_reads_the_recipe_as_the_loader_does(tmp_path, quantization, marked):
    """A recipe that asks for 4 bits without naming double quantisation gets it (the loader's BitsAndBytesConfig,
    as the seed's), so the plan's run is NF4 with double quantisation; naming it false gives plain NF4. Batch, LoRA
    and optimizer come from the TrainingArguments and LoraConfig the run would build, their defaults included (batch
    8 and r 8; the optimizer transformers' own default)."""
    import transformers

    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'name = "r"\nsource = "x"\n[quantization]\nload_in_4bit = true\n{quantization}[lora]\n'
        'target_modules = ["q_proj"]\n',
        encoding="utf-8",
    )
    code, out, err = run_main(
        "bench", "--plan", "--shape", "gemma-2-2b", "--recipe", recipe, "--output", tmp_path / "o"
    )
    assert code == 0, err
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert rows[f"weights {marked}"].endswith("<- this run")
    assert "8 x 2048" in rows["batch x sequence"] and rows["LoRA"].startswith("LoRA  ") and "r=8 on q_proj:" in out
    default = transformers.TrainingArguments.__dataclass_fields__["optim"].default
    assert f"optimizer ({getattr(default, 'value', default)})" in out


@pytest.mark.slow
@pytest.mark.claim("X13")
def test_a_shape_is_timed_with_random_weights_built_once_and_cut_to_the_layers_asked(tmp_path):
    """`bench --shape DIR --layers 1` (DIR: the tiny Gemma-2's published-style config) builds the shape with random
    weights in OUTPUT/model-NAME-1l, cut to its first layer with the fixtures' tokenizer, and times it; a second
    bench of the same shape uses that build again."""
    shape = FIXTURES / "configs" / "tiny-gemma2"
    command = ("bench", "--shape", shape, "--layers", 1, "--steps", 2, "--skip", "generation", "--output", tmp_path)
    first = run_cli(*command)
    assert first.returncode == 0, first.stderr[-2000:]
    built = tmp_path / "model-tiny-gemma2-1l"
    config = json.loads((built / "config.json").read_text())
    published = json.loads((shape / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["hidden_size"] == published["hidden_size"]
    assert config["vocab_size"] == published["vocab_size"] and (built / "tokenizer.json").exists()
    assert json.loads((tmp_path / "bench.json").read_text())["model"] == str(built.resolve())
    again = run_cli(*command)
    assert again.returncode == 0 and "holds this shape already; used again" in again.stderr


@pytest.mark.claim("X13")
@pytest.mark.parametrize(
    "arguments, message",
    [
        (("--shape", "gemma-2-2b", "--model", "somewhere"), "--model and --shape name two models"),
        (
            (
                "--layers",
                "2",
            ),
            "--layers cuts a --shape",
        ),
        (("--plan", "--layers", "2"), "--layers cuts a --shape"),
        (("--shape", "gemma-3-1b"), "--shape gemma-3-1b: not a published shape"),
    ],
)
def test_a_shape_and_its_layers_are_refused_where_they_name_nothing_to_time(tmp_path, arguments, message):
    code, out, err = run_main("bench", "--output", tmp_path, *arguments)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.claim("X13")
@pytest.mark.parametrize("padding_free", [False, True])
def test_trl_is_timed_on_the_projects_own_tokens_in_either_layout(tmp_path, tiny_gemma2_dir, padding_free):
    """`bench --against trl` hands trl's SFTTrainer the token ids the project trains on (the recipe's text, cut at
    max_seq_length), so both sides compute the same tokens; its padding-free layout (its best on a GPU) takes them
    already cut, with no max_length of its own (trl refuses one there)."""
    from transformers import AutoTokenizer

    from reference.benchmarking import measure, peer
    from reference.methods import train
    from reference.settings.recipes import apply_overrides, load_recipe

    recipe = apply_overrides(load_recipe("llm2024"), ["bf16=false", "sft.max_seq_length=48"])
    records = measure.training_records(tmp_path / "records.jsonl")
    trainer = peer.sft_trainer(recipe, str(tiny_gemma2_dir), records, tmp_path / "trl", padding_free=padding_free)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma2_dir)
    ours, _ = train.encode_data(recipe, tokenizer, str(records), None)
    assert trainer.train_dataset["input_ids"] == [record["input_ids"] for record in ours]
    assert max(len(ids) for ids in trainer.train_dataset["input_ids"]) == 48
    assert trainer.args.padding_free is padding_free
