"""Load: N concurrent gradio_client users chat and vote against the real app (training on) for a bounded time.

    python bench/load.py --users 8 --minutes 5 --out bench/results/load.json
    python bench/load.py --url http://127.0.0.1:7860/ --users 4 --minutes 1    # attach to a running app

Starts `python app.py` on a free port with its own temporary data and adapters folders (unless --url), then each
user (its own Client, so its own session) loops: send a message, wait for both answers, vote. Reported:
requests and failures (any exception), votes acknowledged (vote ids the app returned) against votes found in the
SQLite file afterwards (they must be equal), p50/p95 time until both answers are complete, and the adapter
swaps during the run. Speed targets live here, not in the tests.

All simulated users come from 127.0.0.1, which the app would treat as one visitor; the per-client limits are
therefore switched off for the launched app (the per-session ones stay on).

    python bench/load.py --attack --users 4 --minutes 3 --out bench/results/load_attack.json

--attack: the app runs as behind one reverse proxy (--trusted-proxies 1, every limit on, a small allowance of new
sessions per address), each honest user comes from its own address (the X-Forwarded-For entry the proxy appends),
and one more client tries, for the whole run, what issue 13 listed: votes on other people's pairs (with tokens the
honest users leak to it, with row ids, with guessed tokens) carrying a poisoned "better answer", a fresh session per
request, forged X-Forwarded-For entries, regenerate with made-up conversation ids, hidden admin events called by
fn_index without the token, and a 1 MB request body. Its warm-up (the sessions its address is allowed) is not
counted; every request after it must be refused: `attack_accepted` must be 0, with the honest users' `failures` at
0 and `votes_stored == votes_acknowledged`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import secrets
import shlex
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from common import write_json

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Why is the sky blue?", "Give me a tip for sleeping better.", "What is a good name for a cat?",
           "Explain recursion in one sentence.", "How do I boil an egg?", "Write a haiku about rain.",
           "What should I pack for a day hike?", "Is it better to rent or to buy a house?"]
CHOICES = ("a", "b", "a", "b", "tie")  # mostly decisive votes, so the reward model has pairs to learn


@dataclass
class UserResult:
    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    failures: int = 0
    vote_ids: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen | None, timeout_s: float, log_path: Path | None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the app exited with code {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url + "config", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the app did not answer within {timeout_s:.0f} s; see {log_path}")


def start_app(args, root: Path) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log_path = root / "app.log"
    command = [sys.executable, "app.py", "--model", args.model, "--host", "127.0.0.1", "--port", str(port),
               "--data-dir", str(root / "data"), "--adapters-dir", str(root / "adapters"),
               "--max-new-tokens", str(args.max_new_tokens), "--queue-max-size", str(max(64, 4 * args.users))]
    if args.attack:  # behind one (simulated) proxy: each user has its own address, every limit stays on
        command += ["--trusted-proxies", "1", "--client-sessions-per-hour", str(ATTACKER_SESSION_ALLOWANCE)]
    else:
        command += ["--client-chats-per-minute", "0", "--client-votes-per-minute", "0"]
    if args.no_train:
        command.append("--no-train")
    if args.engine:
        command += ["--engine", args.engine]
    command += shlex.split(args.app_args)
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return process, f"http://127.0.0.1:{port}/", log_path


def stop_app(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the trainer and helpers share the app's process group
    except ProcessLookupError:
        pass


def run_user(url: str, index: int, deadline: float, result: UserResult, leaked: list | None = None) -> None:
    from gradio_client import Client

    headers = {"X-Forwarded-For": honest_address(index)} if leaked is not None else None
    client = Client(url, verbose=False, httpx_kwargs={"timeout": 600}, headers=headers)
    prompts = itertools.cycle(PROMPTS[index % len(PROMPTS):] + PROMPTS[:index % len(PROMPTS)])
    choices = itertools.cycle(CHOICES)
    while time.monotonic() < deadline:
        try:
            result.requests += 1
            started = time.perf_counter()
            _, pair_id, _, _ = client.predict("", next(prompts), api_name="/chat")
            result.latencies.append(time.perf_counter() - started)
            if leaked is not None:  # the worst case: the attacker learns every token and gets to vote first
                leaked.append(pair_id)
                time.sleep(0.5)
            result.requests += 1
            vote_id, _, _ = client.predict(pair_id, next(choices), "", api_name="/vote")
            result.vote_ids.append(int(vote_id))
        except Exception as exc:  # every failure counts; a sample of messages goes into the report
            result.failures += 1
            if len(result.errors) < 5:
                result.errors.append(f"user {index}: {type(exc).__name__}: {str(exc)[:300]}")


def served_engine(args) -> str:
    """The engine the launched app serves with (`auto` resolved as the app resolves it)."""
    if args.url:
        return args.engine or "unknown (attached to a running app)"
    import torch

    sys.path.insert(0, str(REPO))
    from rlhf_online.config import load_config
    from rlhf_online.engine import choose_engine

    flags = ["--model", args.model] + (["--engine", args.engine] if args.engine else [])
    return choose_engine(load_config(flags, environ={}), torch.cuda.is_available())


# ---- the attacker (--attack) -------------------------------------------------------------------------------------

ATTACKER_SESSION_ALLOWANCE = 3  # new sessions per hour the launched app allows one address in --attack mode
ATTACKER_ADDRESS = "203.0.113.66"  # what the proxy appends for the attacker, whatever the attacker sent
POISON = "[prize](http://evil.example)"
ADMIN_CALLS = (("admin_pause", lambda t: [t]), ("admin_reset_data", lambda t: ["RESET", t]),
               ("admin_export", lambda t: [t]), ("admin_training_settings", lambda t: [t, 0.0, 100.0, 0.1]),
               ("admin_feedback_mode", lambda t: ["ai", t]), ("admin_save_constitution", lambda t: ["Obey.", t]))


def honest_address(index: int) -> str:
    return f"198.51.100.{index + 1}"


@dataclass
class AttackResult:
    requests: int = 0
    accepted: int = 0
    warmup_sessions: int = 0
    by_kind: dict = field(default_factory=dict)
    refusals: dict = field(default_factory=dict)  # one sample refusal message per kind

    def count(self, kind: str, accepted: bool, message: str = "") -> None:
        self.requests += 1
        self.accepted += accepted
        tally = self.by_kind.setdefault(kind, {"requests": 0, "accepted": 0})
        tally["requests"] += 1
        tally["accepted"] += accepted
        if not accepted and message:
            self.refusals.setdefault(kind, message[:200])


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def queue_call(url: str, fn_index: int, data: list) -> dict:
    """Any event, hidden ones included, by fn_index through Gradio's queue, as a script can; the final message."""
    session = secrets.token_hex(8)
    status, reply = _post(url + "gradio_api/queue/join", json.dumps(
        {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None,
         "trigger_id": None}).encode(), {"X-Forwarded-For": ATTACKER_ADDRESS})
    if status != 200:
        return {"success": False, "output": {"error": f"HTTP {status}"}}
    with urllib.request.urlopen(f"{url}gradio_api/queue/data?session_hash={session}", timeout=120) as stream:
        for raw in stream:
            line = raw.decode(errors="replace").strip()
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    return {"success": False, "output": {"error": "no result"}}


def run_attacker(url: str, deadline: float, leaked: list, result: AttackResult) -> None:
    """Issue 13's attacks, round-robin, until the deadline; a request that is not refused is `accepted`."""
    from gradio_client import Client

    def client(forwarded: str = ATTACKER_ADDRESS) -> Client:
        return Client(url, verbose=False, httpx_kwargs={"timeout": 600}, headers={"X-Forwarded-For": forwarded})

    def attempt(kind: str, call) -> None:
        try:
            call()
        except Exception as exc:  # refused: what we want
            result.count(kind, False, str(exc))
        else:
            result.count(kind, True)

    own = None
    for _ in range(ATTACKER_SESSION_ALLOWANCE):  # warm-up: use up the new sessions its address may open (cheaply:
        own = client()                          # a regenerate with a made-up id counts, and generates nothing)
        try:
            own.predict("warm-up", api_name="/regenerate")
        except Exception:
            pass
        result.warmup_sessions += 1
    with urllib.request.urlopen(url + "config", timeout=30) as response:
        dependencies = json.loads(response.read())["dependencies"]
    admin = {dep["api_name"]: dep["id"] for dep in dependencies if str(dep.get("api_name", "")).startswith("admin_")}
    rng = random.Random(13)

    def vote_leaked():
        if not leaked:
            raise RuntimeError("nothing leaked yet")
        own.predict(leaked[-1], "b", POISON, api_name="/vote")

    def admin_call():
        name, data = rng.choice(ADMIN_CALLS)
        reply = queue_call(url, admin[name], data(rng.choice(["", "admin", secrets.token_urlsafe(24)])))
        if not reply.get("success"):
            raise RuntimeError(json.dumps(reply.get("output"))[:200])

    def oversized():
        status, reply = _post(url + "gradio_api/call/chat", json.dumps({"data": ["", "A" * 1_000_000]}).encode(),
                              {"X-Forwarded-For": ATTACKER_ADDRESS})
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {reply[:100]!r}")

    attacks = [
        ("vote_on_leaked_token_of_another_session", vote_leaked),
        ("vote_by_row_id", lambda: own.predict(str(rng.randint(1, 200)), "b", POISON, api_name="/vote")),
        ("vote_by_guessed_token", lambda: own.predict(secrets.token_urlsafe(16), "b", POISON, api_name="/vote")),
        ("new_session_per_request", lambda: client().predict("", "flood", api_name="/chat")),
        ("forged_x_forwarded_for", lambda: client(f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.0.1, "
                                                  f"{ATTACKER_ADDRESS}").predict("", "flood", api_name="/chat")),
        ("regenerate_unknown_conversation", lambda: own.predict(secrets.token_hex(16), api_name="/regenerate")),
        ("admin_event_without_token", admin_call),
        ("oversized_body", oversized),
    ]
    for kind, call in itertools.cycle(attacks):
        if time.monotonic() >= deadline:
            return
        if kind.startswith("vote_on_leaked") and not leaked:
            continue
        attempt(kind, call)
        time.sleep(0.05)


def side_effects(db: Path | None, root: Path | None) -> dict:
    """What a successful attack would have left behind."""
    if db is None:
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        control = dict(conn.execute("SELECT key, value FROM control").fetchall())
        poisoned = conn.execute("SELECT COUNT(*) FROM votes WHERE better_answer LIKE '%evil.example%'").fetchone()[0]
    finally:
        conn.close()
    return {"control_settings_changed": control, "poisoned_votes": poisoned,
            "reset_backups": len(list((root / "data" / "backups").glob("*"))) if root is not None and
            (root / "data" / "backups").is_dir() else 0}


def stats(url: str) -> dict:
    from gradio_client import Client

    return Client(url, verbose=False).predict(api_name="/stats")


def training_rows(db: Path) -> dict[str, int]:
    """How much training the app's trainer recorded (metrics rows per kind: ppo iterations, reward updates):
    a load figure with training "on" means little if the trainer did nothing meanwhile."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT kind, COUNT(*) FROM metrics GROUP BY kind").fetchall())
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def stored_votes(db: Path, vote_ids: list[int]) -> int:
    """How many of the acknowledged vote ids are in the database file."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        found = 0
        for start in range(0, len(vote_ids), 500):
            chunk = vote_ids[start:start + 500]
            found += conn.execute(f"SELECT COUNT(*) FROM votes WHERE id IN ({','.join('?' * len(chunk))})",
                                  chunk).fetchone()[0]
        return found
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--no-train", action="store_true", help="launch the app without the background trainer")
    parser.add_argument("--engine", default="", help="the launched app's --engine (default: its own default, auto)")
    parser.add_argument("--app-args", default="", help="more flags for the launched app, e.g. \"--trainer-yield\"")
    parser.add_argument("--url", default="", help="attach to a running app instead of launching one")
    parser.add_argument("--db", default="", help="with --url: its preferences.sqlite, to count stored votes")
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--attack", action="store_true", help="one more client tries issue 13's attacks meanwhile")
    parser.add_argument("--out", default="bench/results/load.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="rlhf-load-") as tmp:
        root = Path(tmp)
        process, log_path = None, None
        if args.url:
            url, db = args.url.rstrip("/") + "/", Path(args.db) if args.db else None
            root = None
        else:
            process, url, log_path = start_app(args, root)
            db = root / "data" / "preferences.sqlite"
        try:
            wait_until_up(url, process, args.startup_timeout, log_path)
            before = stats(url)
            results = [UserResult() for _ in range(args.users)]
            deadline = time.monotonic() + args.minutes * 60
            leaked = [] if args.attack else None
            threads = [threading.Thread(target=run_user, args=(url, i, deadline, results[i], leaked), daemon=True)
                       for i in range(args.users)]
            attack = AttackResult()
            if args.attack:
                threads.append(threading.Thread(target=run_attacker, args=(url, deadline, leaked, attack),
                                                daemon=True))
            began = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - began
            after = stats(url)
        finally:
            if process is not None:
                stop_app(process)
                app_log_tail = log_path.read_text(errors="replace")[-2000:]
        vote_ids = [v for r in results for v in r.vote_ids]
        training_done: dict[str, int] = {}
        if db is not None:
            votes_stored = stored_votes(db, vote_ids)
            training_done = training_rows(db)
        else:  # attached without the file: the growth of the app's own count
            votes_stored = sum(after["votes"].values()) - sum(before["votes"].values())
        latencies = [x for r in results for x in r.latencies]
        report = {
            "users": args.users, "minutes": args.minutes, "elapsed_s": round(elapsed, 1),
            "train": not args.no_train and not args.url, "model": args.model, "max_new_tokens": args.max_new_tokens,
            "engine": served_engine(args),
            "requests": sum(r.requests for r in results), "failures": sum(r.failures for r in results),
            "chats_completed": len(latencies), "votes_acknowledged": len(vote_ids),
            "votes_acknowledged_unique": len(set(vote_ids)), "votes_stored": votes_stored,
            "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
            "max_s": max(latencies) if latencies else None,
            "swaps": after.get("swaps", 0) - before.get("swaps", 0), "serving_at_end": after.get("serving"),
            "trainer_at_end": after.get("trainer"), "errors": [e for r in results for e in r.errors][:10],
            "cpu_count": os.cpu_count(), "app_args": args.app_args, "training_rows": training_done,
        }
        if args.attack:
            report.update({
                "attack": True, "attack_requests": attack.requests, "attack_accepted": attack.accepted,
                "attack_warmup_sessions": attack.warmup_sessions, "attack_by_kind": attack.by_kind,
                "attack_refusal_samples": attack.refusals, "attack_side_effects": side_effects(db, root),
                "votes_stored_equals_acknowledged": votes_stored == len(vote_ids),
                "conversations_open_at_end": after.get("conversations_open"),
            })
        if process is not None and report["failures"]:
            report["app_log_tail"] = app_log_tail
    print_table(report)
    write_json(args.out, report)
    return report


def print_table(report: dict) -> None:
    rows = [("engine", report["engine"]), ("users", report["users"]), ("minutes", report["minutes"]),
            ("requests", report["requests"]),
            ("failures", report["failures"]), ("votes acknowledged", report["votes_acknowledged"]),
            ("votes stored", report["votes_stored"]),
            ("p50 time to both answers (s)", _fmt(report["p50_s"])),
            ("p95 time to both answers (s)", _fmt(report["p95_s"])), ("adapter swaps", report["swaps"]),
            ("PPO iterations / reward updates", f"{report['training_rows'].get('ppo', 0)} / {report['training_rows'].get('reward', 0)}")]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if report.get("attack"):
        rows = [("attack requests", report["attack_requests"]), ("attack accepted", report["attack_accepted"])] + [
            (f"  {kind}", f'{tally["accepted"]}/{tally["requests"]} accepted')
            for kind, tally in report["attack_by_kind"].items()]
        for name, value in rows:
            print(f"{name:<{width}}  {value}")
    for error in report["errors"]:
        print("error:", error)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
