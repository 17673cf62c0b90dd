"""Abuse limits: the sliding window, the stored-vote cap on a real SQLite file, client keys, and the Arena."""

import pytest

from rlhf_online.config import LimitsConfig, SamplingConfig
from rlhf_online.limits import (LimitExceededError, Limits, SessionVoteCounter, SlidingWindowLimiter, client_key,
                                trusted_proxy_count)
from rlhf_online.store import PreferenceStore


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_sliding_window_allows_the_limit_then_waits_for_the_oldest_event_to_expire():
    clock = Clock()
    limiter = SlidingWindowLimiter(3, window_s=60, clock=clock)
    for _ in range(3):
        assert limiter.retry_after("s") == 0
        limiter.record("s")
        clock.now += 10
    assert limiter.retry_after("s") == pytest.approx(30)  # the first event (t=1000) expires at t=1060
    assert limiter.retry_after("other") == 0  # keys are independent
    clock.now = 1060.0
    assert limiter.retry_after("s") == 0


def test_zero_means_unlimited():
    limiter = SlidingWindowLimiter(0)
    for _ in range(1000):
        limiter.record("s")
    assert limiter.retry_after("s") == 0


def limits(clock=None, count=None, **overrides):
    return Limits(LimitsConfig(**overrides), count, clock=clock or Clock())


def test_session_vote_limit_names_the_limit_and_the_wait():
    checker = limits(votes_per_minute=2, client_votes_per_minute=0)
    checker.check_vote("s1", "1.2.3.4")
    checker.check_vote("s1", "1.2.3.4")
    with pytest.raises(LimitExceededError, match=r"Too many votes from this session: at most 2 per minute\. "
                                                 r"Try again in 60 s"):
        checker.check_vote("s1", "1.2.3.4")
    checker.check_vote("s2", "1.2.3.4")  # another session is not affected


def test_client_limit_catches_a_script_rotating_sessions():
    checker = limits(votes_per_minute=100, client_votes_per_minute=3)
    for i in range(3):
        checker.check_vote(f"session-{i}", "6.6.6.6")
    with pytest.raises(LimitExceededError, match="from your address"):
        checker.check_vote("session-99", "6.6.6.6")
    checker.check_vote("session-99", "7.7.7.7")


def test_a_refused_request_does_not_use_up_the_other_limit():
    clock = Clock()
    checker = limits(clock, chats_per_minute=1, client_chats_per_minute=2)
    checker.check_chat("s1", "ip")
    with pytest.raises(LimitExceededError):
        checker.check_chat("s1", "ip")  # refused by the session limit: must not count against the client
    checker.check_chat("s2", "ip")
    with pytest.raises(LimitExceededError, match="your address"):
        checker.check_chat("s3", "ip")


def test_internal_callers_without_keys_are_not_limited():
    checker = limits(votes_per_minute=1, client_votes_per_minute=1, max_votes_per_session=1, count=lambda s: 99)
    for _ in range(5):
        checker.check_vote("", "")


def record_votes(store, session_id, n, source="human"):
    for i in range(n):
        pair = store.record_pair(conversation_id="c", turn=i, messages=[{"role": "user", "content": f"q{i}"}],
                                 answer_a="x", answer_b="y", version_a="base", version_b="base", sampling={},
                                 session_id=session_id, placement=None)
        store.record_vote(pair_id=pair, choice="a", session_id=session_id, source=source)


def test_stored_vote_cap_counts_the_sessions_votes_in_the_database(tmp_path):
    path = tmp_path / "preferences.sqlite"
    with PreferenceStore(path) as store:
        record_votes(store, "flooder", 3)
        record_votes(store, "someone-else", 5)
        counter = SessionVoteCounter(path)
        checker = limits(count=counter, max_votes_per_session=3, votes_per_minute=0, client_votes_per_minute=0)
        assert counter("flooder") == 3 and counter("someone-else") == 5 and counter("new") == 0
        with pytest.raises(LimitExceededError, match="already cast 3 votes"):
            checker.check_vote("flooder", "ip")
        checker.check_vote("new", "ip")
        record_votes(store, "new", 1)
        assert counter("new") == 1  # sees votes committed after it opened
        counter.close()


@pytest.mark.parametrize("host, headers, proxies, expected", [
    ("93.184.216.34", {}, 0, "93.184.216.34"),
    ("93.184.216.34", {"x-forwarded-for": "1.1.1.1"}, 0, "93.184.216.34"),  # no proxy of ours: header ignored
    ("127.0.0.1", {"x-forwarded-for": "198.51.100.7"}, 0, "127.0.0.1"),
    ("10.0.0.2", {"x-forwarded-for": "198.51.100.7"}, 1, "198.51.100.7"),  # behind one proxy (Spaces)
    # a client forging entries: the proxy appends the real address last, so the forged ones are ignored
    ("10.0.0.2", {"x-forwarded-for": "1.2.3.4, 5.6.7.8, 198.51.100.7"}, 1, "198.51.100.7"),
    ("10.0.0.3", {"x-forwarded-for": "1.2.3.4, 198.51.100.7, 10.0.0.2"}, 2, "198.51.100.7"),  # two proxies
    ("10.0.0.2", {}, 1, "10.0.0.2"),  # no header at all: the peer
    (None, {}, 0, "unknown"),
])
def test_client_key_is_the_right_most_entry_no_trusted_proxy_wrote(host, headers, proxies, expected):
    assert client_key(host, headers, proxies) == expected


def test_trusted_proxies_auto_means_one_on_spaces():
    assert trusted_proxy_count(LimitsConfig(), {}) == 0
    assert trusted_proxy_count(LimitsConfig(), {"SPACE_ID": "me/app"}) == 1
    assert trusted_proxy_count(LimitsConfig(trusted_proxies=2), {"SPACE_ID": "me/app"}) == 2


def test_a_new_session_per_request_does_not_reset_the_limits():
    """Issue 13 #3: per-session limits keyed on a client-chosen session alone were reset by a fresh session."""
    checker = limits(votes_per_minute=2, chats_per_minute=2, client_sessions_per_hour=3, client_votes_per_minute=0,
                     client_chats_per_minute=0)
    for i in range(3):
        checker.check_chat(f"rotated-{i}", "6.6.6.6")
    with pytest.raises(LimitExceededError, match="Too many new sessions from your address: at most 3 per hour"):
        checker.check_chat("rotated-3", "6.6.6.6")
    with pytest.raises(LimitExceededError, match="new sessions"):
        checker.check_vote("rotated-4", "6.6.6.6")
    checker.check_chat("rotated-0", "6.6.6.6")  # sessions it already has go on, within their own limits
    with pytest.raises(LimitExceededError, match="this session"):
        checker.check_chat("rotated-0", "6.6.6.6")
    checker.check_chat("someone", "7.7.7.7")  # other addresses are not affected
    refused_first = limits(chats_per_minute=1, client_sessions_per_hour=1)
    with pytest.raises(LimitExceededError):
        refused_first.check_chat("s", "ip") or refused_first.check_chat("s", "ip")
    refused_first.check_vote("s", "ip")  # a known session, refused by another limit, is still known


def test_arena_applies_limits_before_generating_or_storing(tiny_model_dir, tmp_path):
    from rlhf_online.arena import Arena
    from rlhf_online.generation import Generator
    from rlhf_online.models import load_base_model, load_tokenizer

    sampling = SamplingConfig(max_new_tokens=2)
    generator = Generator(load_base_model(str(tiny_model_dir)).model, load_tokenizer(str(tiny_model_dir)), sampling)
    with PreferenceStore(tmp_path / "preferences.sqlite") as store:
        checker = limits(count=SessionVoteCounter(store.path), chats_per_minute=2, votes_per_minute=1,
                         max_votes_per_session=5)
        arena = Arena(store, generator, sampling, limits=checker)
        first = arena.chat_to_end(None, "hello", "s", client="ip")
        second = arena.chat_to_end(None, "hello again", "s", client="ip")
        with pytest.raises(LimitExceededError):
            arena.chat_to_end(None, "third", "s", client="ip")
        assert store.counts()["pairs_shown"] == 2  # the refused message generated and stored nothing
        open_before = arena.open_conversations
        with pytest.raises(LimitExceededError):  # regenerating is a message too, even with a made-up id
            list(arena.regenerate("made-up", "s", client="ip"))
        assert arena.open_conversations == open_before
        arena.vote(first.pair_token, "a", session_id="s", client="ip")
        with pytest.raises(LimitExceededError):
            arena.vote(second.pair_token, "b", session_id="s", client="ip")
        assert sum(store.counts()["votes"].values()) == 1
        arena.vote(second.pair_token, "b", session_id="s")  # internal callers (no client) are not limited
        checker.close()


def test_admin_token_and_hf_token_come_only_from_the_environment():
    from rlhf_online.config import build_parser, load_config

    cfg = load_config([], environ={"RLHF_ADMIN_TOKEN": "adm1n-S3CRET", "HF_TOKEN": "hf_S3CRET",
                                   "RLHF_VOTES_PER_MINUTE": "7"})
    assert cfg.limits.admin_token == "adm1n-S3CRET" and cfg.hub.hf_token == "hf_S3CRET"
    assert cfg.limits.votes_per_minute == 7  # the limits are ordinary settings, visible in config
    assert load_config([], environ={"ADMIN_TOKEN": "other"}).limits.admin_token == "other"
    assert "S3CRET" not in repr(cfg)  # logging a config never prints a secret
    help_text = build_parser(cfg).format_help()
    assert "S3CRET" not in help_text and "--admin-token" not in help_text and "RLHF_ADMIN_TOKEN" in help_text
    with pytest.raises(SystemExit):  # no flag: a token on the command line would show in `ps`
        load_config(["--admin-token", "x"], environ={})
