"""The openai engine against a real local OpenAI-compatible server: llama.cpp's HTTP server from the xllamacpp
wheel (`python -m rlhf_online.llamacpp_server`), started by the test with two published versions' adapters.

vLLM's runtime adapter loading (`/v1/load_lora_adapter`) is the other path of the engine; vLLM needs a GPU and
is not installable here, so that path is not exercised by this test.
"""

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf_online import models
from rlhf_online.adapters import AdapterRegistry, save_peft_adapter
from rlhf_online.config import ModelConfig, SamplingConfig
from rlhf_online.served_versions import ServedVersions
from rlhf_online.versions import BASE_VERSION

pytest.importorskip("xllamacpp")
REPO = Path(__file__).resolve().parents[1]
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)


def publish(registry, policy, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in models.lora_parameters(policy, models.POLICY_ADAPTER).items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return registry.publish(lambda folder: save_peft_adapter(policy, models.POLICY_ADAPTER, folder), {})


@pytest.fixture(scope="module")
def registry(embedded_source, tmp_path_factory):
    base = models.load_base_model(embedded_source, "fp32").model
    torch.manual_seed(0)
    policy = models.attach_lora(base, ModelConfig())
    registry = AdapterRegistry(tmp_path_factory.mktemp("openai") / "adapters")
    for seed in (1, 2):
        publish(registry, policy, seed)
    registry.policy = policy  # to publish a version the server does not have
    return registry


@pytest.fixture(scope="module")
def server_url(registry):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    loras = [arg for info in registry.versions() for arg in ("--lora", str(info.path / "adapter_model.gguf"))]
    process = subprocess.Popen([sys.executable, "-m", "rlhf_online.llamacpp_server", "--port", str(port),
                                "--slots", "4", *loras], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "LLAMA_API_KEY": "test-key"}, text=True)
    deadline = time.monotonic() + 120
    for line in process.stdout:
        if line.startswith("serving on"):
            break
        assert time.monotonic() < deadline and process.poll() is None, line
    yield f"http://127.0.0.1:{port}/v1"
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def engine(server_url, embedded_source):
    from rlhf_online.openai_engine import OpenAIEngine

    return OpenAIEngine(server_url, models.load_tokenizer(embedded_source), GREEDY, api_key="test-key")


def test_versions_served_by_name_each_answer_from_its_own(engine, registry):
    assert engine.server_kind == "llama.cpp"
    served = ServedVersions(engine, registry, keep=2)
    assert served.refresh().version == "v0002"
    assert served.loaded == ["v0001", "v0002"] and served.newest_pair() == ("v0002", "v0001")
    prompt = engine.build_prompt([{"role": "user", "content": "What is basil?"}])
    alone = {v: engine.sample([prompt.input_ids], [v])[0] for v in ("v0002", "v0001", BASE_VERSION)}
    assert len(set(alone.values())) == 3  # three different answers: the adapters are applied, per request
    with served.pinned_pair() as pair:
        *_, last = engine.stream_pair(prompt, pair)
    assert last.texts == (alone["v0002"], alone["v0001"])
    *_, forced = engine.stream([prompt.input_ids], ["v0001"], max_new_tokens=20, ignore_end=True)
    assert len(engine.tokenizer(forced.texts[0])["input_ids"]) >= 15  # ran past its end of turn


def test_a_version_the_server_lacks_is_logged_and_the_others_keep_serving(engine, registry, caplog):
    served = ServedVersions(engine, registry, keep=2)
    served.refresh()
    publish(registry, registry.policy, seed=3)
    with caplog.at_level(logging.ERROR):
        assert served.refresh() is None
    assert "was not started with" in caplog.text
    assert served.loaded == ["v0001", "v0002"]
    prompt = engine.build_prompt([{"role": "user", "content": "Name a colour."}])
    assert all(engine.sample([prompt.input_ids] * 2, list(served.newest_pair())))


def test_wrong_key_is_a_clear_error(server_url, embedded_source):
    from rlhf_online.openai_engine import OpenAIEngine, ServerError

    with pytest.raises(ServerError, match="401"):
        OpenAIEngine(server_url, models.load_tokenizer(embedded_source), GREEDY, api_key="wrong")
