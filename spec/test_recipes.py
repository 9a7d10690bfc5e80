"""Recipes (reference/settings/recipes.py): the primer's and the LLM2024 solution's settings, mapped and resolved."""

from __future__ import annotations

import dataclasses
import json

import pytest

from reference.errors import InputError
from reference.settings.recipes import apply_overrides, check_numbers, load_recipe, trial_report
from reference.settings.training_arguments import map_training_arguments, resolved_settings, to_training_arguments
from spec.cli_runner import run_cli

# The arguments of the primer's TrainingArguments example (seed 004 §5), as written there.
PRIMER_ARGUMENTS = {
    "output_dir": "gemma-japanese",
    "num_train_epochs": 3,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "gradient_checkpointing": True,
    "optim": "adamw_torch_fused",
    "logging_steps": 10,
    "save_strategy": "epoch",
    "learning_rate": 2e-4,
    "bf16": True,
    "tf32": True,
    "max_grad_norm": 0.3,
    "warmup_ratio": 0.03,
    "lr_scheduler_type": "constant",
    "push_to_hub": True,
    "report_to": "tensorboard",
}
# The TrainingArguments of the LLM2024 solution (seed 001 §2.2.2), as written there.
LLM2024_ARGUMENTS = {
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 8,
    "num_train_epochs": 2,
    "learning_rate": 2e-4,
    "lr_scheduler_type": "linear",
    "do_eval": True,
    "optim": "adamw_8bit",
    "weight_decay": 0.01,
    "warmup_steps": 300,
    "fp16": False,
    "save_steps": 300,
    "save_total_limit": 10,
    "logging_dir": "./logs",
    "logging_steps": 5,
    "report_to": "wandb",
    "auto_find_batch_size": True,
    "neftune_noise_alpha": 5,
    "bf16": True,
    "output_dir": "results-jp-r64_alpha64",
    "seed": 3407,
}


def as_written_in_source(recipe) -> dict:
    """The recipe's arguments with each departure put back to the source's value."""
    given = dict(recipe.training_arguments)
    given.update(
        {
            name: d["source_value"]
            for name, d in recipe.departures.items()
            if name in LLM2024_ARGUMENTS or name in PRIMER_ARGUMENTS
        }
    )
    return given


@pytest.mark.claim("P7")
def test_primer_recipe_holds_every_argument_of_the_primer_example():
    """Nothing is dropped: each argument is in the recipe or in its departures with the source's value."""
    recipe = load_recipe("primer")
    assert as_written_in_source(recipe) == PRIMER_ARGUMENTS
    assert set(recipe.departures) == {"push_to_hub"}  # report_to="tensorboard" is kept: a dependency


@pytest.mark.claim("P7")
def test_primer_maps_onto_the_installed_training_arguments(tmp_path):
    """warmup_ratio 0.03 becomes warmup_steps 0.03, which transformers reads as a fraction: 1,000 steps
    -> ceil(30.0) = 30 warmup steps."""
    args = to_training_arguments(load_recipe("primer"), output_dir=str(tmp_path))
    assert (args.num_train_epochs, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (3, 2, 2)
    assert args.gradient_checkpointing is True and args.optim == "adamw_torch_fused"
    assert (args.logging_steps, args.save_strategy, args.learning_rate) == (10, "epoch", 2e-4)
    assert (args.bf16, args.max_grad_norm, args.lr_scheduler_type) == (True, 0.3, "constant")
    assert args.warmup_steps == 0.03 and args.get_warmup_steps(1000) == 30


@pytest.mark.claim("P7")
def test_every_migration_and_adaptation_is_reported():
    import torch

    mapping = map_training_arguments(load_recipe("primer"))
    assert any(note.startswith("warmup_ratio=0.03 -> warmup_steps=0.03") for note in mapping.migrations)
    assert any(note.startswith("gradient_checkpointing -> activation_checkpointing") for note in mapping.migrations)
    if not torch.cuda.is_available():
        assert mapping.kwargs["tf32"] is None and mapping.kwargs["use_cpu"] is True
        assert len(mapping.adaptations) == 2


@pytest.mark.claim("P7")
def test_an_argument_the_installed_version_lacks_is_a_clear_error(tmp_path):
    import transformers

    path = tmp_path / "old.toml"
    path.write_text(
        'name = "old"\nsource = "a transformers 4 notebook"\n[training_arguments]\n'
        'output_dir = "x"\nlogging_dir = "./logs"\n',
        encoding="utf-8",
    )
    with pytest.raises(InputError) as error:
        to_training_arguments(load_recipe(path))
    message = str(error.value)
    assert "logging_dir" in message and transformers.__version__ in message and "removed in transformers 5" in message


@pytest.mark.claim("P7")
def test_an_unknown_argument_is_named_never_dropped(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text('name = "typo"\nsource = "x"\n[training_arguments]\nlearning_rat = 1e-4\n', encoding="utf-8")
    with pytest.raises(InputError, match="learning_rat"):
        map_training_arguments(load_recipe(path))


@pytest.mark.claim("P7")
@pytest.mark.parametrize(
    "arguments, message",
    [
        ("warmup_ratio = 1.0", "warmup_ratio=1.0: must be in [0, 1)"),
        ("warmup_ratio = -0.01", "warmup_ratio=-0.01: must be in [0, 1)"),
        ("warmup_ratio = 0.1\nwarmup_steps = 5", "sets both warmup_ratio=0.1 and warmup_steps=5"),
        (
            "gradient_checkpointing = true\nactivation_checkpointing = true",
            "sets both gradient_checkpointing and its new name",
        ),
    ],
    ids=["ratio-1", "ratio-negative", "ratio-and-steps", "old-and-new-name"],
)
def test_a_migration_that_cannot_be_made_is_refused(tmp_path, arguments, message):
    path = tmp_path / "r.toml"
    path.write_text(f'name = "r"\nsource = "x"\n[training_arguments]\n{arguments}\n', encoding="utf-8")
    with pytest.raises(InputError) as error:
        map_training_arguments(load_recipe(path))
    assert message in str(error.value)


@pytest.mark.claim("P7")
@pytest.mark.parametrize("ratio, warmup_steps_of_1000", [(0.0, 0), (0.999, 999)])
def test_warmup_ratios_from_0_up_to_below_1_become_fractional_warmup_steps(tmp_path, ratio, warmup_steps_of_1000):
    """The interval's ends by hand: 0 -> no warmup; 0.999 of 1,000 steps -> ceil(999.0) = 999."""
    path = tmp_path / "r.toml"
    path.write_text(f'name = "r"\nsource = "x"\n[training_arguments]\nwarmup_ratio = {ratio}\n', encoding="utf-8")
    args = to_training_arguments(load_recipe(path), output_dir=str(tmp_path))
    assert args.warmup_steps == ratio and args.get_warmup_steps(1000) == warmup_steps_of_1000


@pytest.mark.claim("P7")
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU adaptations apply only without CUDA")
def test_without_cuda_fp16_becomes_bf16_on_the_cpu_and_is_reported(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('name = "r"\nsource = "x"\n[training_arguments]\nfp16 = true\n', encoding="utf-8")
    mapping = map_training_arguments(load_recipe(path))
    assert (mapping.kwargs["fp16"], mapping.kwargs["bf16"], mapping.kwargs["use_cpu"]) == (False, True, True)
    assert any(note.startswith("fp16=True -> bf16=True") for note in mapping.adaptations)
    assert any(note.startswith("use_cpu=True") for note in mapping.adaptations)


@pytest.mark.claim("C13")
def test_llm2024_recipe_holds_the_solutions_trainer_settings():
    recipe = load_recipe("llm2024")
    assert as_written_in_source(recipe) == LLM2024_ARGUMENTS
    assert recipe.sft == {
        "max_seq_length": 2048,
        "packing": False,
        "dataset_text_field": "text",
        "dataset_num_proc": 2,
        "shuffle_seed": 45,
        "gradient_checkpointing": True,
        "recompute": "fit",  # not the seed's: the layers whose activations fit are not recomputed, the same losses
        "use_cache_during_training": False,
        "loss_on": "all",
        "padding_free": True,  # not the seed's: records end to end, no padding computed (X11)
        "chunked_loss": True,  # not the seed's: the same loss, never the full logits (P3)
    }
    assert recipe.format == "alpaca-ja"
    assert recipe.quantization == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    }


@pytest.mark.claim("C13")
def test_llm2024_maps_onto_a_real_training_arguments(tmp_path):
    args = to_training_arguments(load_recipe("llm2024"), output_dir=str(tmp_path))
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_train_epochs) == (4, 8, 2)
    assert (args.optim, args.weight_decay, args.warmup_steps, args.lr_scheduler_type) == (
        "adamw_8bit",
        0.01,
        300,
        "linear",
    )
    assert (args.save_steps, args.save_total_limit, args.logging_steps) == (300, 10, 5)
    assert (args.auto_find_batch_size, args.neftune_noise_alpha, args.bf16, args.seed) == (True, 5, True, 3407)


@pytest.mark.claim("C12", "C13")
def test_llm2024_lora_settings_are_the_solutions():
    lora = load_recipe("llm2024").lora
    assert lora == {
        "r": 64,
        "lora_alpha": 64,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "random_state": 3407,
        "task_type": "CAUSAL_LM",
    }


@pytest.mark.claim("C17")
def test_trial_table_is_kept_as_data():
    trials = load_recipe("llm2024").trials
    assert len(trials) == 13
    table = [(t["trial"], t.get("r"), t.get("lora_alpha"), t.get("score")) for t in trials]
    assert table[:9] == [
        ("1", 16, 16, None),
        ("2", 32, 32, 3.5),
        ("3", 128, 128, None),
        ("4", 32, 16, 3.63),
        ("5", 32, 64, 3.48),
        ("6", 32, 64, 3.43),
        ("7", 32, 64, 3.54),
        ("8(train1.py)", 32, 64, 3.51),
        ("9 (以下同一モデル)", 64, 64, 3.52),
    ]
    assert [t["score"] for t in trials[9:]] == [3.54, 3.69, 3.67, 3.77]
    assert trials[2]["result"] == "メモリ不足" and trials[10]["note"] == "reputation penulty 1.1"


@pytest.mark.claim("C17", "C12")
def test_each_trial_reports_alpha_over_r_and_trainable_parameters_for_gemma_2_27b():
    """gemma-2-27b: hidden 4608, 32 query heads and 16 key/value heads of 128, MLP 36864, 46 layers.
    Per layer, in + out: q 4608+4096, k 4608+2048, v 4608+2048, o 4096+4608, gate 4608+36864,
    up 4608+36864, down 36864+4608 = 8704 + 6656 + 6656 + 8704 + 3 x 41472 = 155,136.
    Trainable = r x 155,136 x 46 = r x 7,136,256: r=64 -> 456,720,384; r=32 -> 228,360,192."""
    rows = {row["trial"]: row for row in trial_report(load_recipe("llm2024"))}
    assert rows["9 (以下同一モデル)"]["trainable_parameters"] == 456_720_384
    assert rows["13"]["trainable_parameters"] == 456_720_384  # trials 10-13 reuse trial 9's model
    assert rows["4"]["trainable_parameters"] == 228_360_192 and rows["4"]["alpha_over_r"] == 0.5
    assert rows["5"]["alpha_over_r"] == 2.0 and rows["1"]["alpha_over_r"] == 1.0
    assert rows["3"]["trainable_parameters"] == 128 * 7_136_256


@pytest.mark.claim("C22")
def test_the_recorded_targets_are_kept_as_recipe_metadata():
    targets = load_recipe("llm2024").targets
    assert (targets["preliminary_score"], targets["preliminary_rank"]) == (3.83, 4)
    assert (targets["final_score"], targets["final_rank"]) == (3.73835, 2)
    assert "ELYZA-tasks-100-TV" in targets["benchmark"]


@pytest.mark.claim("P12")
def test_resolved_settings_write_out_every_training_argument_default_included():
    import transformers

    settings = resolved_settings(load_recipe("llm2024"))
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments) if f.init}
    assert fields <= set(settings["training_arguments"])
    assert settings["training_arguments"]["adam_beta2"] == 0.999  # a default the recipe never mentions
    assert settings["lora"]["r"] == 64 and "init_lora_weights" in settings["lora"]  # LoraConfig defaults too
    assert settings["versions"]["transformers"] == transformers.__version__
    assert settings["departures"]["logging_dir"]["source_value"] == "./logs"
    assert len(settings["recipe"]["sha256"]) == 64


@pytest.mark.claim("P12", "X8")
@pytest.mark.parametrize("recipe, checkpointing", [("llm2024", True), ("primer", True), ("plain", False)])
def test_resolved_settings_add_the_run_settings_and_checkpointing_to_the_recipes_arguments(
    tmp_path, recipe, checkpointing
):
    """What a run records (and hands its Trainer: spec/test_runs.py and spec/test_manifest.py compare the two on real
    runs), besides the recipe's own arguments: records arrive encoded, so every column is kept
    (remove_unused_columns False); one line per step replaces the bar (disable_tqdm True); no KV cache while
    training (use_cache False, C15, which the Trainer copies onto the model's config); activation checkpointing is
    on when the recipe asks for it in [sft] (llm2024) or in its arguments (the primer's gradient_checkpointing), off
    otherwise."""
    if recipe == "plain":
        (tmp_path / "plain.toml").write_text('name = "plain"\nsource = "x"\n', encoding="utf-8")
        recipe = str(tmp_path / "plain.toml")
    arguments = resolved_settings(load_recipe(recipe))["training_arguments"]
    run_settings = (arguments["remove_unused_columns"], arguments["disable_tqdm"], arguments["use_cache"])
    assert run_settings == (False, True, False)
    assert arguments["activation_checkpointing"] is checkpointing


@pytest.mark.slow
@pytest.mark.claim("P12")
def test_recipe_command_prints_resolved_settings_as_json():
    result = run_cli("recipe", "llm2024", "--resolved")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["training_arguments"]["gradient_accumulation_steps"] == 8


def test_overrides_change_a_copy_and_name_bad_keys():
    recipe = load_recipe("llm2024")
    changed = apply_overrides(recipe, ["lora.r=32", "learning_rate=1e-4", "output_dir=runs/x"])
    assert (changed.lora["r"], changed.training_arguments["learning_rate"]) == (32, 1e-4)
    assert recipe.lora["r"] == 64
    with pytest.raises(InputError, match="no key 'rank'"):
        apply_overrides(recipe, ["lora.rank=32"])
    with pytest.raises(InputError, match="unknown section"):
        apply_overrides(recipe, ["optimizer.lr=1"])
    with pytest.raises(InputError, match="expected key=value"):
        apply_overrides(recipe, ["r32"])


def test_recipe_command_names_an_unknown_recipe_and_exits_2():
    result = run_cli("recipe", "llm2025")
    assert result.returncode == 2 and "llm2025" in result.stderr and "llm2024" in result.stderr


# X12: every setting has a type and a range, checked on load and on override (reference/settings/settings_types.py).
# Each rule as a pair: the first value it refuses and the first it takes, so a rule that is dropped or moved fails.
RULES = [
    ("sft.max_seq_length=0", "sft.max_seq_length=1"),
    ("sft.packing=maybe", "sft.packing=no"),
    ("sft.dataset_num_proc=0", "sft.dataset_num_proc=1"),
    ("sft.shuffle_seed=-1", "sft.shuffle_seed=0"),
    ("sft.gradient_checkpointing=2", "sft.gradient_checkpointing=0"),
    ("sft.use_cache_during_training=on", "sft.use_cache_during_training=TRUE"),
    ("sft.loss_on=both", "sft.loss_on=response"),
    ("sft.padding_free=maybe", "sft.padding_free=yes"),
    ("sft.chunked_loss=none", "sft.chunked_loss=1"),
    ("sft.packing=true", "sft.packing=false"),  # records are never packed here: only false is taken
    ("dpo.beta=0", "dpo.beta=1e-9"),
    ("dpo.max_length=1", "dpo.max_length=2"),
    ("classifier.max_length=2", "classifier.max_length=3"),
    ("classifier.batch_size=0", "classifier.batch_size=1"),
    ("classifier.spread_max_length=spread", "classifier.spread_max_length=yes"),
    ("classifier.tta=both", "classifier.tta=no"),
    ("classifier.eval_fraction=1", "classifier.eval_fraction=0.999"),
    ("classifier.eval_fraction=0", "classifier.eval_fraction=0.001"),
    ("lora.r=0", "lora.r=1"),
    ("lora.r=2.5", "lora.r=2"),
    ("lora.lora_alpha=0", "lora.lora_alpha=0.5"),
    ("lora.lora_dropout=1.0", "lora.lora_dropout=0.999"),
    ("lora.lora_dropout=-0.1", "lora.lora_dropout=0"),
    ("lora.bias=some", "lora.bias=lora_only"),
    ("lora.target_modules=[1]", 'lora.target_modules=["q_proj"]'),
    ("lora.use_rslora=sometimes", "lora.use_rslora=true"),
    ("lora.use_dora=sometimes", "lora.use_dora=false"),
    ("lora.random_state=-1", "lora.random_state=0"),
    ("lora.task_type=TOKEN_CLS", "lora.task_type=CAUSAL_LM"),
    ("lora.modules_to_save=lm_head", 'lora.modules_to_save=["lm_head"]'),
    ("quantization.load_in_4bit=nf4", "quantization.load_in_4bit=False"),
    ("quantization.load_in_8bit=8", "quantization.load_in_8bit=0"),
    ("quantization.bnb_4bit_quant_type=nf3", "quantization.bnb_4bit_quant_type=fp4"),
    ("quantization.bnb_4bit_use_double_quant=double", "quantization.bnb_4bit_use_double_quant=No"),
    ("quantization.bnb_4bit_compute_dtype=float8", "quantization.bnb_4bit_compute_dtype=float16"),
    ("quantization.bnb_4bit_quant_storage=int4", "quantization.bnb_4bit_quant_storage=uint8"),
    ("per_device_train_batch_size=0", "per_device_train_batch_size=1"),
    ("per_device_eval_batch_size=0", "per_device_eval_batch_size=1"),
    ("gradient_accumulation_steps=0", "gradient_accumulation_steps=1"),
    ("eval_accumulation_steps=0", "eval_accumulation_steps=1"),
    ("max_steps=1.5", "max_steps=-1"),
    ("num_train_epochs=-0.5", "num_train_epochs=0.5"),
    ("learning_rate=0", "learning_rate=1e-9"),
    ("learning_rate=inf", "learning_rate=.5"),
    ("warmup_steps=-1", "warmup_steps=0"),
    ("warmup_ratio=1.0", "warmup_ratio=0.999"),
    ("warmup_ratio=-0.01", "warmup_ratio=0"),
    ("weight_decay=-0.1", "weight_decay=0"),
    ("adam_beta1=1.0", "adam_beta1=0.999"),
    ("adam_beta1=-0.1", "adam_beta1=0"),
    ("adam_beta2=1.0", "adam_beta2=0.999"),
    ("adam_beta2=-0.1", "adam_beta2=0"),
    ("adam_epsilon=0", "adam_epsilon=1e-12"),
    ("max_grad_norm=-0.1", "max_grad_norm=0"),
    ("label_smoothing_factor=1.0", "label_smoothing_factor=0.5"),
    ("neftune_noise_alpha=-1", "neftune_noise_alpha=0"),
    ("logging_steps=0", "logging_steps=0.5"),
    ("save_steps=0", "save_steps=1"),
    ("eval_steps=0", "eval_steps=1"),
    ("eval_delay=-1", "eval_delay=0"),
    ("save_total_limit=-1", "save_total_limit=0"),
    ("seed=-1", "seed=0"),
    ("seed=4294967296", "seed=4294967295"),
    ("data_seed=-1", "data_seed=0"),
    ("dataloader_num_workers=-1", "dataloader_num_workers=0"),
    ("dataloader_prefetch_factor=0", "dataloader_prefetch_factor=1"),
    ("torch_empty_cache_steps=0", "torch_empty_cache_steps=1"),
    ("ddp_timeout=0", "ddp_timeout=1"),
    ("ddp_bucket_cap_mb=0", "ddp_bucket_cap_mb=1"),
    # types taken from the installed TrainingArguments' fields
    ("use_cpu=maybe", "use_cpu=TRUE"),
    ("optim=adamw_9bit", "optim=adamw_torch"),
    ("lr_scheduler_type=cosinus", "lr_scheduler_type=cosine"),
    ("save_strategy=weekly", "save_strategy=epoch"),
    ("local_rank=0.5", "local_rank=0"),
    ("report_to=[1]", "report_to=tensorboard"),
    ("fsdp=[1]", "fsdp=true"),
]


def stored(override: str):
    """The value an override leaves in llm2024."""
    key = override.partition("=")[0]
    section, dot, name = key.rpartition(".")
    return getattr(apply_overrides(load_recipe("llm2024"), [override]), section if dot else "training_arguments")[name]


@pytest.mark.claim("X12")
@pytest.mark.parametrize("refused, taken", RULES, ids=[refused for refused, _ in RULES])
def test_each_setting_refuses_the_first_value_outside_its_type_or_range_and_takes_the_first_inside(refused, taken):
    """The refusal is an InputError naming the setting and the value as given, and saying what is allowed."""
    key, _, value = refused.partition("=")
    with pytest.raises(InputError) as error:
        stored(refused)
    message = str(error.value)
    assert f"override {key}=" in message and value in message and ": must be " in message, message
    stored(taken)


@pytest.mark.claim("X12")
@pytest.mark.parametrize(
    "word, flag",
    [("False", False), ("false", False), ("FALSE", False), ("no", False), ("0", False)]
    + [("True", True), ("true", True), ("Yes", True), ("1", True)],
)
def test_a_boolean_override_in_any_case_or_as_yes_no_or_1_0_is_stored_as_a_real_bool(word, flag):
    """`sft.padding_free=False` once stored the string "False", which is truthy: the run trained padding-free."""
    value = stored(f"sft.padding_free={word}")
    assert value is flag


@pytest.mark.claim("X12")
def test_sft_padding_free_False_is_recorded_in_the_resolved_settings_as_false():
    recipe = apply_overrides(load_recipe("llm2024"), ["sft.padding_free=False", "use_cpu=true"])
    settings = json.loads(json.dumps(resolved_settings(recipe), default=str))
    assert settings["sft"]["padding_free"] is False


@pytest.mark.claim("X12")
def test_a_boolean_that_is_not_a_boolean_word_is_refused_naming_the_key():
    with pytest.raises(InputError, match=r"sft\.padding_free='maybe': must be true or false"):
        stored("sft.padding_free=maybe")


@pytest.mark.claim("X12")
def test_a_negative_weight_decay_is_refused_naming_weight_decay():
    with pytest.raises(InputError, match=r"weight_decay=-0\.1: must be a finite number >= 0"):
        stored("weight_decay=-0.1")


@pytest.mark.claim("X12")
def test_max_steps_is_any_whole_number_and_its_refusal_says_what_0_or_less_means():
    assert stored("max_steps=-1") == -1 and stored("max_steps=0") == 0
    with pytest.raises(InputError, match=r"max_steps='many': must be a whole number \(<= 0: train num_train_epochs\)"):
        stored("max_steps=many")


@pytest.mark.claim("X12")
def test_a_lora_dropout_of_1_5_is_an_input_error_not_a_traceback():
    with pytest.raises(InputError, match=r"lora\.lora_dropout=1\.5: must be in \[0, 1\)"):
        stored("lora.lora_dropout=1.5")


@pytest.mark.claim("X12")
@pytest.mark.parametrize(
    "override, nearest",
    [
        ("learning_rat=1e-4", "learning_rate"),
        ("sft.max_seq_lenght=64", "max_seq_length"),
        ("lora.lora_dropot=0.1", "lora_dropout"),
        ("quantization.load_in_4bits=true", "load_in_4bit"),
    ],
)
def test_an_unknown_key_is_refused_with_the_nearest_known_one(override, nearest):
    with pytest.raises(InputError) as error:
        stored(override)
    assert override.partition("=")[0].rpartition(".")[2] in str(error.value)
    assert f"did you mean {nearest!r}?" in str(error.value)


@pytest.mark.claim("X12")
def test_a_string_outside_a_settings_choices_is_refused_with_the_nearest_choice():
    with pytest.raises(InputError, match="did you mean 'adamw_8bit'"):
        stored("optim=adamw_9bit")


@pytest.mark.claim("X12")
@pytest.mark.parametrize(
    "override, value",
    [("output_dir=2024", "2024"), ("run_name=true", "true"), ("learning_rate=.5", 0.5), ("fsdp=True", True)],
)
def test_an_override_is_stored_as_its_setting_takes_it(override, value):
    """Text where the setting is a string (TOML reads `2024` as a number), a number TOML does not read (`.5`),
    and fsdp, a string in TrainingArguments' annotation, that also takes true."""
    assert stored(override) == value and type(stored(override)) is type(value)


@pytest.mark.claim("X12")
def test_every_training_argument_takes_its_type_from_the_installed_training_arguments():
    import transformers

    from reference.settings.settings_types import training_rules

    rules = training_rules()
    fields = {f.name: f for f in dataclasses.fields(transformers.TrainingArguments) if f.init}
    assert set(fields) <= set(rules)
    assert rules["bf16"].kinds == ("bool",) and rules["seed"].kinds == ("int",)
    assert rules["learning_rate"].kinds == ("float",) and "linear" in rules["lr_scheduler_type"].choices
    assert rules["gradient_checkpointing"] == rules["activation_checkpointing"]  # a migrated name, the new rule


@pytest.mark.claim("X12")
@pytest.mark.parametrize(
    "section, line, named",
    [
        ("lora", "lora_dropout = 1.5", "lora.lora_dropout=1.5: must be in [0, 1)"),
        ("lora", 'r = "64"', "lora.r='64': must be a whole number >= 1"),
        ("sft", 'padding_free = "maybe"', "sft.padding_free='maybe': must be true or false"),
        ("sft", "max_seq_lenght = 64", "did you mean 'max_seq_length'?"),
        ("sft", "dataset_text_field = 5", "sft.dataset_text_field=5: must be a string"),
        ("sft", "token = 5", "sft.token=5: must be a string"),
        ("sft", "use_auth_token = 5", "sft.use_auth_token=5: must be true or false (also yes/no, 1/0) or a string"),
        ("quantization", 'bnb_4bit_quant_type = "nf3"', "quantization.bnb_4bit_quant_type='nf3': must be one of"),
        ("training_arguments", "weight_decay = -0.1", "weight_decay=-0.1: must be a finite number >= 0"),
        ("training_arguments", "learning_rat = 1e-4", "did you mean 'learning_rate'?"),
    ],
)
def test_a_recipe_file_with_a_setting_of_the_wrong_type_or_range_is_refused_naming_the_file_and_key(
    tmp_path, section, line, named
):
    path = tmp_path / "bad.toml"
    path.write_text(f'name = "bad"\nsource = "x"\n[{section}]\n{line}\n', encoding="utf-8")
    with pytest.raises(InputError) as error:
        load_recipe(path)
    assert str(error.value).startswith(f"recipe {path}: ") and named in str(error.value)


@pytest.mark.claim("X12")
def test_a_recipe_file_stores_a_boolean_word_as_a_bool(tmp_path):
    path = tmp_path / "words.toml"
    path.write_text('name = "w"\nsource = "x"\n[sft]\npadding_free = "False"\nchunked_loss = 1\n', encoding="utf-8")
    assert load_recipe(path).sft == {"padding_free": False, "chunked_loss": True}


@pytest.mark.claim("X12")
def test_a_method_section_left_out_is_recorded_with_its_defaults_written_out():
    """The primer recipe has no [lora] and an [sft] of two keys: the run records every [sft] field, the defaults
    being those of the section's dataclass (reference/settings/sections.py): 2,048 tokens, the loss on the response,
    padded
    batches, the full logits, no checkpointing (and every layer recomputed when it is on), never packed, and no
    token."""
    from reference.settings.training_arguments import resolved_settings

    recipe = load_recipe("primer")
    recipe.sft = {}
    assert resolved_settings(recipe)["sft"] == {
        "max_seq_length": 2048,
        "loss_on": "response",
        "padding_free": False,
        "chunked_loss": False,
        "gradient_checkpointing": False,
        "recompute": "all",
        "packing": False,
        "dataset_text_field": "text",
        "dataset_num_proc": None,
        "shuffle_seed": None,
        "use_cache_during_training": False,
        "token": None,
        "use_auth_token": None,
    }


@pytest.mark.claim("X12")
@pytest.mark.parametrize("name", ["primer", "llm2024", "llm2024-fsdp", "dpo", "lmsys-classifier"])
def test_the_shipped_recipes_keep_every_rule(name):
    """Their [training_arguments] are checked when used, not when loaded (`filter` imports no transformers)."""
    recipe = load_recipe(name)
    check_numbers(recipe)
    map_training_arguments(recipe)


@pytest.mark.claim("X12")
def test_a_setting_changed_in_code_is_still_checked_before_the_trainer_gets_it():
    recipe = load_recipe("llm2024")
    recipe.training_arguments["weight_decay"] = -1
    with pytest.raises(InputError, match="weight_decay=-1: must be"):
        map_training_arguments(recipe)
    recipe.training_arguments["weight_decay"] = 0.0
    recipe.sft["padding_free"] = "False"
    check_numbers(recipe)
    assert recipe.sft["padding_free"] is False


@pytest.mark.claim("X12")
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["num_train_epochs=0"], "num_train_epochs=0: must be a finite number > 0 (or max_steps > 0)"),
        (["quantization.load_in_8bit=true"], "load_in_4bit and quantization.load_in_8bit are both true"),
    ],
)
def test_settings_that_contradict_each_other_are_refused_once_the_overrides_are_in(overrides, message):
    recipe = apply_overrides(load_recipe("llm2024"), overrides)
    with pytest.raises(InputError) as error:
        check_numbers(recipe)
    assert message in str(error.value)
    check_numbers(apply_overrides(load_recipe("llm2024"), [*overrides, "max_steps=1", "quantization.load_in_4bit=no"]))


@pytest.mark.slow
@pytest.mark.claim("X12")
def test_train_with_lora_dropout_1_5_exits_2_with_the_message_and_no_traceback(tmp_path):
    result = run_cli(
        "train",
        "--recipe",
        "llm2024",
        "--model",
        tmp_path / "model",
        "--data",
        tmp_path / "data.jsonl",
        "--output",
        tmp_path / "run",
        "lora.lora_dropout=1.5",
    )
    assert result.returncode == 2, result.stderr
    assert "lora.lora_dropout=1.5: must be in [0, 1)" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.claim("X12")
def test_a_run_maps_its_recipe_once_and_records_what_that_one_mapping_gave(monkeypatch, tmp_path):
    """resolve() maps the recipe onto the installed transformers once; the settings the manifest records are read
    from that resolution, not mapped again (they could not then differ from what the Trainer got)."""
    from reference.settings import training_arguments

    calls = []
    real = training_arguments.map_training_arguments
    monkeypatch.setattr(training_arguments, "map_training_arguments", lambda *a, **k: calls.append(a) or real(*a, **k))
    recipe = load_recipe("llm2024")
    resolved = training_arguments.resolve(recipe, str(tmp_path))
    settings = training_arguments.resolved_settings(recipe, str(tmp_path), resolved)
    assert len(calls) == 1
    recorded = settings["training_arguments"]  # the run's arguments (RUN_SETTINGS in), not the recipe's as written
    assert (recorded["disable_tqdm"], recorded["remove_unused_columns"], recorded["seed"]) == (True, False, 3407)
