"""Export the collected votes as TRL datasets, or seed the store from one.

Votes are only worth keeping if they can leave the app: the export writes the standard TRL conversational
preference and SFT formats (JSONL for people and other tools, ``save_to_disk`` folders for ``datasets``), so
a reward model or DPO run elsewhere can pick them up unchanged.

    python -m rlhf_online.export --data-dir data --out export
    python -m rlhf_online.export --data-dir data --import hh_harmless_dev.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rlhf_online.store import ImportResult, PreferenceStore, store_path

PREFERENCES_JSONL = "preferences.jsonl"
SFT_JSONL = "sft.jsonl"
PREFERENCES_DATASET = "preferences_dataset"
SFT_DATASET = "sft_dataset"


@dataclass(frozen=True)
class ExportSummary:
    """What was written, plus the votes that carry no pair (ties, both bad) so nobody wonders where they went."""

    out_dir: Path
    preferences: int
    demonstrations: int
    ties: int
    both_bad: int
    preferences_by_source: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        sources = ", ".join(f"{name}: {count}" for name, count in self.preferences_by_source.items())
        return (f"exported {self.preferences} preference pairs ({sources}) and {self.demonstrations} "
                f"demonstrations to {self.out_dir}\n"
                f"not exported as pairs: {self.ties} ties, {self.both_bad} both-bad votes")


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def preference_records(store: PreferenceStore) -> list[dict[str, Any]]:
    """Rows in TRL's conversational preference form (explicit prompt, one-message answers).

    Each row keeps where it came from (human, ai or import), its training weight, and for AI labels the judge
    and constitution version, so a later run can filter or re-weight AI feedback instead of mixing it blindly.
    """
    return [{"prompt": row.prompt, "chosen": _assistant(row.chosen), "rejected": _assistant(row.rejected),
             "source": row.source, "weight": row.weight, "judge": row.judge} for row in store.preferences_since(0)]


def sft_records(store: PreferenceStore) -> list[dict[str, Any]]:
    """Demonstrations in TRL's conversational language-modeling form: the conversation plus the better answer."""
    return [{"messages": row.prompt + _assistant(row.answer)} for row in store.demonstrations()]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _save_dataset(records: list[dict[str, Any]], features_spec: dict[str, Any], path: Path) -> None:
    """Save with explicit features so an empty export still has the columns a trainer expects."""
    import datasets  # lazy: importing datasets costs seconds and only the export needs it

    messages = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
    features = datasets.Features({name: messages if kind == "messages" else datasets.Value(kind)
                                  for name, kind in features_spec.items()})
    columns = {name: [record[name] for record in records] for name in features}  # from_list drops columns when empty
    # one shard even when empty: with zero shards load_from_disk cannot read the folder back
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(path), num_shards=1)


def export_trl(store: PreferenceStore, out_dir: str | Path) -> ExportSummary:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preferences, demonstrations = preference_records(store), sft_records(store)
    _write_jsonl(out / PREFERENCES_JSONL, preferences)
    _write_jsonl(out / SFT_JSONL, demonstrations)
    _save_dataset(preferences, {"prompt": "messages", "chosen": "messages", "rejected": "messages",
                                "source": "string", "weight": "float64", "judge": "string"},
                  out / PREFERENCES_DATASET)
    _save_dataset(demonstrations, {"messages": "messages"}, out / SFT_DATASET)
    counts = store.counts()
    return ExportSummary(out_dir=out, preferences=len(preferences), demonstrations=len(demonstrations),
                         ties=counts["votes"]["tie"], both_bad=counts["votes"]["both_bad"],
                         preferences_by_source=counts["preferences"])


EXPORT_PREFIX = "rlhf-export-"
EXPORT_KEEP_S = 600.0  # long enough for the web server to copy a finished zip into its own cache


def export_zip(store: PreferenceStore) -> tuple[Path, ExportSummary]:
    """The TRL export as one zip in a fresh temporary folder (the app offers it for download).

    Only the zip stays there, and only for a while: each export first removes the exports older than
    EXPORT_KEEP_S, and the app removes its own at shutdown (they used to pile up in the temporary folder).
    """
    remove_exports(EXPORT_KEEP_S)
    folder = Path(tempfile.mkdtemp(prefix=f"{EXPORT_PREFIX}{os.getpid()}-"))
    try:
        summary = export_trl(store, folder / "export")
        archive = shutil.make_archive(str(folder / f"rlhf_online-export-{time.strftime('%Y%m%d-%H%M%S')}"), "zip",
                                      folder / "export")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    shutil.rmtree(folder / "export", ignore_errors=True)
    return Path(archive), summary


def remove_exports(max_age_s: float, own_only: bool = False) -> int:
    """Delete export folders older than `max_age_s` (only this process's with `own_only`); returns how many."""
    prefix = f"{EXPORT_PREFIX}{os.getpid()}-" if own_only else EXPORT_PREFIX
    removed = 0
    for folder in Path(tempfile.gettempdir()).glob(prefix + "*"):
        try:
            if folder.is_dir() and time.time() - folder.stat().st_mtime >= max_age_s:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        except OSError:
            continue  # another process removed it first
    return removed


def _read_jsonl(path: Path) -> Iterator[Any]:
    """Yield parsed lines; an unparsable line becomes None so the store counts it as skipped."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield None


def import_jsonl(store: PreferenceStore, path: str | Path, source: str = "import") -> ImportResult:
    return store.import_preferences(_read_jsonl(Path(path)), source=source)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_online.export",
        description="Export collected preferences as TRL datasets, or import a preference file into the store.",
        epilog="Import accepts JSONL with TRL conversational records ({prompt, chosen, rejected} as message lists) "
               "or Anthropic HH raw text. With both --import and --out, the import runs first.")
    parser.add_argument("--data-dir", required=True, type=Path,
                        help="the app's data folder, holding preferences.sqlite (created on import if missing)")
    parser.add_argument("--out", type=Path, help="folder to write preferences.jsonl, sft.jsonl and the "
                        "preferences_dataset/ and sft_dataset/ folders (datasets.load_from_disk)")
    parser.add_argument("--format", choices=["trl"], default="trl",
                        help="export format (only TRL conversational for now)")
    parser.add_argument("--import", dest="import_file", type=Path, metavar="FILE.jsonl",
                        help="add the preference pairs in this JSONL file to the store (source 'import')")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None and args.import_file is None:
        parser.error("nothing to do: give --out to export and/or --import to import")
    db = store_path(args.data_dir)
    if args.import_file is None and not db.exists():
        print(f"error: no preference database at {db}", file=sys.stderr)
        return 2
    if args.import_file is not None and not args.import_file.is_file():
        print(f"error: import file {args.import_file} not found", file=sys.stderr)
        return 2
    with PreferenceStore(db) as store:
        if args.import_file is not None:
            result = import_jsonl(store, args.import_file)
            print(f"imported {result.imported} preference pairs from {args.import_file} "
                  f"({result.skipped} skipped)")
        if args.out is not None:
            print(export_trl(store, args.out).describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
