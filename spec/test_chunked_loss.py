"""The LM-head loss a chunk of tokens at a time (reference/methods/chunked_loss.py): the same loss and gradients as the
full logits, to fp32 rounding, for less memory.

Expected values come from transformers: its `ForCausalLMLoss` on the full logits, the models' own forward with
labels (tiny Gemma-2 with its final-logit soft cap, tiny Llama without one), a `Trainer` run on the models'
own loss. "fp32 rounding" is `torch.testing.assert_close`'s float32 tolerance (rtol 1.3e-6, atol 1e-5): the
chunked loss sums the tokens in another order and works the gradients out by their formulas rather than through
autograd, nothing else differs (under bf16 autocast: bf16 rounding, see that test). Peak memory is counted by
torch's `MemTracker` (a dispatch mode that adds up the bytes of the live tensors, forward and backward).
"""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from reference.methods.chunked_loss import chunked_cross_entropy, next_token_labels, use_chunked_loss

IGNORED = -100
CAP = 30.0  # Gemma-2's final_logit_softcapping


def inputs(rows=3, length=11, hidden=16, vocab=300, scale=4.0, seed=0):
    """Hidden states, an LM head and labels (prompt and padding at -100) whose logits reach past the cap."""
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, length, hidden, generator=generator, requires_grad=True)
    weight = (scale * torch.randn(vocab, hidden, generator=generator)).requires_grad_()
    labels = torch.randint(0, vocab, (rows, length), generator=generator)
    labels[0, :4] = IGNORED  # a prompt
    labels[1, -3:] = IGNORED  # padding
    return states, weight, labels


def full_loss(states, weight, labels, cap, num_items_in_batch=None):
    """Gemma-2's forward tail (logits, then cap · tanh(logits / cap)) and transformers' own causal-LM loss."""
    logits = states @ weight.T
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return ForCausalLMLoss(logits, labels, weight.shape[0], num_items_in_batch=num_items_in_batch)


@pytest.mark.claim("P3")
@pytest.mark.parametrize("cap", [CAP, None], ids=["gemma2-softcap", "no-softcap"])
@pytest.mark.parametrize("num_items_in_batch", [None, 40], ids=["mean", "num-items"])
def test_the_chunked_loss_and_its_gradients_equal_transformers_loss_on_the_full_logits(cap, num_items_in_batch):
    """33 tokens in chunks of 7 (the last one short); logits up to ~60, so the cap of 30 bends them hard.
    With `num_items_in_batch` the sum is divided by it (here 40, as a Trainer counting the accumulated batch
    would pass), else by the counted tokens. The gradients are those of 3 x the loss: a loss scaled (by gradient
    accumulation, by a loss scaler) scales its gradients."""
    states, weight, labels = inputs()
    expected = full_loss(states, weight, labels, cap, num_items_in_batch)
    expected_grads = torch.autograd.grad(3 * expected, (states, weight))
    assert (states @ weight.T).abs().max() > 2 * CAP

    loss = chunked_cross_entropy(states, weight, next_token_labels(labels), cap, num_items_in_batch, chunk_size=7)
    grads = torch.autograd.grad(3 * loss, (states, weight))

    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads, expected_grads)


@pytest.mark.claim("P1")
def test_each_token_is_scored_against_the_next_tokens_label_and_a_rows_last_token_against_none():
    """[[5, 6, 7], [8, -100, 9]] -> [[6, 7, -100], [-100, 9, -100]], as ForCausalLMLoss shifts them."""
    labels = torch.tensor([[5, 6, 7], [8, IGNORED, 9]])
    assert next_token_labels(labels).tolist() == [[6, 7, IGNORED], [IGNORED, 9, IGNORED]]


def peak_bytes(step) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    with tracker:
        step()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_the_chunked_loss_never_holds_the_full_logits_forward_or_backward():
    """4 x 128 = 512 tokens, vocabulary 20,000: the fp32 logits are 512 x 20,000 x 4 = 41 MB. The full computation
    keeps the logits, their tanh and their log-softmax for the backward (> 2 x 41 MB at its peak). In chunks of 64
    tokens (5.1 MB of logits each) at most three chunk-sized buffers are live at once: the peak, inputs and
    gradients (2.6 MB of head, 66 kB of hidden states, their gradients) included, stays under 3.5 chunks' worth
    of logits beside them."""
    states, weight, labels = inputs(rows=4, length=128, hidden=32, vocab=20_000)
    logits_bytes, chunk_bytes = 512 * 20_000 * 4, 64 * 20_000 * 4
    input_bytes = 2 * (states.numel() + weight.numel()) * 4  # the inputs and a gradient of each
    shifted = next_token_labels(labels)

    full = peak_bytes(lambda: full_loss(states, weight, labels, CAP).backward())
    chunked = peak_bytes(lambda: chunked_cross_entropy(states, weight, shifted, CAP, chunk_size=64).backward())

    assert full > 2 * logits_bytes
    assert chunked < 3.5 * chunk_bytes + input_bytes < logits_bytes


def causal_lm(directory, lora: bool):
    """The fixture model in fp32, eager attention, in training mode; with `lora`, a peft LoRA with random A and B
    (peft's `init_lora_weights=False`) on the attention projections, so every LoRA weight has a gradient."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(directory), attn_implementation="eager")
    if lora:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(model, config)
    return model.train()


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    output = model(**batch)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return output, grads


def model_batch(vocab: int) -> dict:
    """Two rows of 12 tokens: a 4-token prompt (-100) in one, 3 tokens of padding (masked, -100) in the other."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    labels = input_ids.clone()
    labels[0, :4] = IGNORED
    labels[1, -3:] = IGNORED
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.claim("P3")
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "every-weight"])
@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-llama"])
def test_a_model_trained_on_the_chunked_loss_gets_its_own_loss_and_every_gradient(fixtures_dir, name, lora):
    """The model's own forward (full logits, Gemma-2's soft cap from its config, ForCausalLMLoss) against the
    same model with `use_chunked_loss` (chunks of 5 tokens): the loss, and the gradient of every trainable
    weight (the LoRA A and B; or every weight, the tied embedding / LM head included), to fp32 rounding. The
    chunked forward returns no logits at all."""
    directory = fixtures_dir / "models" / name
    model = causal_lm(directory, lora)
    batch = model_batch(model.config.vocab_size)
    expected, expected_grads = loss_and_grads(model, batch)

    use_chunked_loss(model, chunk_size=5)
    output, grads = loss_and_grads(model, batch)

    assert output.logits is None and expected.logits is not None
    torch.testing.assert_close(output.loss, expected.loss)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    torch.testing.assert_close(grads, expected_grads)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "every-weight"])
def test_under_bf16_autocast_as_the_recipes_train_the_chunked_loss_gets_the_models_loss_to_bf16_rounding(
    fixtures_dir, lora
):
    """Under autocast the LM head runs in bf16 (8 significant bits, 2^-8 = 0.4% a rounding). The full computation
    rounds the logits' gradient to bf16 at each step back through the cap; the chunked loss works it out in fp32
    and rounds it once. So: the loss (fp32, from the same bf16 logits) to 1e-5, each gradient to 4% of its
    tensor's largest entry."""
    model = causal_lm(fixtures_dir / "models" / "tiny-gemma2", lora)
    batch = model_batch(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = loss_and_grads(model, batch)
        use_chunked_loss(model, chunk_size=5)
        output, grads = loss_and_grads(model, batch)

    torch.testing.assert_close(output.loss, expected.loss, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=0.04 * expected_grads[name].abs().max())


def test_tiny_gemma2_soft_caps_its_logits_at_30_and_tiny_llama_does_not(fixtures_dir):
    from transformers import AutoConfig

    gemma2, llama = (
        AutoConfig.from_pretrained(str(fixtures_dir / "models" / name)) for name in ("tiny-gemma2", "tiny-llama")
    )
    assert gemma2.final_logit_softcapping == CAP
    assert getattr(llama, "final_logit_softcapping", None) is None


def test_the_chunked_loss_applies_the_models_soft_cap(fixtures_dir):
    """The tiny model's logits stay under 1, where a cap of 30 is nearly the identity (tanh(x/30)·30 ≈ x); with
    its config's cap set to 0.5 both forwards bend them hard, and a chunked loss without the cap would differ."""
    model = causal_lm(fixtures_dir / "models" / "tiny-gemma2", lora=False)
    model.config.final_logit_softcapping = 0.5
    batch = model_batch(model.config.vocab_size)
    expected, expected_grads = loss_and_grads(model, batch)

    use_chunked_loss(model, chunk_size=5)
    output, grads = loss_and_grads(model, batch)

    torch.testing.assert_close(output.loss, expected.loss)
    torch.testing.assert_close(grads, expected_grads)


def test_outside_training_the_model_keeps_its_own_forward_and_generates_the_same_tokens(fixtures_dir):
    """Evaluation and generation need the logits: in eval mode (or without labels) the forward is the model's."""
    model = causal_lm(fixtures_dir / "models" / "tiny-gemma2", lora=True).eval()
    prompt = torch.tensor([[2, 17, 240, 31]])
    expected = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)

    use_chunked_loss(model)
    generated = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)

    assert torch.equal(generated, expected)
    assert model(**model_batch(model.config.vocab_size)).logits is not None


def sft_records(vocab: int) -> list[dict]:
    """Eight records of 10 to 16 tokens, padded to 16 (mask 0, label -100), with a 3-token prompt (-100)."""
    generator = torch.Generator().manual_seed(2)
    records = []
    for i in range(8):
        length = 10 + (i * 5) % 7
        ids = torch.randint(3, vocab, (16,), generator=generator)
        mask = (torch.arange(16) < length).long()
        labels = torch.where(mask.bool(), ids, IGNORED)
        labels[:3] = IGNORED
        records.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return records


def trainer_run(directory, chunked: bool, output_dir) -> tuple[list[float], dict, dict]:
    """Four optimizer steps of batch 2 x accumulation 2 (the Trainer passes `num_items_in_batch`), gradient
    checkpointing on as in the recipes, LoRA as above."""
    from transformers import Trainer, TrainingArguments

    model = causal_lm(directory, lora=True)
    if chunked:
        use_chunked_loss(model, chunk_size=8)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        learning_rate=5e-3,
        activation_checkpointing=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=sft_records(model.config.vocab_size))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    return losses, before, after


@pytest.fixture(scope="module")
def two_trainer_runs(fixtures_dir, tmp_path_factory):
    """The same Trainer run on the model's own loss (False) and on the chunked loss (True)."""
    tiny = fixtures_dir / "models" / "tiny-gemma2"
    return {chunked: trainer_run(tiny, chunked, tmp_path_factory.mktemp("run")) for chunked in (False, True)}


@pytest.mark.slow
@pytest.mark.claim("P3")
def test_a_trainer_on_the_chunked_loss_logs_the_per_step_losses_of_the_models_own_loss(two_trainer_runs):
    """tiny Gemma-2 with its cap of 30, the real Trainer (AdamW, accumulation 2): the same four per-step losses
    (to fp32 rounding, after four updates: rtol 1e-5)."""
    own, _, _ = two_trainer_runs[False]
    chunked, _, _ = two_trainer_runs[True]
    assert len(own) == len(chunked) == 4
    torch.testing.assert_close(chunked, own, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_training_on_the_chunked_loss_lowers_the_loss_and_moves_only_the_lora_weights(two_trainer_runs):
    losses, before, after = two_trainer_runs[True]
    assert losses[-1] < losses[0]
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    lora = {name for name in before if "lora_" in name}
    assert changed == lora and lora


def recipe_run(directory, data, output, chunked: bool):
    """reference.methods.train.run on llm2024 cut to spec/observe.py's SHORT, in fp32 (no bf16 rounding between the
    two),
    as the recipe says or with `sft.chunked_loss=false`; (manifest, whether each training forward gave logits)."""
    from reference.methods import train
    from reference.settings.recipes import apply_overrides, load_recipe
    from spec.observe import QA_COLUMNS, SHORT, WhenBuilt

    fp32 = ["bf16=false", "quantization.bnb_4bit_compute_dtype=float32"]
    recipe = apply_overrides(load_recipe("llm2024"), [*SHORT, *fp32, f"sft.chunked_loss={str(chunked).lower()}"])
    gave_logits = []

    def hook(module, args, kwargs, output):
        if module.training:
            gave_logits.append(output.logits is not None)

    watch = WhenBuilt(lambda model: model.register_forward_hook(hook, with_kwargs=True))
    manifest = train.run(
        recipe, str(directory), str(data), str(output), QA_COLUMNS, lambda line: None, callbacks=[watch]
    )
    return manifest, gave_logits


@pytest.mark.slow
@pytest.mark.claim("P3")
def test_the_recipes_train_on_the_chunked_loss_to_the_per_step_losses_of_the_models_own(fixtures_dir, tmp_path):
    """llm2024 says `chunked_loss = true`: its training forwards return no logits (none were made) and the
    manifest names the chunked loss; with `sft.chunked_loss=false` every training forward makes the full logits.
    The per-step losses are the same to fp32 rounding (NF4 base, NEFTune, padding-free rows: rtol 1e-5)."""
    tiny, data = fixtures_dir / "models" / "tiny-gemma2", fixtures_dir / "data" / "qa111_sample.jsonl"
    chunked, chunked_logits = recipe_run(tiny, data, tmp_path / "chunked", chunked=True)
    own, own_logits = recipe_run(tiny, data, tmp_path / "own", chunked=False)

    assert chunked_logits and not any(chunked_logits) and own_logits and all(own_logits)
    assert chunked.loss.startswith("chunked, 256 tokens") and own.loss == "the model's own (full logits)"
    losses = [[step["loss"] for step in run.steps] for run in (chunked, own)]
    assert len(losses[0]) == 4
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_on_cuda_liger_kernels_fused_linear_cross_entropy_gives_the_models_own_loss_and_gradients(fixtures_dir):
    """On CUDA with liger-kernel installed, `use_chunked_loss` goes through liger's fused kernel (its own fp32
    accumulation order, so a looser tolerance than fp32 rounding: rtol 1e-4)."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (`tox -e gpu` installs it)")
    from reference.methods.chunked_loss import liger_runs_here

    model = causal_lm(fixtures_dir / "models" / "tiny-gemma2", lora=True).to("cuda")
    batch = {key: value.cuda() for key, value in model_batch(model.config.vocab_size).items()}
    expected, expected_grads = loss_and_grads(model, batch)

    use_chunked_loss(model)
    output, grads = loss_and_grads(model, batch)

    assert liger_runs_here(torch.zeros(1, device="cuda")) and output.logits is None
    torch.testing.assert_close(output.loss, expected.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads, expected_grads, rtol=1e-4, atol=1e-5)
