"""Vocabulary (reference/modeling/vocab.py): the trained fixture tokenizer and registering special tokens.

Expected values: the committed fixture tokenizer (built once by fixtures/build.py and checked in), the
model's embedding rows read before registering (their mean is the expected new row), and the published
config.json values of the real shapes written out below.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from reference import cli
from reference.modeling.shapes import REAL_SHAPES, load_config, projection_shapes
from reference.modeling.vocab import GEMMA2_SPECIAL_TOKENS, LLAMA3_SPECIAL_TOKENS, pieces, register_tokens, train_bpe
from spec.cli_runner import run_cli

VOCAB = 2862  # the fixture corpus runs out of pairs seen twice (min_frequency 2) before 3000 tokens


@pytest.fixture(scope="module")
def trained(fixtures_dir):
    """The fixture tokenizer trained again from the fixture corpus (up to 3000 tokens), as fixtures/build.py does."""
    return train_bpe([fixtures_dir / "corpus.txt"], 3000)


@pytest.mark.claim("P6")
def test_training_the_tokenizer_twice_gives_the_same_vocabulary(fixtures_dir, trained):
    again = train_bpe([fixtures_dir / "corpus.txt"], 3000)
    assert again.get_vocab() == trained.get_vocab() and len(trained.get_vocab()) == VOCAB
    assert again.to_str() == trained.to_str()  # merges in the same order too


@pytest.mark.claim("P6")
def test_the_committed_tokenizer_is_the_one_the_script_trains(gemma_tokenizer, trained):
    """Vocabulary, merges, pre-tokenizer, decoder and special tokens all equal the committed tokenizer.json's;
    only the post-processor (which puts <bos> in front, set by fixtures/build.py) is added afterwards."""
    committed = json.loads(gemma_tokenizer.backend_tokenizer.to_str())
    fresh = json.loads(trained.to_str())
    assert {k: v for k, v in committed.items() if k != "post_processor"} == {
        k: v for k, v in fresh.items() if k != "post_processor"
    }
    assert gemma_tokenizer.get_vocab() == trained.get_vocab()


@pytest.mark.claim("P6")
def test_the_tokenizer_fixes_the_models_vocabulary(tiny_gemma2, gemma_tokenizer):
    """The model is built after the tokenizer: one embedding row per token id."""
    assert tiny_gemma2.get_input_embeddings().weight.shape[0] == len(gemma_tokenizer) == VOCAB


@pytest.mark.claim("P6")
def test_the_fixture_tokenizer_carries_gemma2_and_llama3_special_tokens(gemma_tokenizer, llama_tokenizer):
    """Gemma-2's ids as its config.json has them (pad 0, eos 1, bos 2), then Llama-3's markers, one piece each."""
    specials = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    assert GEMMA2_SPECIAL_TOKENS + LLAMA3_SPECIAL_TOKENS == specials
    assert gemma_tokenizer.convert_tokens_to_ids(specials) == list(range(len(specials)))
    for token in specials:
        assert len(pieces(gemma_tokenizer, token)) == 1, token
    assert (gemma_tokenizer.bos_token, gemma_tokenizer.eos_token, gemma_tokenizer.pad_token) == (
        "<bos>",
        "<eos>",
        "<pad>",
    )
    assert (gemma_tokenizer.pad_token_id, gemma_tokenizer.eos_token_id, gemma_tokenizer.bos_token_id) == (0, 1, 2)
    assert (llama_tokenizer.bos_token, llama_tokenizer.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert gemma_tokenizer.get_vocab() == llama_tokenizer.get_vocab()


@pytest.mark.slow
@pytest.mark.claim("P6")
def test_fixtures_rebuild_byte_identical_from_the_script(fixtures_dir):
    result = subprocess.run(
        [sys.executable, str(fixtures_dir / "build.py"), "--check"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- registering special tokens (P5)


@pytest.mark.claim("P5")
def test_an_unregistered_user_name_marker_splits_into_several_pieces(gemma_tokenizer):
    assert len(pieces(gemma_tokenizer, "<user_name>")) > 1


@pytest.mark.claim("P5")
def test_registering_user_name_makes_it_one_id_and_grows_tied_embeddings_with_the_mean_row(
    gemma_tokenizer, tiny_gemma2
):
    old = tiny_gemma2.get_input_embeddings().weight.detach().clone()
    split = pieces(gemma_tokenizer, "<user_name>")
    report = register_tokens(gemma_tokenizer, tiny_gemma2, ["<user_name>"])

    new_id = gemma_tokenizer.convert_tokens_to_ids("<user_name>")
    assert new_id == old.shape[0] == VOCAB
    assert pieces(gemma_tokenizer, "<user_name>") == ["<user_name>"]
    assert gemma_tokenizer("<user_name>さん", add_special_tokens=False)["input_ids"][0] == new_id
    assert gemma_tokenizer.decode([new_id], skip_special_tokens=True) == ""  # registered as a special token
    grown = tiny_gemma2.get_input_embeddings().weight
    assert grown.shape == (VOCAB + 1, old.shape[1])
    assert torch.equal(grown[:-1], old)  # old rows untouched
    assert torch.allclose(grown[new_id], old.mean(dim=0), atol=1e-7)
    assert tiny_gemma2.get_output_embeddings().weight is grown  # Gemma-2 ties the LM head to the embeddings
    assert report == {
        "added": 1,
        "token_ids": {"<user_name>": VOCAB},
        "pieces_before": {"<user_name>": split},
        "tokenizer_size": {"before": VOCAB, "after": VOCAB + 1},
        "embedding_rows": {"before": VOCAB, "after": VOCAB + 1},
        "tied_lm_head": True,
    }


@pytest.mark.claim("P5")
def test_registering_a_token_the_tokenizer_has_grows_nothing(gemma_tokenizer, tiny_gemma2):
    old = tiny_gemma2.get_input_embeddings().weight.detach().clone()
    report = register_tokens(gemma_tokenizer, tiny_gemma2, ["<start_of_turn>"])
    assert report["added"] == 0 and report["token_ids"] == {"<start_of_turn>": 4}
    assert torch.equal(tiny_gemma2.get_input_embeddings().weight, old)


@pytest.mark.claim("P5")
def test_a_new_token_takes_a_spare_embedding_row_set_to_the_mean_of_the_tokenizers_rows(gemma_tokenizer, tiny_gemma2):
    """A model can carry more rows than its tokenizer has tokens (vocabularies padded to a multiple): the new
    token takes the first spare row and no row is added; its value is the mean of the rows that belong to
    tokens, not of the spare ones."""
    tiny_gemma2.resize_token_embeddings(VOCAB + 8, mean_resizing=False)
    with torch.no_grad():
        tiny_gemma2.get_input_embeddings().weight[VOCAB:] = 7.0  # spare rows far from the mean
    rows = tiny_gemma2.get_input_embeddings().weight.detach().clone()
    report = register_tokens(gemma_tokenizer, tiny_gemma2, ["<user_name>"])
    weight = tiny_gemma2.get_input_embeddings().weight
    assert report["embedding_rows"] == {"before": VOCAB + 8, "after": VOCAB + 8} and weight.shape[0] == VOCAB + 8
    assert torch.allclose(weight[VOCAB], rows[:VOCAB].mean(dim=0), atol=1e-7)
    assert torch.equal(weight[VOCAB + 1 :], rows[VOCAB + 1 :])


@pytest.mark.claim("P5")
def test_an_untied_lm_head_grows_too_with_its_own_mean_row(llama_tokenizer, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    old_embeddings = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    report = register_tokens(llama_tokenizer, model, ["<user_name>", "<place>"])
    head, embeddings = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is not embeddings and report["tied_lm_head"] is False and report["added"] == 2
    assert head.shape[0] == embeddings.shape[0] == old_head.shape[0] + 2
    assert torch.equal(head[:-2], old_head) and torch.equal(embeddings[:-2], old_embeddings)
    assert torch.allclose(head[-2:], old_head.mean(dim=0).expand(2, -1), atol=1e-7)
    assert torch.allclose(embeddings[-2:], old_embeddings.mean(dim=0).expand(2, -1), atol=1e-7)


def add_tokens(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["add-tokens", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.claim("P5")
def test_add_tokens_command_saves_a_model_and_tokenizer_that_reload_grown(tmp_path, capsys, tiny_gemma2_dir):
    """Reloaded from the output: <user_name> is one id, the embeddings and the tied head have one more row,
    the new row is the mean of the original rows, the old rows are unchanged; safetensors only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "grown"
    code, stdout, stderr = add_tokens(
        capsys, "--model", str(tiny_gemma2_dir), "--tokens", "<user_name>", "<place>", "--output", str(out)
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    original = AutoModelForCausalLM.from_pretrained(str(tiny_gemma2_dir)).get_input_embeddings().weight.detach()
    assert report["token_ids"] == {"<user_name>": VOCAB, "<place>": VOCAB + 1} and report["output"] == str(out)
    assert tokenizer.convert_tokens_to_ids(["<user_name>", "<place>"]) == [VOCAB, VOCAB + 1]
    assert pieces(tokenizer, "<user_name>") == ["<user_name>"]
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(tokenizer) == VOCAB + 2
    assert model.get_output_embeddings().weight is weight
    assert torch.equal(weight[:VOCAB], original)
    assert torch.allclose(weight[VOCAB:], original.mean(dim=0).expand(2, -1), atol=1e-7)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))


@pytest.mark.parametrize("model_arg,named", [("/no/such/model", "not a local directory"), ("spec", "no config.json")])
def test_add_tokens_refuses_a_missing_model_with_exit_2(tmp_path, capsys, model_arg, named):
    code, _, err = add_tokens(capsys, "--model", model_arg, "--tokens", "<x>", "--output", str(tmp_path / "o"))
    assert code == 2 and named in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("token", ["", " <x>", "<x>\n"])
def test_add_tokens_refuses_an_empty_or_padded_token(tmp_path, capsys, tiny_gemma2_dir, token):
    code, _, err = add_tokens(
        capsys, "--model", str(tiny_gemma2_dir), "--tokens", token, "--output", str(tmp_path / "o")
    )
    assert code == 2 and repr(token) in err and not (tmp_path / "o").exists()


def test_add_tokens_exits_2_through_the_module_entry_point(tmp_path):
    result = run_cli("add-tokens", "--model", "/no/such/model", "--tokens", "<x>", "--output", tmp_path / "o")
    assert result.returncode == 2 and "not a local directory" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- the published shapes (reference/modeling/shapes.py)

PUBLISHED = {  # config.json on each model's hub page
    #               hidden intermediate layers heads kv  head_dim query_pre_attn_scalar vocab
    "gemma-2-2b": (2304, 9216, 26, 8, 4, 256, 256, 256000),
    "gemma-2-9b": (3584, 14336, 42, 16, 8, 256, 256, 256000),
    "gemma-2-27b": (4608, 36864, 46, 32, 16, 128, 144, 256000),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, None, None, 128256),
}
SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "query_pre_attn_scalar",
    "vocab_size",
)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_the_published_shapes_hold_their_config_values(name):
    assert tuple(REAL_SHAPES[name].get(key) for key in SIZE_KEYS) == PUBLISHED[name]
    assert load_config(name) is REAL_SHAPES[name]


def test_published_gemma2_and_llama31_settings():
    """Gemma-2: tied embeddings, soft-capping 50 (attention) and 30 (final), sliding window 4096, bos 2, eos 1,
    pad 0. Llama-3.1-8B: untied head, rope theta 500000 with llama3 scaling (factor 8, 1 / 4, 8192 original)."""
    for name in ("gemma-2-2b", "gemma-2-9b", "gemma-2-27b"):
        c = REAL_SHAPES[name]
        assert (
            c["tie_word_embeddings"],
            c["attn_logit_softcapping"],
            c["final_logit_softcapping"],
            c["sliding_window"],
            c["bos_token_id"],
            c["eos_token_id"],
            c["pad_token_id"],
        ) == (True, 50.0, 30.0, 4096, 2, 1, 0)
    llama = REAL_SHAPES["llama-3.1-8b"]
    assert (llama["tie_word_embeddings"], llama["rope_theta"], llama["bos_token_id"]) == (False, 500000.0, 128000)
    assert llama["rope_scaling"] == {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }


def test_projection_shapes_of_gemma_2_27b_by_hand():
    """q: 4608 -> 32 x 128 = 4096; k, v: 4608 -> 16 x 128 = 2048; o: 4096 -> 4608; gate, up: 4608 -> 36864;
    down: 36864 -> 4608."""
    assert projection_shapes(REAL_SHAPES["gemma-2-27b"]) == {
        "q_proj": (4608, 4096),
        "k_proj": (4608, 2048),
        "v_proj": (4608, 2048),
        "o_proj": (4096, 4608),
        "gate_proj": (4608, 36864),
        "up_proj": (4608, 36864),
        "down_proj": (36864, 4608),
    }


def test_projection_shapes_without_head_dim_divide_the_hidden_size(fixtures_dir):
    """Llama-3.1-8B states no head_dim: 4096 / 32 heads = 128; k, v: 8 x 128 = 1024. A config of hidden 64 with
    4 heads (2 for key/value) and MLP 96: head_dim 16, k, v: 2 x 16 = 32; without num_key_value_heads, 4 x 16."""
    shapes = projection_shapes(REAL_SHAPES["llama-3.1-8b"])
    assert (shapes["q_proj"], shapes["k_proj"], shapes["down_proj"]) == ((4096, 4096), (4096, 1024), (14336, 4096))
    small = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96}
    assert projection_shapes(small) == {
        "q_proj": (64, 64),
        "k_proj": (64, 32),
        "v_proj": (64, 32),
        "o_proj": (64, 64),
        "gate_proj": (64, 96),
        "up_proj": (64, 96),
        "down_proj": (96, 64),
    }
    without_kv = {k: v for k, v in small.items() if k != "num_key_value_heads"}  # no GQA: as many k/v heads as q
    assert projection_shapes(without_kv)["k_proj"] == (64, 64)
    assert load_config(fixtures_dir / "configs" / "tiny-gemma2")["hidden_size"] == 64
