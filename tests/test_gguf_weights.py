"""The llama.cpp engines' base weights re-stored as Q8_0: the same values, the same model, cached, and safe."""

import numpy as np
import pytest
import torch

from rlhf_online import models
from rlhf_online.config import load_config
from rlhf_online.gguf_weights import engine_gguf, served_gguf

gguf = pytest.importorskip("gguf")
xllamacpp = pytest.importorskip("xllamacpp")

SHIPPED = models.embedded_gguf_path()
QUESTIONS = ["How can I sleep better?", "Why is the sky blue?", "What should I pack for a weekend hike?",
             "Give me three tips for a job interview."]


@pytest.fixture(scope="module")
def restored(tmp_path_factory):
    return served_gguf(SHIPPED, "q8_0", tmp_path_factory.mktemp("engine-cache"))


def test_every_q4_1_weight_keeps_its_value_within_a_q8_step(restored):
    """Each weight moves by at most half a Q8_0 step (1/254 of its 32-weight block's largest magnitude) plus the
    fp16 rounding of the block's scale (2^-11 relative): 0.44 %, measured 0.43 %, i.e. 0.054 of a Q4_1 step.
    Every other tensor and all metadata (tokenizer, chat template) are copied as they were."""
    from gguf.quants import dequantize

    before, after = gguf.GGUFReader(SHIPPED), gguf.GGUFReader(restored)
    tensors_after = {t.name: t for t in after.tensors}
    restored_count = 0
    for tensor in before.tensors:
        new = tensors_after.pop(tensor.name)
        if tensor.tensor_type.name != "Q4_1":
            assert new.tensor_type == tensor.tensor_type and np.array_equal(new.data, tensor.data), tensor.name
            continue
        assert new.tensor_type.name == "Q8_0"
        old_values = dequantize(tensor.data, tensor.tensor_type).reshape(-1, 32)
        new_values = dequantize(new.data, new.tensor_type).reshape(-1, 32)
        block_max = np.abs(old_values).max(axis=1, keepdims=True)
        assert (np.abs(new_values - old_values) <= block_max * (0.5 / 127 + 2**-11) + 1e-7).all(), tensor.name
        restored_count += 1
    assert restored_count > 100 and not tensors_after  # the shipped SmolLM2 is Q4_1 nearly throughout
    fields_before = {f.name: f.contents() for f in before.fields.values() if not f.name.startswith("GGUF.")}
    fields_after = {f.name: f.contents() for f in after.fields.values() if not f.name.startswith("GGUF.")}
    assert fields_after == fields_before


def _server(path):
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_parallel, params.n_ctx, params.warmup, params.verbosity = 1, 1024, False, -1
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 2
    server = xllamacpp.Server(params)
    server.handle_completions({"prompt": [0], "n_predict": 1})  # (deleting an unused server can deadlock)
    return server


def test_the_restored_model_samples_what_the_training_copy_would(restored, embedded_source):
    """The served model must stay the policy PPO trains: llama.cpp's log-probabilities of its own samples,
    against PyTorch's of the same tokens under the dequantized weights, as close as for the shipped file.
    Measured: mean |difference| 0.058 nats (shipped: 0.049), per-token KL 0.0026 (shipped: 0.0021)."""
    tokenizer = models.load_tokenizer(embedded_source)
    model = models.load_base_model(embedded_source, "fp32").model.eval()
    gaps = {}
    for name, path in (("shipped", SHIPPED), ("q8_0", restored)):
        server, diffs = _server(path), []
        for seed, question in enumerate(QUESTIONS):
            prompt = models.chat_ids(tokenizer, [{"role": "user", "content": question}])
            reply = server.handle_completions({
                "prompt": prompt, "n_predict": 48, "temperature": 0.8, "top_k": 40, "top_p": 1.0, "min_p": 0.0,
                "repeat_penalty": 1.0, "n_probs": 1, "cache_prompt": False, "seed": 200 + seed})
            content = reply["choices"][0]["logprobs"]["content"]
            tokens = [c["id"] for c in content]
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
            torch_logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
            diffs += (torch.tensor([c["logprob"] for c in content]) - torch_logprobs).tolist()
        del server
        gaps[name] = (float(np.mean(np.abs(diffs))), float(np.mean(diffs)))
    print("mean |dlogprob|, mean dlogprob (~KL) vs the training copy:", gaps)
    assert gaps["q8_0"][0] < 0.1 and abs(gaps["q8_0"][1]) < 0.01, gaps
    assert gaps["q8_0"][0] < 1.5 * gaps["shipped"][0] + 0.01, gaps


def test_the_copy_is_made_once_and_shipped_means_the_file_itself(tmp_path):
    cache = tmp_path / "cache"
    first = served_gguf(SHIPPED, "q8_0", cache)
    written = first.stat().st_mtime_ns
    assert served_gguf(SHIPPED, "q8_0", cache) == first and first.stat().st_mtime_ns == written
    assert served_gguf(SHIPPED, "shipped", cache) == SHIPPED
    cfg = load_config(["--engine-weights", "shipped"], environ={})
    assert engine_gguf(cfg) == SHIPPED
    with pytest.raises(ValueError, match="--engine-weights 'q4'"):
        served_gguf(SHIPPED, "q4", cache)


def test_a_corrupt_gguf_fails_clearly_and_leaves_no_half_file(tmp_path):
    broken = tmp_path / "broken.Q4_1.gguf"
    broken.write_bytes(SHIPPED.read_bytes()[:4_000_000])  # a download cut short
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="could not re-store .*broken"):
        served_gguf(broken, "q8_0", cache)
    assert not cache.exists() or not any(cache.iterdir())
