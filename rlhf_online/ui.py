"""The Gradio app: chat, compare two answers labelled only A and B, vote, and watch training in a side panel.

With `admin_ui` (the admin panel), `ui_chat` (the chat tab's layout and controls) and `ui_learning` (the timeline
and How-it-works tabs), the only modules that import Gradio. Every handler is a module-level function taking
`services` (bound with functools.partial) plus its inputs and returning plain values, so it can be tested without a
browser.

Named API endpoints (gradio_client), all also usable by benchmarks:

- ``/chat`` (conversation_id: str, "" for a new conversation; message: str)
  -> (conversation_id: str, pair_token: str, answer_a: str, answer_b: str). Streams; intermediate updates carry
  pair_token "", the final one the stored pair's token (``Client.predict`` returns the final one).
- ``/vote`` (pair_token: str, choice: "a" | "b" | "tie" | "both_bad", better_answer: str, "" for none)
  -> (vote_id: int, version_a: str, version_b: str). A repeated vote on a pair is recorded once; the
  first vote's receipt comes back again.

A pair token is unguessable and works only in the session (browser tab, or ``gradio_client.Client``) that the pair
was shown to; conversation ids likewise belong to the session that started them.
- ``/regenerate`` (conversation_id: str) -> like ``/chat``: a fresh pair for the message awaiting a vote.
- ``/stats`` () -> dict: ``PreferenceStore.counts()`` (pairs_shown, votes by choice, demonstrations,
  preferences by source), plus ``swaps`` (adapter versions hot-loaded since start), ``serving``, ``trainer`` and
  ``conversations_open`` (conversations held in memory).

Anyone may chat and vote, within the limits of ``limits.Limits``. Admin actions (pause, rollback, delete, export,
reset, training settings...) live in ``admin_ui`` and check the admin token on the server in every handler.

Bad input raises ``gr.Error`` with a message a person can act on; nothing else breaks. On the page the chat tab
shows that message as a toast and leaves everything on screen as it was (``_toast_errors``).
"""

import contextlib
import functools
import inspect
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import gradio as gr
import pandas as pd

from rlhf_online import dashboard, ui_learning
from rlhf_online.admin_ui import build_admin_panel, shown_constitution, shown_feedback_mode
from rlhf_online.ui_chat import (PAGE_CSS, PAGE_HEAD, VOTE_BUTTONS, VOTE_KEYS, ChatControls,  # noqa: F401 (re-exported)
                                 build_chat, controls_ui, typed_text_limit)
from rlhf_online.arena import MAX_TOKEN_CHARS, EmptyMessageError
from rlhf_online.limits import LimitExceededError, client_key, trusted_proxy_count
from rlhf_online.store import StoreWriteError, UnknownPairError
from rlhf_online.versions import BASE_VERSION
from rlhf_online.worker import ACTIVITY_KEY, PAUSED_KEY

log = logging.getLogger(__name__)

REFRESH_S = 3.0
VERSION_CHECK_S = 4.0  # how often a page looks for a newly served version to announce in its chat
WIDE_SCREEN_PX = 1100  # the training panel starts open on screens at least this wide


@dataclass(frozen=True)
class SessionState:
    """One browser tab's place in the arena; the conversation itself lives in the Arena, the votes in SQLite."""

    session_id: str = ""
    conversation_id: str = ""
    pair_token: str | None = None  # the pair on screen, awaiting a vote
    answers: tuple[str, str] = ("", "")


def _ensure_session(state: SessionState | None) -> SessionState:
    state = state or SessionState()
    return state if state.session_id else replace(state, session_id=uuid.uuid4().hex)


@contextlib.contextmanager
def _friendly_errors() -> Iterator[None]:
    """Turn service errors into gr.Error messages; the page stays usable."""
    try:
        yield
    except EmptyMessageError as error:
        raise gr.Error(str(error), title="Nothing to send", print_exception=False) from error
    except LimitExceededError as error:
        raise gr.Error(str(error), title="Slow down", print_exception=False) from error
    except UnknownPairError as error:
        raise gr.Error(f"Unknown answer pair ({error}). You can vote only on answers shown to you; reload the page "
                       "and try again.", title="Unknown pair", print_exception=False) from error
    except StoreWriteError as error:
        # logged, not printed by Gradio: logging survives a full disk under its own file, Gradio's print does not
        log.error("%s", error)
        raise gr.Error(f"{error}. Nothing was saved; please try again in a moment.", title="Not saved",
                       print_exception=False) from error
    except ValueError as error:  # e.g. an invalid choice
        raise gr.Error(str(error), title="Invalid input", print_exception=False) from error


def _parse_pair_token(pair_token) -> str:
    """A pair token as /chat returned it; anything else (a row id, a number, a long string) names no pair."""
    if not isinstance(pair_token, str) or not 0 < len(pair_token.strip()) <= MAX_TOKEN_CHARS:
        raise gr.Error(f"Unknown answer pair ({str(pair_token)[:40]!r} is not a pair token from /chat). Reload the "
                       "page and try again.", title="Unknown pair", print_exception=False)
    return pair_token.strip()


def _client(request: gr.Request | None, services=None) -> str | None:
    """The visitor's address for the per-client limits; None for direct calls (tests, no web request)."""
    if request is None:
        return None
    host = request.client.host if request.client is not None else None
    proxies = trusted_proxy_count(services.cfg.limits, os.environ) if services is not None else 0
    return client_key(host, dict(request.headers), proxies)


# ---- chat tab handlers (outputs: state, chatbot, answer A, answer B, status, better-answer box, message) --------

def _history(services, state: SessionState, pending: str | None = None,
             notices: dashboard.ServingNotices | None = None) -> list[dict]:
    """The settled conversation for gr.Chatbot (messages format), plus the message awaiting a vote, with the
    "new version" notices where they happened. Only the session that started a conversation sees it."""
    conversation = services.arena.find(state.conversation_id, state.session_id)
    if conversation is None:
        return []
    shown = [{"role": m["role"], "content": m["content"]} for m in conversation.history
             if m.get("role") in ("user", "assistant")]
    pending = pending if pending is not None else conversation.pending_message
    shown += [{"role": "user", "content": pending}] if pending else []
    return notices.interleave(state.conversation_id, shown) if notices is not None else shown


def _version_meta(services, version: str) -> dict | None:
    """A published version's meta.json (a small file; the registry's full validation loads the weights)."""
    if version == BASE_VERSION:
        return None
    try:
        return json.loads((services.cfg.adapters_path / version / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _note_new_version(services, notices: dashboard.ServingNotices | None, state: SessionState) -> bool:
    """Add a chat notice if a newer version serves this conversation than when it last looked."""
    if notices is None or not state.conversation_id:
        return False
    serving, previous = services.live.newest_pair()
    position = len(_history(services, state))
    return notices.check(state.conversation_id, serving, position, lambda before: dashboard.new_version_notice(
        serving, _version_meta(services, serving), before))


def check_new_version_ui(services, notices: dashboard.ServingNotices, state: SessionState | None):
    """Timer: show the notice in this page's chat as soon as a new version starts serving."""
    if state is not None and _note_new_version(services, notices, state):
        return _history(services, state, notices=notices)
    return gr.skip()


def _stream_turn(services, state: SessionState, updates: Iterator,
                 notices: dashboard.ServingNotices | None = None) -> Iterator[tuple]:
    state = replace(state, pair_token=None, answers=("", ""))
    cleared = False  # empty the message box once, so a message typed while answers stream is kept
    with _friendly_errors():
        for update in updates:
            state = replace(state, conversation_id=update.conversation_id)
            if not cleared:  # a new version may serve this turn (a new conversation: remember which)
                _note_new_version(services, notices, state)
            status = update.notice or ("" if update.done else "Writing two answers…")
            if update.done:
                state = replace(state, pair_token=update.pair_token, answers=(update.answer_a, update.answer_b))
                status = " ".join(filter(None, [update.notice, "Which answer is better?"]))
            yield (state, _history(services, state, notices=notices), update.answer_a,
                   update.answer_b, status, update.answer_a if update.done else gr.skip(), gr.skip() if cleared else "")
            cleared = True


def chat_ui(services, state: SessionState, message: str, request: gr.Request = None, *,
            notices: dashboard.ServingNotices | None = None) -> Iterator[tuple]:
    """Send a message and stream a new pair of answers."""
    state = _ensure_session(state)
    yield from _stream_turn(services, state, services.arena.chat(state.conversation_id, message, state.session_id,
                                                                 _client(request, services)), notices)


def regenerate_ui(services, state: SessionState, request: gr.Request = None, *,
                  notices: dashboard.ServingNotices | None = None) -> Iterator[tuple]:
    """Sample a fresh pair for the message awaiting a vote (the old pair stays stored, unvoted)."""
    state = _ensure_session(state)
    yield from _stream_turn(services, state, services.arena.regenerate(state.conversation_id, state.session_id,
                                                                       _client(request, services)), notices)


def new_conversation_ui(services, state: SessionState) -> tuple:
    """Forget the conversation on screen; the next message starts a new one (nothing is created until then, so
    this cannot be used to fill the server's conversation cache)."""
    state = replace(_ensure_session(state), conversation_id="", pair_token=None, answers=("", ""))
    return state, [], "", "", "New conversation: type a message.", "", ""


def vote_ui(services, choice: str, state: SessionState, better_answer: str = "",
            request: gr.Request = None, *, notices: dashboard.ServingNotices | None = None) -> tuple:
    """Record a vote on the pair shown, reveal which versions wrote it, and continue the conversation.

    The four vote buttons bind `choice` with functools.partial; "Submit better answer" passes the radio's choice.
    """
    state = _ensure_session(state)
    if not state.pair_token:
        raise gr.Error("There are no answers to vote on yet: send a message first.", title="Nothing to vote on",
                       print_exception=False)
    with _friendly_errors():  # an invalid choice too: the arena checks it
        receipt = services.arena.vote(state.pair_token, choice, better_answer, state.session_id,
                                      _client(request, services))
    reveal = dashboard.reveal_markdown(receipt.vote_id, receipt.version_a, receipt.version_b, receipt.duplicate,
                                       receipt.pair.reward_a, receipt.pair.reward_b)
    state = replace(state, pair_token=None, answers=("", ""))
    return state, _history(services, state, notices=notices), "", "", reveal, "", gr.skip()


def refresh_status(services) -> str:
    """The panel's first line: which version serves since when, from how many votes, the reward model's recent
    accuracy, and what the trainer is doing now."""
    store = services.store
    serving = services.live.newest_pair()[0]
    try:
        activity = json.loads(store.get_control(ACTIVITY_KEY) or "null")
    except ValueError:
        activity = None
    return dashboard.status_line(serving, _version_meta(services, serving), store.latest_metrics("reward", 1),
                                 activity if isinstance(activity, dict) else None, services.supervisor is not None,
                                 store.get_control(PAUSED_KEY, "0") == "1", time.time())


# ---- API endpoints ----------------------------------------------------------------------------------------------

def api_chat(services, conversation_id: str, message: str, session_id: str = "api",
             client: str | None = None) -> Iterator[tuple]:
    with _friendly_errors():
        for update in services.arena.chat(conversation_id or None, message, session_id, client):
            yield (update.conversation_id, update.pair_token if update.done else "", update.answer_a, update.answer_b)


def api_regenerate(services, conversation_id: str, session_id: str = "api",
                   client: str | None = None) -> Iterator[tuple]:
    with _friendly_errors():
        for update in services.arena.regenerate(conversation_id, session_id, client):
            yield (update.conversation_id, update.pair_token if update.done else "", update.answer_a, update.answer_b)


def api_vote(services, pair_token, choice: str, better_answer: str = "", session_id: str = "api",
             client: str | None = None) -> tuple:
    pair_token = _parse_pair_token(pair_token)
    with _friendly_errors():
        receipt = services.arena.vote(pair_token, choice, better_answer or None, session_id, client)
    return receipt.vote_id, receipt.version_a, receipt.version_b


def api_stats(services) -> dict:
    """Counts, plus what a load test needs to see the app learning under it: swaps and the trainer's state."""
    status = services.supervisor.status if services.supervisor is not None else None
    return {**services.store.counts(), "swaps": len(services.live.swaps), "serving": list(services.live.loaded),
            "conversations_open": services.arena.open_conversations,
            "trainer": None if status is None else {"alive": status.alive, "starts": status.starts}}


# ---- side panel -------------------------------------------------------------------------------------------------

def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns)


def refresh_dashboard(services) -> tuple:
    """Counts, metrics, trainer status, versions, plots and the reward-hacking warning, for the Timer."""
    store = services.store
    reward_metrics, ppo_metrics = store.latest_metrics("reward", 500), store.latest_metrics("ppo", 500)
    win_rates = store.version_win_rates()
    infos = services.registry.versions()  # cheap: the registry validates each version once
    paused = store.get_control(PAUSED_KEY, "0") == "1"
    status = services.supervisor.status if services.supervisor is not None else None
    warning = dashboard.reward_hacking_warning(ppo_metrics, win_rates)
    ppo = _frame(dashboard.ppo_curves(ppo_metrics), dashboard.PPO_COLUMNS)
    return (dashboard.counts_markdown(store.counts()) + "\n\n" + _feedback_summary(services),
            "\n\n".join([dashboard.reward_markdown(reward_metrics, ppo_metrics, store.latest_scored_vote()),
                         dashboard.kl_budget_markdown(ppo_metrics),
                         dashboard.gate_markdown(store.latest_metrics("gate", 50))]),
            dashboard.trainer_markdown(status, paused, list(services.live.loaded)),
            dashboard.versions_markdown(infos),
            gr.update(value=warning or "", visible=warning is not None),
            ppo, ppo, ppo,
            _frame(dashboard.reward_curve(reward_metrics), dashboard.REWARD_COLUMNS),
            _frame(dashboard.win_rate_rows(win_rates), dashboard.WIN_COLUMNS),
            gr.update(choices=[BASE_VERSION] + [info.name for info in infos]))


def _feedback_summary(services) -> str:
    constitution = shown_constitution(services)
    return dashboard.feedback_markdown(services.store.feedback_counts(), shown_feedback_mode(services),
                                       constitution.version if constitution else None)


# ---- layout -----------------------------------------------------------------------------------------------------

def _typed_api(services):
    """gr.api derives each endpoint's schema from type hints, so the partials get thin typed wrappers."""
    def chat(conversation_id: str, message: str, request: gr.Request) -> tuple[str, str, str, str]:
        yield from api_chat(services, conversation_id, message, f"api:{request.session_hash}",
                            _client(request, services))

    def regenerate(conversation_id: str, request: gr.Request) -> tuple[str, str, str, str]:
        yield from api_regenerate(services, conversation_id, f"api:{request.session_hash}",
                                  _client(request, services))

    def vote(pair_token: str, choice: str, better_answer: str, request: gr.Request) -> tuple[int, str, str]:
        return api_vote(services, pair_token, choice, better_answer, f"api:{request.session_hash}",
                        _client(request, services))

    def stats() -> dict:
        return api_stats(services)

    for fn in (chat, regenerate, vote, stats):
        gr.api(fn, api_name=fn.__name__, concurrency_id="model" if fn in (chat, regenerate) else None)


def build_app(services) -> gr.Blocks:
    """The page. Launch it with `css=PAGE_CSS, head=PAGE_HEAD` (Gradio 6 takes them in `launch`)."""
    bind = functools.partial
    private = {"api_visibility": "private"}
    notices = dashboard.ServingNotices()
    # delete_cache: Gradio copies every file it serves (the admin's exports) into its cache and keeps them
    # forever otherwise; this removes copies older than 10 minutes, every 10 minutes, and all of them at shutdown
    with gr.Blocks(title="rlhf_online: chat, vote, watch it learn", delete_cache=(600, 600)) as demo:
        state = gr.State(SessionState())
        gr.Markdown("### Chat, pick the better answer, watch the model learn from your votes\n"
                    "Two model versions answer each message (sides shuffled: you see only **A** and **B**). Your "
                    "vote trains a reward model, which trains the chat model in the background: the **Training** "
                    "panel shows it happen, the **Learning timeline** shows what changed.")
        if services.training_notice:
            gr.Markdown(f"**Note:** {services.training_notice}")
        with gr.Tabs() as tabs:
            with gr.Tab("Chat", id="chat"):
                chat = build_chat(typed_text_limit(services.cfg.limits.max_request_kb))
            with gr.Tab("Learning timeline", id="timeline") as timeline_tab:
                timeline_html, timeline_refresh = ui_learning.build_timeline_tab()
            with gr.Tab("How it works", id="how") as how_tab:
                how, how_accuracy, how_reward, how_kl = ui_learning.build_how_tab()
        learning = ui_learning.LearningTabs(timeline_html, timeline_refresh, how, how_accuracy, how_reward, how_kl,
                                            gr.Timer(ui_learning.HOW_REFRESH_S, active=False))

        with gr.Sidebar(label="Training", open=True, position="right", width=440) as sidebar:
            status_md = gr.Markdown(elem_id="status-line")
            warning = gr.Markdown(visible=False)
            counts_md, reward_md, trainer_md = gr.Markdown(), gr.Markdown(), gr.Markdown()
            reward_plot = ui_learning.curve_plot(x="iteration", y="mean_score", title="Mean reward per PPO iteration")
            kl_plot = ui_learning.curve_plot(x="iteration", y="kl", title="KL to the reference policy")
            length_plot = ui_learning.curve_plot(x="iteration", y="mean_length", title="Mean answer length (tokens)")
            accuracy_plot = ui_learning.curve_plot(x="pairs", y="accuracy", color="series", y_lim=[0, 1],
                                                   title="Reward-model accuracy vs pairs learned")
            win_plot = gr.BarPlot(x="matchup", y="win_rate", y_lim=[0, 1], title="Human win rate: newer vs older")
            versions_md = gr.Markdown()
            admin = build_admin_panel(services)
        timer = gr.Timer(REFRESH_S, active=True)  # ticks only while the panel is open
        version_timer = gr.Timer(VERSION_CHECK_S)
        screen_width = gr.Number(visible=False)

        _wire_chat(services, notices, state, chat)
        version_timer.tick(bind(check_new_version_ui, services, notices), [state], chat.chatbot,
                           show_progress="hidden", concurrency_id="dashboard", **private)

        panel = [counts_md, reward_md, trainer_md, versions_md, warning, reward_plot, kl_plot, length_plot,
                 accuracy_plot, win_plot, admin.rollback_to]
        refresh = bind(refresh_dashboard, services)
        status = bind(refresh_status, services)
        for tick in (timer.tick, demo.load):
            tick(refresh, None, panel, show_progress="hidden", concurrency_id="dashboard", **private)
            tick(status, None, status_md, show_progress="hidden", concurrency_id="dashboard", **private)
        # open on wide screens only: on a phone the panel would cover the chat
        demo.load(lambda width: (gr.Sidebar(open=(width or 0) >= WIDE_SCREEN_PX),
                                 gr.Timer(active=(width or 0) >= WIDE_SCREEN_PX)),
                  screen_width, [sidebar, timer], js="() => window.innerWidth", **private)
        sidebar.expand(lambda: gr.Timer(active=True), None, timer, **private).then(
            refresh, None, panel, show_progress="hidden", **private)
        sidebar.collapse(lambda: gr.Timer(active=False), None, timer, **private)
        ui_learning.wire(services, learning, tabs, timeline_tab, how_tab)
        _typed_api(services)
    return demo


def _toast_errors(fn: Callable, outputs: int) -> Callable:
    """The chat tab's handler `fn`, with a gr.Error it raises shown as a toast and its `outputs` left as they were.

    Why: raised out of an event, a gr.Error makes Gradio stamp "Error" over every output box (hiding the two answers
    a person was about to vote on, after a vote that could not be saved) and, in Gradio 6.31's front end, skips the
    `.then()` that gives the buttons back: one empty Send left the Send button disabled. The handlers keep raising
    (the API endpoints and the tests rely on it); only the page turns the error into a notice. A notice after some
    streamed updates keeps those updates: the state they carried has no pair to vote on until one is stored.
    """
    def notice(error: gr.Error) -> tuple:
        gr.Warning(error.message, title=getattr(error, "title", None) or "Warning")
        return (gr.skip(),) * outputs

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streamed(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error as error:
                yield notice(error)
        return streamed

    @functools.wraps(fn)
    def called(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as error:
            return notice(error)
    return called


def _wire_chat(services, notices: dashboard.ServingNotices, state: gr.State, chat: ChatControls) -> None:
    """Each action first disables every control (at once, without queueing), runs, then sets them from the state:
    after it finished, and also after it failed (Gradio 6.31's front end runs only `.failure()` listeners then)."""
    bind = functools.partial
    private = {"api_visibility": "private"}
    quiet = {"show_progress": "hidden", **private}
    turn_outputs = [state, chat.chatbot, chat.answer_a, chat.answer_b, chat.status, chat.better, chat.message]

    def action(trigger, fn, inputs, **kwargs):
        run = trigger(bind(controls_ui, None, True), None, chat.buttons, queue=False, **quiet).then(
            _toast_errors(fn, len(turn_outputs)), inputs, turn_outputs, **kwargs, **private)
        run.then(controls_ui, [state], chat.buttons, **quiet)
        run.failure(controls_ui, [state], chat.buttons, **quiet)

    for trigger in (chat.send.click, chat.message.submit):
        action(trigger, bind(chat_ui, services, notices=notices), [state, chat.message], concurrency_id="model")
    action(chat.regenerate.click, bind(regenerate_ui, services, notices=notices), [state], concurrency_id="model")
    action(chat.new_chat.click, bind(new_conversation_ui, services), [state])
    for choice, button in chat.vote_buttons:
        action(button.click, bind(vote_ui, services, choice, notices=notices), [state])
    action(chat.submit_better.click, bind(vote_ui, services, notices=notices), [chat.better_choice, state, chat.better])
