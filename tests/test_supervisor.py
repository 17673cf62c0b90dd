"""The supervisor keeps the trainer process alive: a crash or a kill is followed by a restart, stop() ends it.

The fake trainers below run in spawned processes, which import this module: so it imports nothing heavy at
the top (torch and the trainer are imported inside the tests), keeping each fake start well under a second.
"""

import multiprocessing
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from rlhf_online.lifecycle import StopFlag  # light: no torch


# ---- fake trainers (module level, so the spawn context can pickle them by name) ---------------------------------

def _log_start(cfg) -> int:
    """Append this process's pid to <data_dir>/starts and return how many starts there have been."""
    path = Path(cfg.data_dir) / "starts"
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return len(path.read_text().split())


def run_until_stopped(cfg, chat_busy, stop_event):
    _log_start(cfg)
    while not stop_event.is_set():
        time.sleep(0.02)
    (Path(cfg.data_dir) / f"stopped-{os.getpid()}").write_text("clean exit\n")


def poll_stop_flag(flag):
    """A trainer's stop check at its tightest: killed at a random moment, it is most likely inside `is_set()`."""
    while not flag.is_set():
        pass


def crash_on_first_start(cfg, chat_busy, stop_event):
    if _log_start(cfg) == 1:
        raise SystemExit(1)
    while not stop_event.is_set():
        time.sleep(0.02)


def always_crash(cfg, chat_busy, stop_event):
    _log_start(cfg)
    raise SystemExit(3)


def ignore_stop(cfg, chat_busy, stop_event):
    _log_start(cfg)
    while True:
        time.sleep(0.05)


# ---- helpers ----------------------------------------------------------------------------------------------------

def crash(supervisor) -> None:
    """What a crash looks like from outside: the trainer process dies of SIGKILL (an OOM kill, say)."""
    os.kill(supervisor.status.pid, signal.SIGKILL)


def wait_for(condition, timeout_s: float, interval_s: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def starts(cfg) -> list[int]:
    path = Path(cfg.data_dir) / "starts"
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.fixture
def cfg(tmp_path):
    from rlhf_online.config import AppConfig

    (tmp_path / "data").mkdir()
    return AppConfig(data_dir=str(tmp_path / "data"), adapters_dir=str(tmp_path / "adapters"))


@pytest.fixture
def make_supervisor():
    """Build supervisors with a short backoff; every one is stopped at the end of the test, pass or fail."""
    from rlhf_online.supervisor import TrainerSupervisor

    made = []

    def make(cfg, target, **kwargs):
        kwargs.setdefault("min_backoff_s", 0.1)
        kwargs.setdefault("max_backoff_s", 0.4)
        supervisor = TrainerSupervisor(cfg, target=target, **kwargs)
        made.append(supervisor)
        return supervisor

    yield make
    for supervisor in made:
        supervisor.stop(timeout_s=5)


# ---- tests with fake trainers -----------------------------------------------------------------------------------

def test_killed_trainer_is_restarted_and_stop_ends_it(cfg, make_supervisor):
    supervisor = make_supervisor(cfg, run_until_stopped)
    supervisor.start()
    first = wait_for(lambda: starts(cfg), 20, what="the first start")[0]
    assert supervisor.status.alive and supervisor.status.pid == first and supervisor.status.starts == 1

    crash(supervisor)
    pids = wait_for(lambda: len(starts(cfg)) >= 2 and starts(cfg), 20, what="a restart")
    assert len(pids) == 2 and pids[0] != pids[1]
    wait_for(lambda: supervisor.status.pid == pids[1], 5, what="the status to show the new pid")
    assert supervisor.status.starts == 2 and supervisor.status.alive
    assert supervisor.status.last_exit_code == -9  # SIGKILL
    assert len(supervisor.status.history) == 1 and "code -9" in supervisor.status.history[0]

    process = supervisor._process
    supervisor.stop()
    assert not process.is_alive() and process.exitcode == 0
    assert (Path(cfg.data_dir) / f"stopped-{pids[1]}").exists()  # it finished cleanly, not killed
    assert not supervisor.status.alive
    time.sleep(0.5)
    assert len(starts(cfg)) == 2 and supervisor.status.starts == 2  # no restart after stop()


def test_crashed_trainer_is_restarted(cfg, make_supervisor):
    supervisor = make_supervisor(cfg, crash_on_first_start)
    supervisor.start()
    wait_for(lambda: supervisor.status.starts >= 2 and supervisor.status.alive, 20, what="a restart")
    assert supervisor.status.last_exit_code == 1
    assert "code 1" in supervisor.status.history[0]
    time.sleep(0.5)
    assert supervisor.status.starts == 2 and supervisor._process.is_alive()  # the second start stays up


def test_crash_loop_backs_off_instead_of_spinning(cfg, make_supervisor):
    supervisor = make_supervisor(cfg, always_crash, min_backoff_s=0.1, max_backoff_s=0.4)
    started = time.monotonic()
    supervisor.start()
    wait_for(lambda: supervisor.status.starts >= 4, 30, what="repeated restarts")
    elapsed = time.monotonic() - started
    supervisor.stop()
    # Waits of 0.2 + 0.4 + 0.4 s at least between the four starts (the backoff doubles up to its cap).
    assert elapsed >= 1.0
    assert supervisor.status.last_exit_code == 3
    count = supervisor.status.starts
    time.sleep(0.6)
    assert supervisor.status.starts == count  # stopped during a backoff: no further start


def locked_out(cfg, chat_busy, stop_event):
    """What `worker.trainer_main` does when another trainer holds the adapters folder (tests/test_lifecycle.py)."""
    from rlhf_online.lifecycle import TRAINER_LOCKED_EXIT_CODE

    _log_start(cfg)
    raise SystemExit(TRAINER_LOCKED_EXIT_CODE)


def test_a_trainer_refused_by_the_adapters_lock_is_reported_as_such_and_retried(cfg, make_supervisor):
    from rlhf_online.lifecycle import TRAINER_LOCKED_EXIT_CODE

    supervisor = make_supervisor(cfg, locked_out)
    supervisor.start()
    wait_for(lambda: supervisor.status.starts >= 2, 60, what="a retry after the refusal")
    supervisor.stop()
    assert supervisor.status.last_exit_code == TRAINER_LOCKED_EXIT_CODE
    assert "another trainer holds the lock on the adapters folder" in supervisor.status.history[0]


def test_stop_kills_a_trainer_that_does_not_finish(cfg, make_supervisor):
    supervisor = make_supervisor(cfg, ignore_stop)
    supervisor.start()
    wait_for(lambda: starts(cfg), 20, what="the first start")
    process = supervisor._process
    began = time.monotonic()
    supervisor.stop(timeout_s=0.5)
    assert time.monotonic() - began < 5
    assert not process.is_alive() and process.exitcode == -9
    assert not supervisor.status.alive


# ---- the real trainer -------------------------------------------------------------------------------------------

VERSION = re.compile(r"^v\d{4,}$")


def check_adapters_folder(registry, seen: set[str]) -> None:
    """Every vNNNN folder is complete and valid the moment it is visible; anything else is hidden."""
    from rlhf_online.adapters import CorruptAdapterError

    for path in list(registry.root.iterdir()):
        if VERSION.match(path.name):
            if path.name in seen:
                continue
            try:
                registry.validate(path)
            except CorruptAdapterError as exc:
                if path.exists():  # (a folder retired or deleted meanwhile would not count)
                    raise AssertionError(f"half-written version folder visible: {exc}") from exc
            seen.add(path.name)
        else:
            assert path.name.startswith("."), f"unexpected entry in adapters/: {path.name}"


def test_real_trainer_survives_a_kill_and_never_leaves_a_half_written_version(tmp_path, tiny_model_dir):
    from rlhf_online.adapters import AdapterRegistry
    from rlhf_online.config import AppConfig, GateConfig, ModelConfig, PPOConfig, RewardConfig
    from rlhf_online.versions import BASE_VERSION
    from rlhf_online.store import PreferenceStore, store_path
    from rlhf_online.supervisor import TrainerSupervisor

    cfg = AppConfig(data_dir=str(tmp_path / "data"), adapters_dir=str(tmp_path / "adapters"),
                    model=ModelConfig(model=str(tiny_model_dir), lora_r=4, lora_alpha=8),
                    reward=RewardConfig(reward_max_tokens=48),
                    ppo=PPOConfig(ppo_batch_size=2, ppo_minibatch_size=2, ppo_max_new_tokens=6, ppo_epochs=1,
                                  publish_every=1, min_preferences=2),
                    gate=GateConfig(gate=False))  # publishing under a kill is under test, not the release gate
    cfg.data_path.mkdir(parents=True)
    with PreferenceStore(store_path(cfg.data_path)) as store:
        for i, (prompt, a, b) in enumerate([("hello", "I am fine, banana.", "Paris."),
                                            ("Why is the sky blue?", "Rayleigh, banana.", "It is four.")]):
            pair = store.record_pair(conversation_id=f"c{i}", turn=0, messages=[{"role": "user", "content": prompt}],
                                     answer_a=a, answer_b=b, version_a=BASE_VERSION, version_b=BASE_VERSION,
                                     sampling={}, session_id=None, placement=None)
            store.record_vote(pair_id=pair, choice="a", session_id=None)
    registry = AdapterRegistry(cfg.adapters_path)
    seen: set[str] = set()

    def watch_until(condition, timeout_s: float, what: str):
        """Poll the adapters folder as fast as we can while waiting: a reader's view during publishes."""
        def check():
            check_adapters_folder(registry, seen)
            return condition()
        return wait_for(check, timeout_s, interval_s=0.005, what=what)

    supervisor = TrainerSupervisor(cfg, min_backoff_s=0.1, max_backoff_s=0.4)
    supervisor.start()
    try:
        watch_until(lambda: len(seen) >= 2, 90, "the first trainer to publish two versions")
        time.sleep(0.15)  # land the kill somewhere inside a PPO iteration or a publish
        crash(supervisor)
        wait_for(lambda: supervisor.status.starts == 2, 10, what="the restart")
        check_adapters_folder(registry, seen)  # count what the killed trainer published before it died
        before_restart = len(seen)
        watch_until(lambda: len(seen) >= before_restart + 2 and supervisor.status.alive, 90,
                    "the restarted trainer to publish")
        assert supervisor.status.starts == 2
        assert supervisor.status.last_exit_code == -9
    finally:
        supervisor.stop(timeout_s=20)
    check_adapters_folder(registry, seen)

    versions = registry.versions()
    names = [v.name for v in versions]
    assert names == [f"v{i:04d}" for i in range(1, len(names) + 1)]
    # The restarted trainer resumed from the newest version: every version builds on the one before it.
    assert [v.meta["parent"] for v in versions] == [BASE_VERSION] + names[:-1]
    assert [v.meta["ppo_iteration"] for v in versions] == list(range(1, len(names) + 1))
    assert not [p for p in registry.root.iterdir() if ".tmp" in p.name]  # the restart cleaned any leftovers
    with PreferenceStore(store_path(cfg.data_path)) as store:
        reward_steps = [m.step for m in store.latest_metrics("reward")]
    # No reward checkpoint yet when it was killed (one is written every 10 pairs): the restart relearned both.
    assert reward_steps == [1, 2, 1, 2]
    assert (cfg.data_path / "reward_model.safetensors").exists()  # the clean stop checkpointed the reward model


def test_a_trainer_killed_while_checking_for_stop_cannot_hang_the_next_one_or_the_app():
    """With a multiprocessing.Event this hung the suite: a killed trainer left the Event's lock held, and the app's
    `set()` and the restarted trainer's `is_set()` waited on it forever."""
    context = multiprocessing.get_context("spawn")
    flag = StopFlag(context)
    for _ in range(2):
        killed = context.Process(target=poll_stop_flag, args=(flag,), daemon=True)
        killed.start()
        time.sleep(1.0)  # well into its loop
        killed.kill()
        killed.join(5)
    survivor = context.Process(target=poll_stop_flag, args=(flag,), daemon=True)
    survivor.start()
    time.sleep(1.0)
    began = time.monotonic()
    flag.set()
    survivor.join(10)
    assert time.monotonic() - began < 10 and survivor.exitcode == 0
    assert flag.wait(0.0)


def test_stop_flag_wait_returns_after_its_timeout_when_nobody_asks_to_stop():
    flag = StopFlag()
    began = time.monotonic()
    assert flag.wait(0.2) is False and 0.2 <= time.monotonic() - began < 1.0
    threading.Timer(0.1, flag.set).start()
    assert flag.wait(5.0) is True
