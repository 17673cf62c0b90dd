import warnings

import bitsandbytes as bnb
import pytest
import torch

from rlhf_online import models
from rlhf_online.config import ModelConfig
from tiny_model import build_gemma_like_tokenizer, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return models.load_tokenizer(str(tiny_model_dir))


def _policy(tiny_model_dir, for_training: bool, seed: int = 0):
    """A nf4 base with a LoRA adapter whose lora_B is non-zero (a fresh one would give lora_A zero grads)."""
    base = models.load_base_model(str(tiny_model_dir), "nf4", for_training=for_training)
    torch.manual_seed(seed)
    model = models.attach_lora(base.model, ModelConfig())
    lora = models.lora_parameters(model, models.POLICY_ADAPTER)
    with torch.no_grad():
        for name, p in lora.items():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, lora


def _grads(model, lora, batch) -> dict[str, torch.Tensor | None]:
    model.train()
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes::gemv_4bit "no autograd kernel" warning in the trap case
        model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in lora.items()}
    model.zero_grad(set_to_none=True)
    return grads


def _eval_generate(model, batch):
    model.eval()
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("build, marker", [(build_tokenizer, "<|im_end|>"), (build_gemma_like_tokenizer, "<end_of_turn>")])
def test_chat_helpers_follow_the_tokenizers_own_template(build, marker):
    tokenizer = build()
    chat = [{"role": "user", "content": "What is two plus two?"}]
    marker_id = tokenizer.convert_tokens_to_ids(marker)
    assert models.end_of_turn_text(tokenizer) == marker
    assert models.end_of_turn_id(tokenizer) == marker_id
    assert set(models.end_of_turn_ids(tokenizer)) == {marker_id, tokenizer.eos_token_id}
    prompt = models.chat_ids(tokenizer, chat)
    assert tokenizer.decode(prompt).endswith("\n")  # the generation prompt: the assistant's turn is open
    answer = models.answer_ids(tokenizer, chat, "It is four.")
    assert tokenizer.decode(answer) == "It is four." + marker and answer[-1] == marker_id
    whole = models.chat_ids(tokenizer, chat + [{"role": "assistant", "content": "It is four."}],
                            add_generation_prompt=False)
    assert whole[:len(prompt) + len(answer)] == prompt + answer  # exactly what the template writes, in context


def test_padded_position_ids_start_at_each_rows_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert models.padded_position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_tokenizer_pads_left_with_a_token_distinct_from_eos(tokenizer):
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    batch = tokenizer.pad({"input_ids": [[5, 6, 7], [8]]}, padding=True, return_tensors="pt")
    assert batch["input_ids"][1].tolist() == [tokenizer.pad_token_id] * 2 + [8]
    assert batch["attention_mask"][1].tolist() == [0, 0, 1]


def test_load_base_model_nf4(tiny_model_dir):
    loaded = models.load_base_model(str(tiny_model_dir), "nf4")
    assert loaded.quantization == "nf4"
    linears = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # every projection of both layers
    assert linears[0].weight.quant_state.quant_type == "nf4"
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())


@pytest.mark.parametrize("quantization, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_load_base_model_unquantized(tiny_model_dir, quantization, dtype):
    loaded = models.load_base_model(str(tiny_model_dir), quantization)
    assert loaded.quantization == quantization
    assert loaded.model.model.layers[0].self_attn.q_proj.weight.dtype == dtype


def test_unknown_quantization_is_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown quantization"):
        models.load_base_model(str(tiny_model_dir), "int3")


def test_lora_grads_survive_an_eval_generate_when_loaded_for_training(tiny_model_dir, tokenizer):
    model, lora = _policy(tiny_model_dir, for_training=True)
    batch = tokenizer(["hello how are you today?"], return_tensors="pt").to(model.device)
    before = _grads(model, lora, batch)
    _eval_generate(model, batch)
    after = _grads(model, lora, batch)
    empty = [n for n, g in after.items() if g is None or not g.abs().sum() > 0]
    assert not empty, f"LoRA weights without gradient after an eval generate: {empty}"
    wrong = [n for n in after if not torch.allclose(after[n], before[n], rtol=1e-4, atol=1e-7)]
    assert not wrong, f"gradients changed by an eval generate: {wrong}"


def test_trap_eval_forward_breaks_lora_grads_without_the_workaround(tiny_model_dir, tokenizer):
    """Documents why `for_training=True` (disable_cpu_weight_repacking) exists.

    A serving load repacks its 4-bit weights on the first eval forward into a layout whose kernel has no
    autograd: later backwards skip the base weights (bitsandbytes 0.50.2 only warns), so the LoRA gradients
    of every layer but the last come out silently wrong (or None). If bitsandbytes fixes this, the test
    xfails instead of failing: the workaround is then merely unnecessary.
    """
    model, lora = _policy(tiny_model_dir, for_training=False)
    batch = tokenizer(["hello how are you today?"], return_tensors="pt").to(model.device)
    before = _grads(model, lora, batch)  # train-mode forward: no repacking yet, correct gradients
    _eval_generate(model, batch)
    repacked = any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    after = _grads(model, lora, batch)
    broken = [n for n in after if after[n] is None
              or not torch.allclose(after[n], before[n], rtol=1e-2, atol=1e-6)]
    if not repacked or not broken:
        pytest.xfail(f"bitsandbytes no longer breaks LoRA gradients here (repacked={repacked})")
    assert len(broken) >= len(lora) // 2


def test_disabling_repacking_after_a_forward_is_refused(tiny_model_dir, tokenizer):
    loaded = models.load_base_model(str(tiny_model_dir), "nf4")
    with torch.inference_mode():
        loaded.model(**tokenizer(["hello"], return_tensors="pt").to(loaded.model.device))
    if not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    with pytest.raises(RuntimeError, match="already repacked"):
        models.disable_cpu_weight_repacking(loaded.model)


def test_optimizer_step_changes_only_lora(tiny_model_dir, tokenizer):
    model, lora = _policy(tiny_model_dir, for_training=True)
    base_before = {n: p.detach().clone() for n, p in models.base_parameters(model).items()}
    lora_before = {n: p.detach().clone() for n, p in lora.items()}
    assert all(p.requires_grad for p in lora.values())
    assert not any(p.requires_grad for p in models.base_parameters(model).values())
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    model.train()
    batch = tokenizer(["hello how are you today?"], return_tensors="pt").to(model.device)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    for name, p in models.base_parameters(model).items():
        assert torch.equal(p.detach(), base_before[name]), name
    assert all(not torch.equal(p.detach(), lora_before[n]) for n, p in lora.items())


def test_lora_config_limits_layers():
    cfg = models.lora_config(ModelConfig(lora_r=4), layers=[1])
    assert cfg.r == 4 and cfg.layers_to_transform == [1]
    assert set(cfg.target_modules) == set(ModelConfig().lora_target_modules)


def test_lora_layers_trains_the_top_blocks_only(tiny_model_dir, tokenizer):
    """--lora-layers N: the policy adapter sits in the top N blocks, learns there, and the blocks below it stay
    out of the backward pass (why the option exists: an iteration's backward stops at the lowest adapter)."""
    base = models.load_base_model(str(tiny_model_dir), "nf4", for_training=True).model
    depth = base.config.num_hidden_layers
    model = models.attach_lora(base, ModelConfig(lora_layers=1))
    lora = models.lora_parameters(model, models.POLICY_ADAPTER)
    assert lora and all(f".layers.{depth - 1}." in name for name in lora)
    reached = []
    model.get_base_model().model.layers[0].register_full_backward_hook(lambda *args: reached.append(0))
    model.train()
    batch = tokenizer(["hello how are you today?"], return_tensors="pt").to(model.device)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in lora.items() if "lora_A" in n)
    assert not reached  # nothing below the adapter needed a gradient
    assert models.policy_lora_config(ModelConfig(lora_layers=0), base.config).layers_to_transform is None
    assert models.policy_lora_config(ModelConfig(lora_layers=depth + 5), base.config).layers_to_transform is None


def test_training_copy_on_cpu_runs_eager_attention_with_the_same_logits_and_gradients(tiny_model_dir, tokenizer):
    """The trainer's copy uses eager attention on CPU (its backward is faster there than SDPA's flash kernel,
    bench/ppo_iteration.py); it must compute what the served copy computes, padding included."""
    trained = models.load_base_model(str(tiny_model_dir), "fp32", for_training=True).model
    served = models.load_base_model(str(tiny_model_dir), "fp32", for_training=False).model
    assert trained.config._attn_implementation == "eager"
    assert served.config._attn_implementation != "eager"
    batch = tokenizer(["hello how are you today?", "hi"], return_tensors="pt", padding=True, padding_side="left")
    position_ids = models.padded_position_ids(batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    logits = {}
    for name, model in (("trained", trained), ("served", served)):
        inputs = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        out = model(inputs_embeds=inputs, attention_mask=batch["attention_mask"], position_ids=position_ids).logits
        out[mask].logsumexp(-1).sum().backward()  # a gradient through every attention layer to the inputs
        logits[name] = (out[mask].detach(), inputs.grad[mask])
    torch.testing.assert_close(logits["trained"][0], logits["served"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits["trained"][1], logits["served"][1], atol=1e-4, rtol=1e-4)
