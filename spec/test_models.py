"""Loading, quantising and identifying models (reference/modeling/models.py); weight memory is spec/test_memory.py's.

Quantised layers are bitsandbytes' own (Linear4bit / Linear8bitLt), running on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time

import pytest
import torch

from reference.errors import InputError
from reference.modeling import models
from spec.cli_runner import QA, run_cli

IDS = torch.tensor([[2, 100, 200, 300, 400, 500, 600, 700]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.mark.claim("C1")
def test_a_saved_4bit_model_reloads_with_identical_logits_and_without_quantising_again(tiny_gemma2_dir, tmp_path):
    """Quantise once (NF4, double quantisation, bf16 compute), save, reload: the packed 4-bit weights read
    back are the very bytes saved, so the logits are equal exactly, not approximately."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    quantised, _ = models.load_causal_lm(tiny_gemma2_dir, dtype="bfloat16", quantization="nf4")
    identity = models.quantize_and_save(tiny_gemma2_dir, tmp_path / "nf4")
    saved_config = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert saved_config["bnb_4bit_quant_type"] == "nf4" and saved_config["bnb_4bit_use_double_quant"] is True
    assert saved_config["bnb_4bit_compute_dtype"] == "bfloat16"

    reloaded, reloaded_identity = models.load_causal_lm(tmp_path / "nf4", dtype="bfloat16")
    layer = reloaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.dtype == torch.uint8
    stored = load_file(tmp_path / "nf4" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(layer.weight.data.cpu(), stored)  # the saved packed bytes, not a fresh quantisation
    assert torch.equal(logits(reloaded), logits(quantised))
    assert reloaded_identity.quantization == "nf4" == identity.quantization
    assert (tmp_path / "nf4" / "tokenizer.json").is_file()


@pytest.mark.claim("C1")
def test_the_identity_is_the_resolved_path_and_a_hash_of_the_weight_files(tiny_gemma2_dir, tmp_path):
    """Expected hash computed here with hashlib over the one weight file; a model with one changed
    weight under the same name has a different identity (the substitution seed 001 warns about)."""
    copy = tmp_path / "model"
    shutil.copytree(tiny_gemma2_dir, copy)
    link = tmp_path / "link"
    link.symlink_to(copy)
    identity = models.identity(link)
    file_hash = hashlib.sha256((copy / "model.safetensors").read_bytes()).hexdigest()
    assert identity.path == str(copy.resolve()) and identity.files == {"model.safetensors": file_hash}
    assert identity.weights_sha256 == hashlib.sha256(f"model.safetensors\0{file_hash}\n".encode()).hexdigest()

    from safetensors.torch import load_file, save_file

    weights = load_file(copy / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert models.identity(link).weights_sha256 != identity.weights_sha256


@pytest.mark.claim("L3")
def test_a_hub_name_fails_at_once_naming_the_model_and_how_to_give_a_token():
    start = time.perf_counter()
    with pytest.raises(InputError) as error:
        models.load_causal_lm("google/gemma-2-27b")
    assert time.perf_counter() - start < 5  # no network attempt, no hang
    message = str(error.value)
    assert "google/gemma-2-27b" in message and "HF_TOKEN" in message and "token=" in message
    assert "use_auth_token" in message and "deprecated" in message


@pytest.mark.slow
@pytest.mark.claim("L3")
def test_the_access_token_never_appears_in_output_or_in_any_file_a_run_writes(tmp_path, tiny_gemma2_dir, qa_data):
    """HF_TOKEN set to a recognisable secret: a failing command and a whole training run never write it."""
    secret = "hf_secretTOKENvalue12345"
    env = {"HF_TOKEN": secret}
    train = ["train", "--recipe", "llm2024", "--data", qa_data, *QA]
    failing = run_cli(*train, "--model", "google/gemma-2-27b", "--output", tmp_path / "x", env=env)
    assert failing.returncode == 2 and "HF_TOKEN is set" in failing.stderr
    one_step = ["max_steps=1", "per_device_train_batch_size=2", "gradient_accumulation_steps=1"]
    one_step += ["sft.max_seq_length=32", "quantization.load_in_4bit=false"]
    run = run_cli(*train, "--model", tiny_gemma2_dir, "--output", tmp_path / "run", *one_step, env=env)
    assert run.returncode == 0, run.stderr
    written = [p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert secret not in failing.stdout + failing.stderr + run.stdout + run.stderr
    assert not any(secret.encode() in blob for blob in written)


def test_remote_code_is_not_run_unless_asked(tiny_gemma2_dir, tmp_path):
    """A directory whose config points at its own modelling code: loading it must not import that code."""
    directory = tmp_path / "custom"
    shutil.copytree(tiny_gemma2_dir, directory)
    marker = tmp_path / "remote-code-ran"
    (directory / "custom_model.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom_model.CustomModel"}
    (directory / "config.json").write_text(json.dumps(config))
    try:
        models.load_causal_lm(directory)
    except InputError:
        pass  # refusing is fine; running the file is not
    assert not marker.exists()


def test_a_directory_without_safetensors_is_refused(tiny_gemma2_dir, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    shutil.copy(tiny_gemma2_dir / "config.json", directory / "config.json")
    with pytest.raises(InputError, match="safetensors"):
        models.identity(directory)


@pytest.mark.slow
def test_quantize_command_writes_a_4bit_directory_and_refuses_a_missing_model(tiny_gemma2_dir, tmp_path):
    ok = run_cli("quantize", "--model", tiny_gemma2_dir, "--output", tmp_path / "q")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["quantization"] == "nf4"
    missing = run_cli("quantize", "--model", tmp_path / "nope", "--output", tmp_path / "q2")
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("config", ["{bad", "[1, 2]"])
def test_a_model_whose_config_is_not_a_json_object_is_refused_by_name(tmp_path, tiny_gemma2_dir, config):
    model = tmp_path / "model"
    shutil.copytree(tiny_gemma2_dir, model)
    (model / "config.json").write_text(config)
    with pytest.raises(InputError, match=f"model {model}: config.json is not"):
        models.require_model_dir(model)
