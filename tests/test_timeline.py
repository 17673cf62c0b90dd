"""The learning timeline: probe answers sampled at publish time on the tiny model, stored, and rendered safely."""

import time

import pytest
import torch

from rlhf_online import timeline
from rlhf_online.config import TimelineConfig, load_config
from rlhf_online.models import POLICY_ADAPTER, attach_lora, load_base_model, load_tokenizer
from rlhf_online.store import PreferenceStore
from rlhf_online.versions import BASE_VERSION

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    cfg = load_config(["--model", str(tiny_model_dir)], environ={})
    peft = attach_lora(load_base_model(str(tiny_model_dir), "nf4", for_training=True).model, cfg.model)
    return peft, load_tokenizer(str(tiny_model_dir))


def small_cfg(tiny_model_dir, prompts="Hello there|Why is the sky blue?"):
    return load_config(["--model", str(tiny_model_dir), "--probe-prompts", prompts, "--probe-max-new-tokens", "6"],
                       environ={})


def test_probe_prompts_default_text_and_file(tmp_path):
    assert timeline.probe_prompts(TimelineConfig()) == list(timeline.DEFAULT_PROBES)
    assert timeline.probe_prompts(TimelineConfig(probe_prompts=" a, with a comma | b ||")) == ["a, with a comma", "b"]
    path = tmp_path / "probes.txt"
    path.write_text("first question\n\nsecond question\nthird\n")
    assert timeline.probe_prompts(TimelineConfig(probe_prompts=str(path), max_probes=2)) == [
        "first question", "second question"]


def test_publish_records_base_once_and_each_version(policy, tiny_model_dir, tmp_path):
    peft, tokenizer = policy
    cfg = small_cfg(tiny_model_dir)
    store = PreferenceStore(tmp_path / "prefs.sqlite")
    scored = []

    def score(messages, answers):
        scored.append([m[-1]["content"] for m in messages])
        return [float(len(a)) for a in answers]

    yields = []
    assert timeline.record_published(store, cfg, "v0001", 7, peft, tokenizer, score, lambda: yields.append(1))
    with torch.no_grad():  # the next version really answers differently
        for name, parameter in peft.named_parameters():
            if f".{POLICY_ADAPTER}." in name and "lora_B" in name:
                parameter.normal_(0, 1.0)
    assert timeline.record_published(store, cfg, "v0002", 9, peft, tokenizer, score)
    entries = timeline.load_entries(store)
    assert [e.version for e in entries] == ["v0002", "v0001", BASE_VERSION]  # the base once, newest first
    assert scored == [["Hello there", "Why is the sky blue?"]] * 3
    assert yields, "probe sampling must let the chat have the CPU between tokens"
    for entry in entries:
        assert entry.prompts == ["Hello there", "Why is the sky blue?"]
        assert len(entry.answers) == 2 and all(0 < n <= 6 for n in entry.tokens)
        assert entry.scores == [float(len(a)) for a in entry.answers]
    assert [e.votes_seen for e in entries] == [9, 7, 0]
    assert entries[2].answers == entries[1].answers  # a fresh LoRA is the identity: same greedy answers as base
    assert entries[0].answers != entries[1].answers

    # new probe prompts: the page shows only entries for the newest set, and the base answers it again
    assert timeline.record_published(store, small_cfg(tiny_model_dir, "Count to three."), "v0003", 10, peft,
                                     tokenizer)
    assert [e.version for e in timeline.load_entries(store)] == ["v0003", BASE_VERSION]
    store.close()


def test_a_failure_is_logged_and_never_raised(policy, tiny_model_dir, tmp_path, caplog):
    peft, tokenizer = policy
    store = PreferenceStore(tmp_path / "prefs.sqlite")

    def broken_score(messages, answers):
        raise RuntimeError("reward model exploded")

    assert timeline.record_published(store, small_cfg(tiny_model_dir), "v0001", 1, peft, tokenizer,
                                     broken_score) is False
    assert "could not record the probe answers of v0001" in caplog.text
    assert timeline.load_entries(store) == []
    store.close()


def test_model_mode_is_restored(policy):
    peft, tokenizer = policy
    peft.train()
    timeline.answer_probes(peft, tokenizer, ["Hi"], 2)
    assert peft.training
    peft.eval()
    timeline.answer_probes(peft, tokenizer, ["Hi"], 2, use_adapter=False)
    assert not peft.training


def entry(version, answers, created_at, probe_set="s", votes=None):
    return timeline.Entry(version=version, prompts=["Q <b>1</b>", "Q2"], answers=answers, tokens=[3, 4],
                          scores=[0.5, None], probe_set=probe_set, votes_seen=votes, created_at=created_at)


def test_highlight_marks_new_words_and_escapes_html():
    html, share = timeline.highlight_new_words("The sky is blue.", "The sky is <script>x</script> blue!!")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert html.startswith("The sky is ") and "<mark>" in html
    assert 0 < share < 1
    assert timeline.highlight_new_words("same words", "same words") == ("same words", 0.0)


def test_timeline_html_newest_first_base_last_and_escaped():
    now = time.time()
    entries = [entry("v0003", ["a <img src=x onerror=alert(1)>", "b"], now - 30, votes=12),
               entry("v0001", ["old", "b"], now - 300, votes=4), entry(BASE_VERSION, ["base answer", "b"], now - 600)]
    page = timeline.timeline_html(entries, now=now)
    assert "<img" not in page and "&lt;img" in page and "Q &lt;b&gt;1&lt;/b&gt;" in page
    first_card = page.split("tl-card")[1]
    assert first_card.index("v0003") < first_card.index("v0001") < first_card.index("base model")
    assert "learned from 12 votes" in page and "30 s ago" in page and "reward +0.50" in page
    assert "100% of words new vs base" in first_card and "0% of words new" in page.split("tl-card")[2]
    assert "1 older versions not shown" in timeline.timeline_html(entries, max_versions=1, now=now)
    assert "No version has been published yet" in timeline.timeline_html([])
