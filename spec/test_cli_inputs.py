"""Every number the command line reads is checked where it is read: a bad one is refused by name, exit 2.

A bad number ends the command with exit code 2 and one message on stderr that names the argument (or, for a
recipe override, the setting), with no traceback, and before any expensive work: no file is read, no model is
loaded, no output is written. The file and model paths in these commands do not exist, so a number that slipped
through would end in a different message (one naming --model, --tasks, --data, ...) and the test would fail.

The ranges, by argument:
* counts are whole numbers >= 1: generate --k (always few-shot: there is no zero-shot mode), --window,
  --max-new-tokens, --batch-size; preference --batch-size; dpo --r, --steps; filter --workers;
* preference --max-length >= 3: spread cuts each of the 3 parts to max_length // 3, which must be >= 1;
* rates and epochs are finite and > 0: preference --epochs, --lr; dpo --beta, --lr;
* steps --epochs is finite (0 or less is refused by the step plan unless --max-steps is set);
* verify --rtol is finite and >= 0 (0: the losses must match exactly);
* train/continue/reproduce overrides: per_device_train_batch_size, gradient_accumulation_steps, lora.r and
  sft.max_seq_length are whole numbers >= 1; learning_rate, and num_train_epochs unless max_steps > 0, are
  finite and > 0; max_steps is a whole number.
Each range is pinned on both sides: the first refused value and the first accepted one.
"""

from __future__ import annotations

import pytest

from reference import cli
from reference.settings import recipes
from spec.cli_runner import run_main


def assert_refused(argv: list[str], named: str, *outputs) -> None:
    """Exit 2, one error message naming `named`, no traceback, nothing printed to stdout, no output written.
    Values are passed as --flag=VALUE: argparse reads a separate '-1e-4' or '-inf' as an option and would refuse
    it ('expected one argument') before the range check this file pins."""
    code, out, err = run_main(*argv)
    assert code == 2, err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err
    assert named in error_lines[0], err
    assert "Traceback" not in err and out == ""
    for output in outputs:
        assert not output.exists()


@pytest.fixture
def nowhere(tmp_path):
    """Paths that do not exist: reaching any of them would change the error message."""
    return tmp_path / "missing"


STEPS = ["steps", "--records", "10", "--batch-size", "2"]


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--epochs", "inf"),
        ("--epochs", "-inf"),
        ("--epochs", "nan"),
        ("--epochs", "0"),
        ("--epochs", "-1"),
        ("--save-steps", "inf"),
        ("--logging-steps", "inf"),
        ("--warmup", "inf"),
        ("--warmup", "nan"),
    ],
)
def test_steps_refuses_an_endless_undefined_or_empty_number_of_epochs_or_steps(flag, value):
    assert_refused([*STEPS, f"{flag}={value}"], flag)


@pytest.mark.parametrize(
    "argv, named",
    [
        (["steps", "--records", "10", "--batch-size", "2", "--epochs", "inf"], "argument --epochs:"),
        (["generate", "--model", "m", "--tasks", "t", "--shots", "s", "--output", "o", "--k", "-1"], "argument --k:"),
    ],
)
def test_the_reviewers_commands_as_typed_end_with_the_argument_named(argv, named, tmp_path, monkeypatch):
    """`generate --k -1` used to take 23 of 24 shots (a [:-1] slice); `steps --epochs inf` ended in a traceback."""
    monkeypatch.chdir(tmp_path)
    assert_refused(argv, named, tmp_path / "o")


def test_steps_still_takes_fractional_epochs():
    """10 records / batch 2 = 5 steps an epoch; 0.5 epochs = ceil(2.5) = 3 optimizer steps."""
    code, out, _ = run_main(*STEPS, "--epochs", "0.5", "--json")
    assert code == 0 and '"total_optimizer_steps": 3' in out


def generate_argv(nowhere, output):
    return [
        "generate",
        "--model",
        nowhere / "model",
        "--tasks",
        nowhere / "tasks.jsonl",
        "--shots",
        nowhere / "shots.jsonl",
        "--output",
        output,
    ]


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--k", "-1"),
        ("--k", "0"),
        ("--k", "1.5"),
        ("--window", "0"),
        ("--window", "-5"),
        ("--max-new-tokens", "-1"),
        ("--max-new-tokens", "0"),
        ("--batch-size", "0"),
    ],
)
def test_generate_refuses_counts_below_one_before_reading_or_loading_anything(flag, value, nowhere, tmp_path):
    output = tmp_path / "outputs.jsonl"
    assert_refused([*generate_argv(nowhere, output), f"{flag}={value}"], f"argument {flag}:", output)


def preference_argv(action, nowhere, output):
    return ["preference", action, "--model", nowhere / "model", "--data", nowhere / "data.jsonl", "--output", output]


@pytest.mark.parametrize("flag, value", [("--max-length", "2"), ("--max-length", "0"), ("--batch-size", "0")])
def test_preference_predict_refuses_an_empty_batch_and_a_max_length_that_spread_cannot_cut_in_three(
    flag, value, nowhere, tmp_path
):
    output = tmp_path / "out"
    assert_refused([*preference_argv("predict", nowhere, output), f"{flag}={value}"], f"argument {flag}:", output)


@pytest.mark.parametrize(
    "command, override",
    [
        ("dpo", "dpo.beta=0"),
        ("dpo", "dpo.beta=-0.1"),
        ("dpo", "dpo.beta=nan"),
        ("dpo", "dpo.max_length=1"),
        ("preference train", "classifier.max_length=2"),
        ("preference train", "classifier.eval_fraction=1"),
        ("preference train", "classifier.eval_fraction=0"),
        ("preference train", "classifier.batch_size=0"),
    ],
)
def test_dpo_and_the_classifier_name_their_own_setting_that_is_out_of_range(command, override, nowhere, tmp_path):
    """beta 0 divides the margin's scale away; a DPO sequence needs a prompt token and an answer token; spread cuts
    max_length in three; a held-out split of none or all of the rows measures nothing or trains on nothing."""
    output = tmp_path / "run"
    argv = [*command.split(), "--model", nowhere / "model", "--data", nowhere / "d.jsonl", "--output", output, override]
    assert_refused(argv, f"{override}: must be", output)


@pytest.mark.parametrize("value", ["0", "-2"])
def test_filter_refuses_fewer_than_one_worker(value, nowhere, tmp_path):
    output, rejects = tmp_path / "kept.jsonl", tmp_path / "rejects.jsonl"
    argv = ["filter", "--input", nowhere / "in.jsonl", "--output", output, "--rejects", rejects, f"--workers={value}"]
    assert_refused(argv, "argument --workers:", output, rejects)


@pytest.mark.parametrize("value", ["-1", "-1e-9", "nan", "inf"])
def test_verify_refuses_a_negative_or_undefined_tolerance(value, nowhere):
    assert_refused(["verify", nowhere / "a", nowhere / "b", f"--rtol={value}"], "argument --rtol:")


@pytest.mark.parametrize(
    "argv",
    [
        [
            "generate",
            "--model",
            "m",
            "--tasks",
            "t",
            "--shots",
            "s",
            "--output",
            "o",
            "--k",
            "1",
            "--window",
            "1",
            "--max-new-tokens",
            "1",
            "--batch-size",
            "1",
        ],
        [
            "preference",
            "predict",
            "--model",
            "m",
            "--data",
            "d",
            "--output",
            "o",
            "--max-length",
            "3",
            "--batch-size",
            "1",
        ],
        ["dpo", "--model", "m", "--data", "d", "--output", "o", "dpo.beta=1e-9", "lora.r=1", "learning_rate=1e-9"],
        ["filter", "--input", "i", "--output", "o", "--rejects", "r", "--workers", "1"],
        ["verify", "a", "b", "--rtol", "0"],
        ["steps", "--records", "1", "--batch-size", "1", "--epochs", "0.5"],
    ],
    ids=["generate", "preference", "dpo", "filter", "verify", "steps"],
)
def test_the_smallest_allowed_values_are_accepted(argv):
    """The edges of the ranges above: 1 for counts, 3 for --max-length, any rate > 0, --rtol 0, each taken as the
    number given (and a recipe override kept as written, for the recipe's own check)."""
    args = cli.build_parser().parse_args(argv)
    numbers = {flag: value for flag, value in zip(argv, argv[1:], strict=False) if flag.startswith("--")}
    for flag, value in numbers.items():
        if value.replace(".", "").replace("e-", "").isdigit():
            assert getattr(args, flag[2:].replace("-", "_")) == float(value), flag
    assert getattr(args, "overrides", []) == [a for a in argv if "=" in a]


def test_the_parsed_numbers_keep_their_type_and_value():
    argv = ["preference", "predict", "--model", "m", "--data", "d", "--output", "o", "--max-length", "4"]
    args = cli.build_parser().parse_args([*argv, "--batch-size", "7"])
    assert (args.max_length, args.batch_size) == (4, 7)
    assert type(args.max_length) is int and type(args.batch_size) is int


@pytest.mark.parametrize(
    "override, named",
    [
        ("per_device_train_batch_size=-4", "per_device_train_batch_size=-4"),
        ("per_device_train_batch_size=0", "per_device_train_batch_size=0"),
        ("per_device_train_batch_size=2.5", "per_device_train_batch_size=2.5"),
        ("gradient_accumulation_steps=0", "gradient_accumulation_steps=0"),
        ("num_train_epochs=0", "num_train_epochs=0"),
        ("num_train_epochs=-1.5", "num_train_epochs=-1.5"),
        ("num_train_epochs=inf", "num_train_epochs=inf"),
        ("learning_rate=0", "learning_rate=0"),
        ("learning_rate=nan", "learning_rate=nan"),
        ("max_steps=many", "max_steps='many'"),
        ("lora.r=0", "lora.r=0"),
        ("sft.max_seq_length=0", "sft.max_seq_length=0"),
    ],
)
@pytest.mark.parametrize("command", ["train", "continue", "dpo", "preference train"])
def test_every_training_command_names_the_override_that_is_out_of_range(command, override, named, nowhere, tmp_path):
    output = tmp_path / "run"
    recipe = {"dpo": "dpo", "preference train": "lmsys-classifier"}.get(command, "llm2024")
    argv = [
        *command.split(),
        "--recipe",
        recipe,
        "--model",
        nowhere / "model",
        "--data",
        nowhere / "data.jsonl",
        "--output",
        output,
        override,
    ]
    if command == "continue":
        argv[1:1] = ["--adapter", nowhere / "adapter"]
    assert_refused(argv, f"{named}: must be", output)


def test_reproduce_names_an_out_of_range_set_override(tmp_path):
    output = tmp_path / "reproduce"
    assert_refused(
        ["reproduce", "--output", output, "--set", "per_device_train_batch_size=0"],
        "per_device_train_batch_size=0: must be",
        output,
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["per_device_train_batch_size=1", "gradient_accumulation_steps=1", "lora.r=1", "sft.max_seq_length=1"],
        ["num_train_epochs=0", "max_steps=1"],
        ["num_train_epochs=1e-9", "learning_rate=1e-9"],
    ],
    ids=["counts of one", "epochs ignored when max_steps is set", "tiny rates"],
)
def test_the_smallest_allowed_overrides_are_accepted(overrides):
    """Trainer ignores num_train_epochs when max_steps > 0, so 0 epochs is refused only without max_steps. Each value
    is kept as given, with its type (a count an int)."""
    import tomllib

    recipe = recipes.apply_overrides(recipes.load_recipe("llm2024"), overrides)
    recipes.check_numbers(recipe)
    for override in overrides:
        key, _, value = override.partition("=")
        section, _, name = key.rpartition(".")
        stored = getattr(recipe, section or "training_arguments")[name]
        expected = tomllib.loads(f"v = {value}")["v"]
        assert stored == expected and type(stored) is type(expected), override


@pytest.mark.parametrize("name", ["primer", "llm2024"])
def test_the_shipped_recipes_pass_the_check(name):
    recipes.check_numbers(recipes.load_recipe(name))
