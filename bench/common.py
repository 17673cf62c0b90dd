"""Helpers shared by the benchmarks: reading preference files and measuring memory."""

from __future__ import annotations

import json
import random
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_online.conversation import answer_text, normalize_prompt  # noqa: E402

SHARED_HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_harmless_dev.jsonl"


def read_preference_file(path: str | Path) -> list[dict]:
    """JSONL {"prompt", "chosen", "rejected"}; prompt as HH raw text or a message list."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            rows.append({"prompt": normalize_prompt(record["prompt"]), "chosen": answer_text(record["chosen"]),
                         "rejected": answer_text(record["rejected"])})
    return rows


def split_rows(rows: list, eval_size: int, seed: int) -> tuple[list, list]:
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    return shuffled[eval_size:], shuffled[:eval_size]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json(path: str | Path, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
