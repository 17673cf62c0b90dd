"""Choosing the engine: `auto`, and start-up errors that name the flag to change."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_online.config import load_config
from rlhf_online.engine import EngineUnavailableError, choose_engine

REPO = Path(__file__).resolve().parents[1]


def config(*flags):
    return load_config(list(flags), environ={})


def test_auto_picks_llamacpp_for_the_embedded_gguf_on_cpu_and_transformers_otherwise(tiny_model_dir):
    assert choose_engine(config(), cuda=False) == "llamacpp"
    assert choose_engine(config(), cuda=True) == "transformers"
    assert choose_engine(config("--model", str(tiny_model_dir)), cuda=False) == "transformers"
    assert choose_engine(config("--engine", "transformers"), cuda=False) == "transformers"


def test_a_gguf_file_path_is_served_by_llamacpp(tmp_path):
    from rlhf_online.models import embedded_gguf_path

    link = tmp_path / "model.gguf"
    link.symlink_to(embedded_gguf_path())
    assert choose_engine(config("--model", str(link)), cuda=False) == "llamacpp"


def test_missing_xllamacpp_names_the_package_and_the_flag(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xllamacpp" else real(name, *a))
    with pytest.raises(EngineUnavailableError, match=r"pip install xllamacpp==.*--engine transformers"):
        choose_engine(config(), cuda=False)


def test_an_unknown_engine_is_refused_at_the_flag_and_in_a_config_built_in_code(capsys):
    with pytest.raises(SystemExit):
        config("--engine", "vllm")
    assert "invalid choice: 'vllm'" in capsys.readouterr().err
    cfg = config()
    cfg.serve.engine = "vllm"
    with pytest.raises(EngineUnavailableError, match="choose one of auto, llamacpp, transformers, openai"):
        choose_engine(cfg, cuda=False)


@pytest.mark.parametrize("flags, message", [
    (("--engine", "openai"), "--engine openai needs --engine-url"),
    (("--engine", "llamacpp", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct"), "--engine transformers"),
])
def test_wrong_engine_flags_are_refused_with_the_fix(flags, message):
    with pytest.raises(EngineUnavailableError, match=message.replace("(", r"\(")):
        choose_engine(config(*flags), cuda=False)


def test_the_app_refuses_to_start_with_a_clear_message_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "app.py", "--engine", "openai", "--data-dir", str(tmp_path / "d"),
                             "--adapters-dir", str(tmp_path / "a"), "--no-train"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "cannot start: --engine openai needs --engine-url" in result.stderr
    assert "Traceback" not in result.stderr
