"""PEFT LoRA -> llama.cpp GGUF adapter: the rotary permutation, the file, and equivalence on the real model.

The equivalence test is the one that can hold between two runtimes with different arithmetic: PyTorch runs the
dequantized Q4_1 weights in fp32, llama.cpp the Q4_1 weights themselves (with 8-bit activations), so their
base log-probabilities already differ by ~0.08 nats per token. What must agree is the adapter: per-token
log-probabilities of the same tokens with the adapter, and the adapter's effect (with minus without).
"""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rlhf_online import models
from rlhf_online.adapters import AdapterRegistry, save_peft_adapter
from rlhf_online.config import ModelConfig, SamplingConfig
from rlhf_online.gguf_adapter import (GGUF_ADAPTER_FILE, AdapterConversionError, BaseShape, convert_peft_folder,
                                      gguf_lora_tensors, rotary_permute)

xllamacpp = pytest.importorskip("xllamacpp")

# Stated tolerances (nats per token); in brackets what was measured over 4 runs (different samples and adapters;
# embedded model, lora_B ~ N(0, 0.1), adapter effect 0.5-0.8 nats/token), right adapter / mis-permuted one:
ADAPTED_MEAN_ABS = 0.15   # |log p_torch - log p_llama| with the adapter, mean over tokens [0.06-0.07 / 0.27-0.33]
EFFECT_CORR = 0.95        # correlation of the adapter's per-token effect [0.98-0.997 / 0.82-0.93]
EFFECT_REL_ERR = 0.25     # mean |effect_torch - effect_llama| / mean |effect_torch| [0.08-0.19 / 0.38-0.62]


def test_rotary_permutation_is_the_one_llama_cpp_stores_q_and_k_with(embedded_source):
    """transformers un-permutes q/k when it reads a GGUF; permuting its q/k rows back must give the GGUF's."""
    import gguf

    reader = gguf.GGUFReader(str(models.embedded_gguf_path()))
    stored = {t.name: t for t in reader.tensors if t.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight")}
    shape = BaseShape.from_gguf(models.embedded_gguf_path())
    with safe_open(f"{embedded_source}/model.safetensors", framework="pt") as f:
        for module, name, heads in (("q_proj", "blk.0.attn_q.weight", shape.n_head),
                                    ("k_proj", "blk.0.attn_k.weight", shape.n_head_kv)):
            hf = f.get_tensor(f"model.layers.0.self_attn.{module}.weight")
            raw = gguf.quants.dequantize(stored[name].data, stored[name].tensor_type)
            gguf_rows = torch.from_numpy(np.asarray(raw, dtype=np.float32).reshape(hf.shape))
            assert torch.allclose(rotary_permute(hf, heads), gguf_rows, atol=1e-5)
            assert not torch.allclose(hf, gguf_rows, atol=1e-3)  # the permutation is not the identity


def test_tensor_names_shapes_and_which_side_is_permuted():
    shape = BaseShape("llama", n_head=4, n_head_kv=2)
    r, hidden, kv = 2, 16, 8
    weights = {
        "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight": torch.randn(r, hidden),
        "base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight": torch.randn(hidden, r),
        "base_model.model.model.layers.3.self_attn.k_proj.lora_B.weight": torch.randn(kv, r),
        "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight": torch.randn(kv, r),
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": torch.randn(r, 32),
    }
    out = gguf_lora_tensors(weights, shape)
    assert set(out) == {"blk.3.attn_q.weight.lora_a", "blk.3.attn_q.weight.lora_b", "blk.3.attn_k.weight.lora_b",
                        "blk.3.attn_v.weight.lora_b", "blk.0.ffn_down.weight.lora_a"}
    q_a = weights["base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"]
    q_b = weights["base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"]
    k_b = weights["base_model.model.model.layers.3.self_attn.k_proj.lora_B.weight"]
    v_b = weights["base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"]
    assert np.array_equal(out["blk.3.attn_q.weight.lora_a"], q_a.numpy())  # input side untouched
    assert np.array_equal(out["blk.3.attn_q.weight.lora_b"], rotary_permute(q_b, 4).numpy())
    assert np.array_equal(out["blk.3.attn_k.weight.lora_b"], rotary_permute(k_b, 2).numpy())
    assert np.array_equal(out["blk.3.attn_v.weight.lora_b"], v_b.numpy())  # no rotary on v
    with pytest.raises(AdapterConversionError, match="unsupported"):
        gguf_lora_tensors({"model.lm_head.weight": torch.zeros(2, 2)}, shape)


def test_rslora_is_refused_not_silently_mis_scaled(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 32, "use_rslora": True}))
    with pytest.raises(AdapterConversionError, match="rsLoRA"):
        convert_peft_folder(tmp_path, BaseShape("llama", 4, 2))


# ---- equivalence on the real embedded model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def published(embedded_source, tmp_path_factory):
    """A version with a clearly non-zero random LoRA on every attention projection, published as the trainer
    publishes (so the GGUF beside the PEFT folder is the one under test), plus the fp32 PyTorch model."""
    base = models.load_base_model(embedded_source, "fp32").model
    torch.manual_seed(0)  # lora_A's initialisation: the same adapter (and margins) every run
    model = models.attach_lora(base, ModelConfig())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.eval()
    registry = AdapterRegistry(tmp_path_factory.mktemp("gguf") / "adapters")
    info = registry.publish(lambda folder: save_peft_adapter(model, models.POLICY_ADAPTER, folder), {})
    return model, info


@pytest.fixture(scope="module")
def engine(embedded_source):
    from rlhf_online.llamacpp_engine import LlamaCppEngine

    engine = LlamaCppEngine(models.embedded_gguf_path(), models.load_tokenizer(embedded_source),
                            SamplingConfig(), slots=2, ctx_per_slot=512)
    yield engine
    engine.close()


def _torch_logprobs(model, ids: list[int], start: int, adapter: bool) -> np.ndarray:
    with torch.no_grad(), (model.disable_adapter() if not adapter else torch.enable_grad()):
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return np.array([logprobs[start - 1 + i, token].item() for i, token in enumerate(ids[start:])])


def _agreement(engine, model, info, gguf_path) -> dict:
    """Teacher-forced log-probs of one sampled answer, with and without the adapter, in both runtimes."""
    state = engine._new_state([(info.name, gguf_path)])
    engine.states.switch_to(state)
    prompt = engine.build_prompt([{"role": "user", "content": "What is basil used for in cooking?"}]).input_ids
    torch.manual_seed(0)
    with torch.no_grad():
        sampled = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=True, top_k=None, top_p=1.0,
                                 temperature=1.0)[0].tolist()
    answer = sampled[len(prompt):]
    torch_with = _torch_logprobs(model, sampled, len(prompt), adapter=True)
    torch_without = _torch_logprobs(model, sampled, len(prompt), adapter=False)
    # one slot per adapter setting (a fresh server each time), so llama.cpp's prompt cache can be used
    llama_with = np.array(engine.token_logprobs(prompt, answer, info.name, slot=0), dtype=float)
    llama_without = np.array(engine.token_logprobs(prompt, answer, "base", slot=1), dtype=float)
    found = ~np.isnan(llama_with) & ~np.isnan(llama_without)
    assert found.mean() >= 0.9  # the forced tokens are among llama.cpp's top 400 almost always
    effect_torch = (torch_with - torch_without)[found]
    effect_llama = (llama_with - llama_without)[found]
    return {"adapted_mean_abs": float(np.abs(torch_with - llama_with)[found].mean()),
            "effect_corr": float(np.corrcoef(effect_torch, effect_llama)[0, 1]),
            "effect_rel_err": float(np.abs(effect_torch - effect_llama).mean() / np.abs(effect_torch).mean()),
            "effect_mean_abs": float(np.abs(effect_torch).mean())}


def test_published_gguf_adapter_matches_pytorch_token_by_token(published, engine):
    model, info = published
    gguf_path = info.path / GGUF_ADAPTER_FILE
    assert gguf_path.is_file()  # publishing wrote it beside the canonical PEFT files
    result = _agreement(engine, model, info, gguf_path)
    print("permuted adapter:", result)
    assert result["effect_mean_abs"] > 0.3  # the adapter really changes the answer's probabilities
    assert result["adapted_mean_abs"] < ADAPTED_MEAN_ABS, result
    assert result["effect_corr"] > EFFECT_CORR, result
    assert result["effect_rel_err"] < EFFECT_REL_ERR, result


def test_a_mis_permuted_adapter_fails_the_same_check(published, engine, tmp_path):
    model, info = published
    wrong = convert_peft_folder(info.path, BaseShape.from_gguf(models.embedded_gguf_path()),
                                out_path=tmp_path / "unpermuted.gguf", permute_rotary=False)
    result = _agreement(engine, model, info, wrong)
    print("mis-permuted adapter:", result)
    assert result["effect_corr"] < EFFECT_CORR or result["effect_rel_err"] > EFFECT_REL_ERR, result
    assert result["effect_rel_err"] > EFFECT_REL_ERR, result
