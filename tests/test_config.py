import pytest

from rlhf_online.config import AppConfig, build_parser, load_config


def test_defaults_without_env_or_flags():
    cfg = load_config([], environ={})
    assert cfg == AppConfig()
    assert cfg.train is True
    assert cfg.model.model == "embedded"
    assert cfg.model.quantization == "auto"
    assert cfg.sampling.max_new_tokens == 96
    assert cfg.model.lora_target_modules[0] == "q_proj"


def test_auto_quantization_trains_a_gguf_model_on_its_own_dequantized_weights():
    """The embedded GGUF is served as is by llama.cpp; the trainer must train that policy, not an NF4 copy: in
    bf16 where the hardware multiplies it natively (faster), else fp32 (bf16 emulated is slower than fp32)."""
    embedded = load_config([], environ={}).model
    assert embedded.resolved_quantization(native_bf16=True) == "bf16"
    assert embedded.resolved_quantization(native_bf16=False) == "fp32"
    assert embedded.resolved_quantization() in ("bf16", "fp32")  # this machine's answer
    gguf_path = load_config(["--model", "/models/x.Q4_K_M.gguf"], environ={}).model
    assert gguf_path.resolved_quantization(native_bf16=False) == "fp32"
    assert load_config(["--model", "some/hub-model"], environ={}).model.resolved_quantization() == "nf4"
    assert load_config(["--quantization", "nf4"], environ={}).model.resolved_quantization() == "nf4"
    assert load_config(["--quantization", "fp32"], environ={}).model.resolved_quantization(native_bf16=True) == "fp32"


def test_a_gguf_file_named_in_capitals_is_served_and_trained_as_a_gguf(tmp_path):
    """One rule decides "is this a GGUF": the trainer's fp32 base and the engine's file must not disagree."""
    from rlhf_online.models import gguf_model_file
    path = tmp_path / "Model.Q4_1.GGUF"
    path.write_bytes(b"GGUF")
    cfg = load_config(["--model", str(path)], environ={}).model
    assert cfg.resolved_quantization(native_bf16=False) == "fp32"
    assert gguf_model_file(cfg) == path
    assert gguf_model_file(load_config(["--model", str(tmp_path)], environ={}).model) is None


def test_rollouts_are_as_long_as_the_chat_answers_unless_set():
    cfg = load_config(["--max-new-tokens", "120"], environ={})
    assert cfg.ppo.answer_tokens(cfg.sampling) == 120  # PPO trains on the answers people are shown
    cfg = load_config(["--max-new-tokens", "120", "--ppo-max-new-tokens", "32"], environ={})
    assert cfg.ppo.answer_tokens(cfg.sampling) == 32


def test_environment_overrides_defaults(tmp_path):
    cfg = load_config([], environ={"RLHF_DATA_DIR": str(tmp_path), "RLHF_MAX_NEW_TOKENS": "12",
                                   "RLHF_TRAIN": "false", "RLHF_LORA_TARGET_MODULES": "q_proj, v_proj"})
    assert cfg.data_path == tmp_path
    assert cfg.sampling.max_new_tokens == 12 and isinstance(cfg.sampling.max_new_tokens, int)
    assert cfg.train is False
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"]


def test_extra_environment_names():
    cfg = load_config([], environ={"GRADIO_SERVER_PORT": "9000", "MODEL_ID": "some/model"})
    assert cfg.port == 9000
    assert cfg.model.model == "some/model"
    # the RLHF_ name wins over the platform's name
    assert load_config([], environ={"RLHF_PORT": "1", "PORT": "2"}).port == 1


def test_cli_beats_environment():
    cfg = load_config(["--max-new-tokens", "7", "--data-dir", "/cli"],
                      environ={"RLHF_MAX_NEW_TOKENS": "12", "RLHF_DATA_DIR": "/env"})
    assert cfg.sampling.max_new_tokens == 7
    assert cfg.data_dir == "/cli"


def test_no_train_flag():
    assert load_config(["--no-train"], environ={}).train is False
    assert load_config(["--train"], environ={"RLHF_TRAIN": "0"}).train is True


@pytest.mark.parametrize("name, value, expected", [
    ("RLHF_MAX_NEW_TOKENS", "lots", "RLHF_MAX_NEW_TOKENS"),
    ("RLHF_TRAIN", "maybe", "not a boolean"),
    ("RLHF_TRAIN_ATTENTION", "flash", "auto, eager, sdpa"),  # a typo stops the start, not the trainer later
    ("RLHF_ENGINE", "vllm", "auto, llamacpp, transformers, openai"),
])
def test_bad_environment_value_exits_with_clear_message(name, value, expected):
    with pytest.raises(SystemExit) as info:
        load_config([], environ={name: value})
    message = str(info.value.code)
    assert expected in message and name in message and value in message


def test_bad_cli_value_exits(capsys):
    with pytest.raises(SystemExit):
        load_config(["--max-new-tokens", "lots"], environ={})
    assert "--max-new-tokens" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--train-attention", "flash"), ("--gate-sampler", "llama"),
                                         ("--quantization", "int8"), ("--judge-method", "vote")])
def test_a_setting_with_named_choices_rejects_anything_else_at_start_up(capsys, flag, value):
    with pytest.raises(SystemExit):
        load_config([flag, value], environ={})
    error = capsys.readouterr().err
    assert flag in error and "invalid choice" in error and value in error


def test_named_choices_ignore_case_from_flags_and_variables():
    cfg = load_config(["--quantization", "BF16"], environ={"RLHF_ROLLOUT_ENGINE": " Torch "})
    assert cfg.model.quantization == "bf16" and cfg.ppo.rollout_engine == "torch"


def test_help_lists_flags_with_env_names():
    text = " ".join(build_parser().format_help().split())  # undo line wrapping
    for flag, env in [("--max-new-tokens", "RLHF_MAX_NEW_TOKENS"), ("--data-dir", "RLHF_DATA_DIR"),
                      ("--no-train", "RLHF_TRAIN"), ("--port", "GRADIO_SERVER_PORT"), ("--model", "MODEL_ID"),
                      ("--ppo-lr", "RLHF_PPO_LR")]:
        assert flag in text and env in text
    assert "default: 96" in text  # defaults are shown
