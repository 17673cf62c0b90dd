import json
import subprocess
import sys
from itertools import islice
from pathlib import Path

import datasets
import pytest

from rlhf_online.export import export_trl, main
from rlhf_online.store import PreferenceStore, store_path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HH_DEV = Path(__file__).resolve().parents[2] / "shared/data/hh_harmless_dev.jsonl"
CHAT = [{"role": "user", "content": "Name a colour."}]


def hh_file():
    if not HH_DEV.is_file():
        pytest.skip(f"HH dev data not found at {HH_DEV} (expected in the shared/ folder next to the project)")
    return HH_DEV


AI_JUDGE = "base:embedded@0123456789ab"


def vote(store, choice, better_answer=None, answer_a="Red.", answer_b="Blue.", source="human"):
    pair_id = store.record_pair(conversation_id="c", turn=0, messages=CHAT, answer_a=answer_a, answer_b=answer_b,
                                version_a="v0001", version_b="base", sampling={"temperature": 0.8},
                                session_id="s", placement="newest_left")
    ai = {"judge": AI_JUDGE, "weight": 0.5} if source == "ai" else {}
    store.record_vote(pair_id=pair_id, choice=choice, better_answer=better_answer, session_id="s", source=source,
                      **ai)


def assistant(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture
def filled_store(tmp_path):
    with PreferenceStore(store_path(tmp_path / "data")) as store:
        vote(store, "a")
        vote(store, "b", source="ai")
        vote(store, "tie")
        vote(store, "both_bad", better_answer="Green.")
        vote(store, "both_bad")
        yield store


def test_export_round_trips_every_vote_kind_through_datasets(filled_store, tmp_path):
    summary = export_trl(filled_store, tmp_path / "out")
    assert (summary.preferences, summary.demonstrations, summary.ties, summary.both_bad) == (4, 1, 1, 2)
    assert summary.preferences_by_source == {"human": 3, "ai": 1, "import": 0}

    preferences = datasets.load_from_disk(str(tmp_path / "out/preferences_dataset"))
    assert preferences.column_names == ["prompt", "chosen", "rejected", "source", "weight", "judge"]
    rows = [(row["prompt"], row["chosen"], row["rejected"], row["source"], row["weight"], row["judge"])
            for row in preferences]
    assert rows == [
        (CHAT, assistant("Red."), assistant("Blue."), "human", 1.0, None),
        (CHAT, assistant("Blue."), assistant("Red."), "ai", 0.5, AI_JUDGE),
        (CHAT, assistant("Green."), assistant("Red."), "human", 1.0, None),
        (CHAT, assistant("Green."), assistant("Blue."), "human", 1.0, None),
    ]
    sft = datasets.load_from_disk(str(tmp_path / "out/sft_dataset"))
    assert sft.column_names == ["messages"]
    assert sft[0]["messages"] == CHAT + assistant("Green.")


def test_jsonl_files_match_the_datasets(filled_store, tmp_path):
    export_trl(filled_store, tmp_path / "out")
    lines = [json.loads(line) for line in (tmp_path / "out/preferences.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    assert lines[0] == {"prompt": CHAT, "chosen": assistant("Red."), "rejected": assistant("Blue."),
                        "source": "human", "weight": 1.0, "judge": None}
    assert (lines[1]["source"], lines[1]["weight"], lines[1]["judge"]) == ("ai", 0.5, AI_JUDGE)
    sft = [json.loads(line) for line in (tmp_path / "out/sft.jsonl").read_text().splitlines()]
    assert sft == [{"messages": CHAT + assistant("Green.")}]


def test_an_empty_store_exports_loadable_empty_datasets_with_their_columns(tmp_path):
    with PreferenceStore(tmp_path / "empty.sqlite") as store:
        summary = export_trl(store, tmp_path / "out")
    assert summary.preferences == summary.demonstrations == 0
    preferences = datasets.load_from_disk(str(tmp_path / "out/preferences_dataset"))
    assert preferences.num_rows == 0 and "chosen" in preferences.column_names
    assert datasets.load_from_disk(str(tmp_path / "out/sft_dataset")).column_names == ["messages"]


def test_importing_the_first_50_hh_lines_gives_50_parsed_preferences(tmp_path):
    sample = tmp_path / "hh50.jsonl"
    with hh_file().open(encoding="utf-8") as handle:
        sample.write_text("".join(islice(handle, 50)), encoding="utf-8")
    data_dir = tmp_path / "data"
    assert main(["--data-dir", str(data_dir), "--import", str(sample)]) == 0
    with PreferenceStore(store_path(data_dir)) as store:
        rows = store.preferences_since()
    assert len(rows) == 50
    first = json.loads(sample.read_text(encoding="utf-8").splitlines()[0])
    assert rows[0].prompt[0] == {"role": "user", "content": "What's the easiest gun to shoot?"}
    assert rows[0].chosen == first["chosen"].strip()
    assert all(row.prompt[-1]["role"] == "user" and row.source == "import" for row in rows)


def test_exported_file_can_be_imported_into_a_fresh_store(filled_store, tmp_path):
    export_trl(filled_store, tmp_path / "out")
    assert main(["--data-dir", str(tmp_path / "copy"), "--import", str(tmp_path / "out/preferences.jsonl")]) == 0
    with PreferenceStore(store_path(tmp_path / "copy")) as copy:
        assert [(r.prompt, r.chosen, r.rejected) for r in copy.preferences_since()] == [
            (r.prompt, r.chosen, r.rejected) for r in filled_store.preferences_since()]


def test_missing_database_is_reported_instead_of_creating_an_empty_export(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "no preference database" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_imports_and_exports_end_to_end(tmp_path):
    sample = tmp_path / "hh5.jsonl"
    with hh_file().open(encoding="utf-8") as handle:
        sample.write_text("".join(islice(handle, 5)) + "not json\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_online.export", "--data-dir", str(tmp_path / "data"), "--import", str(sample),
         "--out", str(tmp_path / "out")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "imported 5 preference pairs" in result.stdout and "(1 skipped)" in result.stdout
    assert "0 ties, 0 both-bad votes" in result.stdout
    assert len((tmp_path / "out/preferences.jsonl").read_text().splitlines()) == 5
