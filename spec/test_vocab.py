"""Vocabulary (reference/vocab.py): the trained fixture tokenizer and registering special tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from reference.vocab import GEMMA2_SPECIAL_TOKENS, LLAMA3_SPECIAL_TOKENS, pieces, register_tokens, train_bpe


@pytest.mark.claim("P6")
def test_training_the_tokenizer_twice_gives_the_same_vocabulary(fixtures_dir):
    first = train_bpe([fixtures_dir / "corpus.txt"], 3000)
    second = train_bpe([fixtures_dir / "corpus.txt"], 3000)
    assert first.get_vocab() == second.get_vocab()
    assert first.to_str() == second.to_str()  # merges in the same order too


@pytest.mark.claim("P6")
def test_the_committed_tokenizer_is_the_one_the_script_trains(fixtures_dir, gemma_tokenizer):
    trained = train_bpe([fixtures_dir / "corpus.txt"], 3000)
    assert gemma_tokenizer.get_vocab() == trained.get_vocab()


@pytest.mark.claim("P6")
def test_the_tokenizer_fixes_the_models_vocabulary(tiny_gemma2, gemma_tokenizer):
    """The model is built after the tokenizer: one embedding row per token id."""
    assert tiny_gemma2.get_input_embeddings().weight.shape[0] == len(gemma_tokenizer)


@pytest.mark.claim("P6")
def test_the_fixture_tokenizer_carries_gemma2_and_llama3_special_tokens(gemma_tokenizer, llama_tokenizer):
    for token in GEMMA2_SPECIAL_TOKENS + LLAMA3_SPECIAL_TOKENS:
        assert len(pieces(gemma_tokenizer, token)) == 1, token
    assert (gemma_tokenizer.bos_token, gemma_tokenizer.eos_token, gemma_tokenizer.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert (llama_tokenizer.bos_token, llama_tokenizer.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert gemma_tokenizer.get_vocab() == llama_tokenizer.get_vocab()


@pytest.mark.slow
@pytest.mark.claim("P6")
def test_fixtures_rebuild_byte_identical_from_the_script(fixtures_dir):
    result = subprocess.run([sys.executable, str(fixtures_dir / "build.py"), "--check"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.claim("P5")
def test_an_unregistered_user_name_marker_splits_into_several_pieces(gemma_tokenizer):
    assert len(pieces(gemma_tokenizer, "<user_name>")) > 1


@pytest.mark.claim("P5")
def test_registering_user_name_makes_it_one_id_and_grows_tied_embeddings_with_the_mean_row(gemma_tokenizer, tiny_gemma2):
    old = tiny_gemma2.get_input_embeddings().weight.detach().clone()
    report = register_tokens(gemma_tokenizer, tiny_gemma2, ["<user_name>"])

    new_id = gemma_tokenizer.convert_tokens_to_ids("<user_name>")
    assert pieces(gemma_tokenizer, "<user_name>") == ["<user_name>"]
    assert gemma_tokenizer("<user_name>さん", add_special_tokens=False)["input_ids"][0] == new_id
    grown = tiny_gemma2.get_input_embeddings().weight
    assert grown.shape == (old.shape[0] + 1, old.shape[1]) and new_id == old.shape[0]
    assert torch.equal(grown[:-1], old)  # old rows untouched
    assert torch.allclose(grown[new_id], old.mean(dim=0))
    assert tiny_gemma2.get_output_embeddings().weight is grown  # Gemma-2 ties the LM head to the embeddings
    assert report["tied_lm_head"] and report["embedding_rows"] == {"before": old.shape[0], "after": old.shape[0] + 1}


@pytest.mark.claim("P5")
def test_an_untied_lm_head_grows_too_with_its_own_mean_row(llama_tokenizer, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    old_head = model.get_output_embeddings().weight.detach().clone()
    register_tokens(llama_tokenizer, model, ["<user_name>", "<place>"])
    head = model.get_output_embeddings().weight
    assert head is not model.get_input_embeddings().weight
    assert head.shape[0] == old_head.shape[0] + 2
    assert torch.allclose(head[-2:], old_head.mean(dim=0).expand(2, -1))


@pytest.mark.claim("P5")
def test_add_tokens_command_saves_a_model_and_tokenizer_that_reload_grown(tmp_path, tiny_gemma2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "grown"
    result = subprocess.run([sys.executable, "-m", "reference", "add-tokens", "--model", str(tiny_gemma2_dir),
                             "--tokens", "<user_name>", "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    original = AutoModelForCausalLM.from_pretrained(str(tiny_gemma2_dir)).get_input_embeddings().weight
    new_id = tokenizer.convert_tokens_to_ids("<user_name>")
    assert report["token_ids"] == {"<user_name>": new_id}
    assert pieces(tokenizer, "<user_name>") == ["<user_name>"]
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == original.shape[0] + 1
    assert torch.allclose(model.get_input_embeddings().weight[new_id], original.detach().mean(dim=0))
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))


@pytest.mark.parametrize("model_arg,named", [("/no/such/model", "not a local directory"), ("spec", "no config.json")])
def test_add_tokens_refuses_a_missing_model_with_exit_2(tmp_path, model_arg, named):
    result = subprocess.run([sys.executable, "-m", "reference", "add-tokens", "--model", model_arg,
                             "--tokens", "<x>", "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and named in result.stderr and "Traceback" not in result.stderr
