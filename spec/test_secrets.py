"""X7: secrets never persist. A setting or environment value that is an access token never reaches a file, a
log line or a report.

What counts as an access token: a key whose name has the word "token" in it (`hub_token`, `HF_TOKEN`, `token`,
`use_auth_token`), split on anything that is not a letter or a digit, holding a non-empty string. So
`include_num_input_tokens_seen = "all"` (a count of tokens, the word is "tokens") and `use_auth_token = true` (a
flag) are not secrets and stay as they are.

Where a token could persist, and what stops it:
* the manifest's given settings (`training_arguments_given`, `[sft]`, `[departures]`, ...) record it as
  "<redacted>";
* the Trainer pickles its TrainingArguments whole into every checkpoint (`training_args.bin`, torch.save):
  the token is withheld from the arguments the Trainer gets (this project never pushes to a hub), and the run
  record says so; the manifest's `training_arguments` stay exactly the Trainer's own `to_dict()` (X8), where
  transformers writes `hub_token` as its placeholder "<HUB_TOKEN>";
* messages about a bad override and the recipe summary (`recipe NAME`) show the key, never the value.

The whole-run test trains for real through the command line in a child process (so every line any library
logs to stdout or stderr is seen, at transformers' `info` verbosity) with `hub_token=` given and `HF_TOKEN`
set, then reads back every byte of every file under the output directory.
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from reference.errors import InputError
from reference.settings import recipes, training_arguments
from spec.cli_runner import QA, run_cli

SECRET = "hf_SECRETvalue123"
"""Given as the `hub_token=` override."""
ENV_SECRET = "hf_ENVsecretValue456"
"""Set as HF_TOKEN in the run's environment."""
RUN = [
    "max_steps=2",
    "per_device_train_batch_size=2",
    "gradient_accumulation_steps=1",
    "warmup_steps=0",
    "save_steps=1",
    "sft.max_seq_length=48",
    "use_cpu=true",
]
"""By hand: 2 optimizer steps of one micro-batch of 2 records; a checkpoint after each, so two
training_args.bin files (checkpoint-1, checkpoint-2)."""


@pytest.fixture(scope="module")
def secret_run(tiny_gemma2_dir, qa_data, tmp_path_factory):
    """The whole run, its output kept as bytes: no secret may hide from the check in a line that is not UTF-8."""
    output = tmp_path_factory.mktemp("secret-run") / "run"
    on = ["--recipe", "llm2024", "--model", tiny_gemma2_dir, "--data", qa_data, *QA, "--output", output]
    env = {"HF_TOKEN": ENV_SECRET, "TRANSFORMERS_VERBOSITY": "info"}
    completed = run_cli("train", *on, *RUN, f"hub_token={SECRET}", env=env, text=False)
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")
    return completed, output


def secret_recipe(tmp_path):
    """A recipe file with a token in each section that can hold one, beside values that are not secrets."""
    path = tmp_path / "secret.toml"
    path.write_text(
        f'''name = "secret"
source = "spec"
[training_arguments]
hub_token = "{SECRET}"
include_num_input_tokens_seen = "all"
[departures.hub_token]
source_value = "{SECRET}"
reason = "the source pushed to a hub"
[sft]
token = "{SECRET}"
use_auth_token = true
max_seq_length = 48
''',
        encoding="utf-8",
    )
    return recipes.load_recipe(path)


@pytest.mark.slow
@pytest.mark.claim("X7")
def test_a_hub_token_and_HF_TOKEN_appear_in_no_file_a_run_writes_and_in_none_of_its_output(secret_run):
    completed, output = secret_run
    files = {path.relative_to(output).as_posix(): path.read_bytes() for path in output.rglob("*") if path.is_file()}
    saved_arguments = [name for name in files if name.endswith("training_args.bin")]
    assert len(saved_arguments) == 2  # checkpoint-1 and checkpoint-2
    assert {"manifest.json", "adapter_model.safetensors"} <= set(files)
    for secret in (SECRET, ENV_SECRET):
        assert [name for name, blob in files.items() if secret.encode() in blob] == []
        assert secret.encode() not in completed.stdout + completed.stderr


@pytest.mark.slow
@pytest.mark.claim("X7", "X8")
def test_the_run_record_says_the_token_was_given_and_withheld_from_the_trainers_saved_arguments(secret_run):
    """The override reached the run (recorded, redacted); the Trainer's saved arguments hold no token at all;
    the manifest's arguments are still the Trainer's own to_dict(), transformers' placeholder included."""
    _, output = secret_run
    settings = json.loads((output / "manifest.json").read_text(encoding="utf-8"))["settings"]
    assert settings["training_arguments_given"]["hub_token"] == "<redacted>"
    assert settings["training_arguments"]["hub_token"] == "<HUB_TOKEN>"
    assert [note.split("=")[0] for note in settings["withheld"]] == ["hub_token"]
    for saved in sorted((output / "checkpoints").glob("checkpoint-*/training_args.bin")):
        arguments = torch.load(saved, weights_only=False)
        assert arguments.hub_token is None
        assert json.loads(json.dumps(arguments.to_dict(), default=str)) == settings["training_arguments"]


@pytest.mark.claim("X7")
def test_the_arguments_a_trainer_gets_hold_no_token_so_their_pickle_cannot(tmp_path):
    """What the Trainer does with them at each save: torch.save(args, "training_args.bin")."""
    recipe = recipes.apply_overrides(recipes.load_recipe("llm2024"), ["use_cpu=true", f"hub_token={SECRET}"])
    arguments = training_arguments.run_arguments(recipe, str(tmp_path))
    pickled = io.BytesIO()
    torch.save(arguments, pickled)
    assert arguments.hub_token is None
    assert SECRET.encode() not in pickled.getvalue()


@pytest.mark.claim("X7")
def test_resolved_settings_redact_a_token_in_every_section_and_keep_what_is_not_a_secret(tmp_path):
    settings = training_arguments.resolved_settings(secret_recipe(tmp_path), str(tmp_path))
    assert SECRET not in json.dumps(settings, default=str)
    assert settings["training_arguments_given"]["hub_token"] == "<redacted>"
    assert settings["departures"]["hub_token"]["source_value"] == "<redacted>"
    assert settings["sft"]["token"] == "<redacted>"
    assert settings["training_arguments_given"]["include_num_input_tokens_seen"] == "all"  # a count, not a token
    assert settings["sft"]["use_auth_token"] is True and settings["sft"]["max_seq_length"] == 48


@pytest.mark.claim("X7")
def test_the_recipe_summary_shows_a_token_key_but_not_its_value(tmp_path):
    summary = recipes.describe(secret_recipe(tmp_path))
    assert "hub_token" in summary and "token = '<redacted>'" in summary
    assert SECRET not in summary


@pytest.mark.claim("X7")
@pytest.mark.parametrize("override", [f"sft.hub_token={SECRET}", f"hub.token={SECRET}", f"HF_TOKEN={SECRET}x="])
def test_a_refused_override_names_the_token_key_but_never_echoes_its_value(override):
    """An unknown [sft] key, an unknown section, and a key TrainingArguments lacks: each refused by name."""
    with pytest.raises(InputError) as refused:
        training_arguments.map_training_arguments(recipes.apply_overrides(recipes.load_recipe("llm2024"), [override]))
    assert "token" in str(refused.value).lower()
    assert SECRET not in str(refused.value)
