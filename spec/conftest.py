"""The spec harness: claim/gpu/slow markers, the tiny fixtures, and one shared Trainer-free setup.

Markers are registered in pyproject.toml. `gpu` tests are skipped with a visible reason when CUDA is
absent (never silently passed); `claim("ID", ...)` names the SPEC.md claims a test pins, and
`python spec/claims.py` writes the index of claims to tests (spec/CLAIMS.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine (run `tox -e gpu` on the GPU machine)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def gemma_tokenizer():
    """The fixture tokenizer with Gemma-2 special tokens and no chat_template (as seed 001's 4-bit copy)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizer"))


@pytest.fixture
def llama_tokenizer():
    """The same vocabulary as Llama-3.1-instruct: <|begin_of_text|>, <|eot_id|>, the official template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizer-llama3"))


@pytest.fixture(scope="session")
def tiny_gemma2_dir() -> Path:
    """Session-wide, so module-scoped fixtures (a shared training run) can take it too."""
    return FIXTURES / "models" / "tiny-gemma2"


@pytest.fixture
def tiny_llama_dir() -> Path:
    return FIXTURES / "models" / "tiny-llama"


@pytest.fixture
def tiny_gemma2(tiny_gemma2_dir):
    """The tiny Gemma-2 (hidden 64, 2 layers) with its committed random weights, fp32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_gemma2_dir))


@pytest.fixture(scope="session", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def sft_device(request) -> str:
    """Where the shared SFT runs train: the CPU always, and the GPU again when CUDA is present."""
    return request.param


@pytest.fixture(scope="session")
def sft_runs(sft_device, tmp_path_factory):
    """sft_runs(base) -> the cut llm2024 run on that base (nf4, int8, bf16 or full), made once per session and
    device and shared by every test file that reads it (spec/sft_runs.py)."""
    from spec.sft_runs import Runs

    return Runs(sft_device, tmp_path_factory)


@pytest.fixture(scope="session")
def qa_data() -> Path:
    """24 question/answer records in columns `input` and `output` (--columns instruction=input,response=output)."""
    return FIXTURES / "data" / "qa111_sample.jsonl"


@pytest.fixture(scope="session")
def magpie_data() -> Path:
    """80 magpie records (a `conversations` list each), which train reads without a column map."""
    return FIXTURES / "data" / "magpie_sample.jsonl"


@pytest.fixture(scope="session")
def uninterrupted(tiny_gemma2_dir, qa_data, tmp_path_factory):
    """The llm2024 recipe cut to six steps on the QA fixture (spec/adapters.py's SIX_STEPS), never stopped. Its
    checkpoint-3 is the saved adapter that spec/test_continuation.py continues and spec/test_merge.py merges;
    spec/test_resume.py's killed run must end at its weights. Made once for the three files."""
    from types import SimpleNamespace

    from reference.settings.recipes import apply_overrides, load_recipe
    from spec.adapters import SIX_STEPS
    from spec.observe import Observed, run_recipe

    output = tmp_path_factory.mktemp("uninterrupted")
    recipe = apply_overrides(load_recipe("llm2024"), SIX_STEPS)
    record = run_recipe(recipe, tiny_gemma2_dir, qa_data, output, Observed())
    return SimpleNamespace(output=output, record=record, checkpoint=output / "checkpoints" / "checkpoint-3")


@pytest.fixture(scope="session")
def saved_adapter(tiny_gemma2_dir, tmp_path_factory) -> Path:
    """The llm2024 recipe's adapter on tiny-gemma2, saved as a checkpoint holds it, with B drawn at random
    (seeded) instead of trained: not zero, as training leaves it, so merging it changes the base."""
    import torch

    from reference.modeling import lora, models
    from reference.settings.recipes import load_recipe

    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    adapter = lora.attach(base, load_recipe("llm2024").lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, weight in adapter.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.02)
    directory = tmp_path_factory.mktemp("adapter") / "adapter"
    adapter.save_pretrained(directory)
    return directory
