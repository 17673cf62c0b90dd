import json
import threading
import time

import pytest
import torch

from rlhf_online import models
from rlhf_online.config import ModelConfig, SamplingConfig
from rlhf_online.generation import Generator, StreamUpdate, at_most_every, merge_row_streams
from rlhf_online.versions import BASE_VERSION

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return models.load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def serving_base(tiny_model_dir):
    return models.load_base_model(str(tiny_model_dir), "nf4").model


def make_generator(model, tokenizer, **sampling) -> Generator:
    return Generator(model, tokenizer, SamplingConfig(**{"temperature": 1.0, "top_p": 1.0, **sampling}))


def conversation(turns: int) -> list[dict]:
    messages = [SYSTEM]
    for i in range(turns):
        messages.append({"role": "user", "content": f"question {i}: why is the sky blue?"})
        messages.append({"role": "assistant", "content": f"answer {i}: Rayleigh scattering."})
    messages.append({"role": "user", "content": "and the capital of France?"})
    return messages


def slow_down(model, seconds: float):
    """Make every forward (one per generated token) take at least `seconds`."""
    return model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))


def test_prompt_that_fits_is_not_truncated(serving_base, tokenizer):
    generator = make_generator(serving_base, tokenizer)
    messages = conversation(2)
    prompt = generator.build_prompt(messages, budget=1000)
    assert not prompt.truncated
    assert prompt.messages == messages
    assert prompt.input_ids == models.chat_ids(tokenizer, messages)
    assert tokenizer.decode(prompt.input_ids).endswith("<|im_start|>assistant\n")


def test_truncation_drops_oldest_turns_and_keeps_system(serving_base, tokenizer):
    generator = make_generator(serving_base, tokenizer)
    messages = conversation(6)
    full = len(models.chat_ids(tokenizer, messages))
    budget = full // 2
    prompt = generator.build_prompt(messages, budget=budget)
    assert prompt.truncated
    assert len(prompt.input_ids) <= budget
    assert prompt.messages[0] == SYSTEM
    kept = prompt.messages[1:]
    assert 1 <= len(kept) < len(messages) - 1
    assert kept == messages[len(messages) - len(kept):]  # a suffix: the oldest turns went first
    assert prompt.input_ids == models.chat_ids(tokenizer, prompt.messages)
    # the default budget comes from the sampling config
    small = make_generator(serving_base, tokenizer, context_tokens=budget)
    assert small.build_prompt(messages) == prompt


@pytest.mark.parametrize("with_system", [True, False])
def test_single_huge_message_is_cut_not_crashing(serving_base, tokenizer, with_system):
    generator = make_generator(serving_base, tokenizer)
    huge = {"role": "user", "content": "hello how are you today? " * 2000 + "What is the capital of France?"}
    messages = [SYSTEM, huge] if with_system else [huge]
    prompt = generator.build_prompt(messages, budget=64)
    assert prompt.truncated
    assert 0 < len(prompt.input_ids) <= 64
    assert prompt.messages[-1]["content"].endswith("capital of France?")  # the end, where the question is
    # a system message alone beyond the budget still gives a prompt
    long_system = {"role": "system", "content": "be nice " * 500}
    assert len(generator.build_prompt([long_system, {"role": "user", "content": "hi"}], budget=32).input_ids) <= 32


def test_stream_yields_growing_texts_and_ends_finished(serving_base, tokenizer):
    generator = make_generator(serving_base, tokenizer, max_new_tokens=12)
    prompt = generator.build_prompt(conversation(0))
    torch.manual_seed(0)
    updates = list(generator.stream_pair(prompt, (BASE_VERSION, BASE_VERSION)))
    assert all(isinstance(u, StreamUpdate) and len(u.texts) == 2 for u in updates)
    assert 2 <= len(updates) <= 12 + 1
    for earlier, later in zip(updates, updates[1:]):
        for row in range(2):
            assert len(later.texts[row].strip()) >= len(earlier.texts[row].strip()) or earlier.finished[row]
    assert updates[-1].finished == (True, True)
    assert any(updates[-1].texts)
    assert not generator.lock.locked()
    torch.manual_seed(1)  # the lock was released: a next call runs, and `sample` is the stream's final text
    sampled = generator.sample([prompt.input_ids], [BASE_VERSION], max_new_tokens=3)
    torch.manual_seed(1)
    streamed = list(generator.stream([prompt.input_ids], [BASE_VERSION], max_new_tokens=3))
    assert len(sampled) == 1 and sampled == list(streamed[-1].texts) and len(streamed) <= 3 + 1


def test_plain_model_refuses_adapter_versions(serving_base, tokenizer):
    generator = make_generator(serving_base, tokenizer)
    with pytest.raises(KeyError):
        list(generator.stream([[1, 2, 3]], ["v0001"]))


def test_rows_use_their_own_adapter(serving_base, tokenizer):
    torch.manual_seed(0)
    model = models.attach_lora(serving_base, ModelConfig(), adapter_name="v0001")
    with torch.no_grad():
        for name, p in models.lora_parameters(model, "v0001").items():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    generator = make_generator(model, tokenizer, temperature=0.0, max_new_tokens=16)
    prompt = generator.build_prompt(conversation(1))
    texts = generator.sample([prompt.input_ids] * 4, ["v0001", BASE_VERSION, BASE_VERSION, "v0001"])
    assert texts[0], "the adapter row should produce text"
    assert texts[0] == texts[3]
    assert texts[1] == texts[2]
    assert texts[0] != texts[1]


def test_abandoned_stream_releases_the_model_quickly(serving_base, tokenizer):
    generator = make_generator(serving_base, tokenizer, max_new_tokens=200)
    slow_down(generator.model, 0.02)  # 200 tokens would hold the model for 4 s or more
    prompt = generator.build_prompt(conversation(0))
    stream = generator.stream_pair(prompt, (BASE_VERSION, BASE_VERSION))
    next(stream), next(stream)
    assert generator.lock.locked()
    started = time.perf_counter()
    stream.close()
    assert generator.lock.acquire(timeout=2.0), "an abandoned stream kept the model"
    generator.lock.release()
    assert time.perf_counter() - started < 1.0
    for thread in threading.enumerate():
        if thread.name == "generate":
            thread.join(timeout=1.0)
            assert not thread.is_alive()


def test_generation_error_surfaces_in_the_consumer(serving_base, tokenizer):
    generator = make_generator(serving_base, tokenizer)

    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")

    generator.model.generate = boom
    with pytest.raises(RuntimeError, match="kaboom"):
        list(generator.stream([[1, 2, 3]], [BASE_VERSION]))
    assert not generator.lock.locked()


def test_repetition_penalty_applies_to_the_answer_only():
    import torch as _torch

    from rlhf_online.generation import answer_repetition_penalty

    assert len(answer_repetition_penalty(1.0, 5)) == 0  # 1 = off: no processor at all
    (penalty,) = answer_repetition_penalty(2.0, 3)
    ids = _torch.tensor([[1, 2, 3, 4, 4]])  # a 3-token prompt, then the answer so far: token 4 twice
    scores = _torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, -1.0]])
    out = penalty(ids, scores.clone())
    assert out[0, 4] == 0.5  # a token the answer used: its logit divided by the penalty
    assert out[0, 1] == out[0, 2] == out[0, 3] == 1.0  # the question's tokens stay free to use
    assert out[0, 5] == -1.0 and out[0, 0] == 1.0


def test_a_pair_runs_inside_the_engines_gpu_call(serving_base, tokenizer):
    """ZeroGPU lends a GPU per decorated call: the engine wraps its own pair call (nothing patches it from outside)."""
    calls = []

    def gpu_call(fn):
        def lent(prompt, versions, max_new_tokens=None):
            calls.append(versions)
            yield from fn(prompt, versions, max_new_tokens)
        return lent

    generator = Generator(serving_base, tokenizer, SamplingConfig(max_new_tokens=4), gpu_call=gpu_call)
    prompt = generator.build_prompt(conversation(0))
    updates = list(generator.stream_pair(prompt, (BASE_VERSION, BASE_VERSION)))
    assert calls == [(BASE_VERSION, BASE_VERSION)] and updates[-1].finished == (True, True)
    assert generator.sample([prompt.input_ids], [BASE_VERSION]) and len(calls) == 1  # only pairs are lent a GPU


def test_merged_row_streams_interleave_rows_surface_errors_and_stop_rows_on_close():
    def chunk(text, finish=None):
        return {"choices": [{"text": text, "finish_reason": finish}]}

    def two_rows(row, emit, stop):
        for piece in (["Hel", "lo"], [" Bye", "!", "!"])[row]:
            emit(chunk(piece))
        emit(json.dumps(chunk("", "stop")))  # as JSON text too, as llama.cpp hands it over

    updates = list(merge_row_streams(2, two_rows, RuntimeError, "test"))
    assert updates[-1] == StreamUpdate(texts=("Hello", "Bye!!"), finished=(True, True))
    assert len(updates) == 2 + 3 + 2 + 1  # one update per chunk, then the final one

    def failing(row, emit, stop):
        emit(chunk("partial")) if row == 0 else emit({"error": "out of memory"})
    with pytest.raises(RuntimeError, match="out of memory"):
        list(merge_row_streams(2, failing, RuntimeError, "test"))

    stopped = threading.Event()

    def endless(row, emit, stop):
        while not stop.is_set():
            emit(chunk("x"))
            time.sleep(0.001)
        stopped.set()
    stream = merge_row_streams(1, endless, RuntimeError, "test")
    assert next(stream).texts == ("x",)
    stream.close()  # the consumer went away: the row is told to stop, and waited for
    assert stopped.is_set()


def test_a_fast_stream_reaches_the_browser_thinned_with_its_first_and_last_update_kept():
    clock_now = [0.0]

    def tokens_every_10_ms(count):
        for n in range(1, count + 1):
            clock_now[0] = n * 10  # milliseconds, whole numbers: no rounding at the boundaries
            yield "x" * n  # a snapshot: everything so far

    shown = list(at_most_every(tokens_every_10_ms(100), 50, clock=lambda: clock_now[0]))
    assert shown[0] == "x" and shown[-1] == "x" * 100  # the first token at once, the whole answer at the end
    assert len(shown) == 21  # one per 50 ms of a 1 s stream (10, 60, ..., 960 ms) and the last, not 100
    assert all(len(a) < len(b) for a, b in zip(shown, shown[1:]))
    assert list(at_most_every(iter(["only"]), 0.05)) == ["only"]
    assert list(at_most_every(iter("abc"), 0.0)) == ["a", "b", "c"]  # 0 switches the thinning off
