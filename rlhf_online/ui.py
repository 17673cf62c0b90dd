"""The Gradio app: chat, compare two answers labelled only A and B, vote, and watch training in a side panel.

The only module that imports Gradio. Every handler is a module-level function taking `services` (bound with
functools.partial) plus its inputs and returning plain values, so it can be tested without a browser.

Named API endpoints (gradio_client), all also usable by benchmarks:

- ``/chat`` (conversation_id: str, "" for a new conversation; message: str)
  -> (conversation_id: str, pair_id: int, answer_a: str, answer_b: str). Streams; intermediate updates carry
  pair_id -1, the final one the stored pair's id (``Client.predict`` returns the final one).
- ``/vote`` (pair_id: int, choice: "a" | "b" | "tie" | "both_bad", better_answer: str, "" for none)
  -> (vote_id: int, version_a: str, version_b: str). A repeated vote on a pair is recorded once; the
  first vote's receipt comes back again.
- ``/regenerate`` (conversation_id: str) -> like ``/chat``: a fresh pair for the message awaiting a vote.
- ``/stats`` () -> dict: ``PreferenceStore.counts()`` (pairs_shown, votes by choice, demonstrations,
  preferences by source), plus ``swaps`` (adapter versions hot-loaded since start), ``serving`` and ``trainer``.

Anyone may chat and vote, within the limits of ``limits.Limits``. Admin actions (pause, rollback, delete, export,
reset, training settings...) check the admin token on the server in every handler; the page only hides them.

Bad input raises ``gr.Error`` with a message a person can act on; nothing else breaks.
"""

import contextlib
import functools
import hmac
import ipaddress
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr
import pandas as pd

from rlhf_online import dashboard
from rlhf_online.arena import CHOICES, MAX_ROW_ID, EmptyMessageError
from rlhf_online.export import export_trl
from rlhf_online.generation import BASE_VERSION
from rlhf_online.judge import current_feedback_mode, load_constitution, save_constitution, set_feedback_mode
from rlhf_online.hardware import on_spaces
from rlhf_online.limits import LimitExceededError, client_key
from rlhf_online.store import StoreWriteError, UnknownPairError
from rlhf_online.worker import PAUSED_KEY, TRAINING_SETTINGS, TRAINING_SETTINGS_KEY

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "RLHF_ADMIN_TOKEN"
RESET_CONFIRMATION = "RESET"
REFRESH_S = 3.0
VOTE_BUTTONS = (("a", "A is better"), ("b", "B is better"), ("tie", "Tie"), ("both_bad", "Both are bad"))


@dataclass(frozen=True)
class SessionState:
    """One browser tab's place in the arena; the conversation itself lives in the Arena, the votes in SQLite."""

    session_id: str = ""
    conversation_id: str = ""
    pair_id: int | None = None
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
        raise gr.Error(f"Unknown answer pair ({error}). Reload the page and try again.", title="Unknown pair",
                       print_exception=False) from error
    except StoreWriteError as error:
        # logged, not printed by Gradio: logging survives a full disk under its own file, Gradio's print does not
        log.error("%s", error)
        raise gr.Error(f"{error}. Nothing was saved; please try again in a moment.", title="Not saved",
                       print_exception=False) from error
    except ValueError as error:  # e.g. an invalid choice
        raise gr.Error(str(error), title="Invalid input", print_exception=False) from error


def _parse_pair_id(pair_id) -> int:
    try:
        value = int(pair_id)
        if value != float(pair_id):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise gr.Error(f"pair_id must be an integer, got {str(pair_id)[:40]!r}", title="Invalid input",
                       print_exception=False) from None
    if not 0 < value <= MAX_ROW_ID:
        raise gr.Error(f"Unknown answer pair (no pair with id {value}). Reload the page and try again.",
                       title="Unknown pair", print_exception=False)
    return value


def _client(request: gr.Request | None) -> str | None:
    """The visitor's address for the per-client limits; None for direct calls (tests, no web request)."""
    if request is None:
        return None
    host = request.client.host if request.client is not None else None
    return client_key(host, dict(request.headers))


def _parse_choice(choice) -> str:
    key = str(choice or "").strip().lower()
    if key not in CHOICES:
        raise gr.Error(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}", title="Invalid input",
                       print_exception=False)
    return key


# ---- chat tab handlers (outputs: state, chatbot, answer A, answer B, status, better-answer box, message) --------

def _history(services, conversation_id: str, pending: str | None = None) -> list[dict]:
    """The settled conversation for gr.Chatbot (messages format), plus the message awaiting a vote."""
    if not conversation_id:
        return []
    conversation = services.arena.conversation(conversation_id)
    shown = [{"role": m["role"], "content": m["content"]} for m in conversation.history
             if m.get("role") in ("user", "assistant")]
    pending = pending if pending is not None else conversation.pending_message
    return shown + ([{"role": "user", "content": pending}] if pending else [])


def _stream_turn(services, state: SessionState, updates: Iterator) -> Iterator[tuple]:
    state = replace(state, pair_id=None, answers=("", ""))
    cleared = False  # empty the message box once, so a message typed while answers stream is kept
    with _friendly_errors():
        for update in updates:
            state = replace(state, conversation_id=update.conversation_id)
            status = update.notice or ("" if update.done else "Writing two answers…")
            if update.done:
                state = replace(state, pair_id=update.pair_id, answers=(update.answer_a, update.answer_b))
                status = " ".join(filter(None, [update.notice, "Which answer is better?"]))
            yield (state, _history(services, state.conversation_id), update.answer_a, update.answer_b, status,
                   update.answer_a if update.done else gr.skip(), gr.skip() if cleared else "")
            cleared = True


def chat_ui(services, state: SessionState, message: str, request: gr.Request = None) -> Iterator[tuple]:
    """Send a message and stream a new pair of answers."""
    state = _ensure_session(state)
    yield from _stream_turn(services, state, services.arena.chat(state.conversation_id, message, state.session_id,
                                                                 _client(request)))


def regenerate_ui(services, state: SessionState, request: gr.Request = None) -> Iterator[tuple]:
    """Sample a fresh pair for the message awaiting a vote (the old pair stays stored, unvoted)."""
    state = _ensure_session(state)
    yield from _stream_turn(services, state, services.arena.regenerate(state.conversation_id, state.session_id,
                                                                       _client(request)))


def new_conversation_ui(services, state: SessionState) -> tuple:
    state = replace(_ensure_session(state), conversation_id=services.arena.new_conversation().id, pair_id=None,
                    answers=("", ""))
    return state, [], "", "", "New conversation: type a message.", "", ""


def vote_ui(services, choice: str, state: SessionState, better_answer: str = "",
            request: gr.Request = None) -> tuple:
    """Record a vote on the pair shown, reveal which versions wrote it, and continue the conversation.

    The four vote buttons bind `choice` with functools.partial; "Submit better answer" passes the radio's choice.
    """
    state = _ensure_session(state)
    if state.pair_id is None:
        raise gr.Error("There are no answers to vote on yet: send a message first.", title="Nothing to vote on",
                       print_exception=False)
    choice = _parse_choice(choice)
    with _friendly_errors():
        outcome = services.arena.vote(state.pair_id, choice, better_answer, state.session_id, _client(request))
    pair = services.store.get_pair(outcome.pair_id)
    reveal = dashboard.reveal_markdown(outcome.vote_id, outcome.version_a, outcome.version_b, outcome.duplicate,
                                       pair.reward_a if pair else None, pair.reward_b if pair else None)
    state = replace(state, pair_id=None, answers=("", ""))
    return state, _history(services, state.conversation_id), "", "", reveal, "", gr.skip()


# ---- API endpoints ----------------------------------------------------------------------------------------------

def api_chat(services, conversation_id: str, message: str, session_id: str = "api",
             client: str | None = None) -> Iterator[tuple]:
    with _friendly_errors():
        for update in services.arena.chat(conversation_id or None, message, session_id, client):
            yield (update.conversation_id, update.pair_id if update.done else -1, update.answer_a, update.answer_b)


def api_regenerate(services, conversation_id: str, session_id: str = "api",
                   client: str | None = None) -> Iterator[tuple]:
    with _friendly_errors():
        for update in services.arena.regenerate(conversation_id, session_id, client):
            yield (update.conversation_id, update.pair_id if update.done else -1, update.answer_a, update.answer_b)


def api_vote(services, pair_id, choice: str, better_answer: str = "", session_id: str = "api",
             client: str | None = None) -> tuple:
    pair_id, choice = _parse_pair_id(pair_id), _parse_choice(choice)
    with _friendly_errors():
        outcome = services.arena.vote(pair_id, choice, better_answer or None, session_id, client)
    return outcome.vote_id, outcome.version_a, outcome.version_b


def api_stats(services) -> dict:
    """Counts, plus what a load test needs to see the app learning under it: swaps and the trainer's state."""
    status = services.supervisor.status if services.supervisor is not None else None
    return {**services.store.counts(), "swaps": len(services.live.swaps), "serving": list(services.live.loaded),
            "trainer": None if status is None else {"alive": status.alive, "starts": status.starts}}


# ---- side panel -------------------------------------------------------------------------------------------------

def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns)


def refresh_dashboard(services, versions: dashboard.VersionCache) -> tuple:
    """Counts, metrics, trainer status, versions, plots and the reward-hacking warning, for the Timer."""
    store = services.store
    reward_metrics, ppo_metrics = store.latest_metrics("reward", 500), store.latest_metrics("ppo", 500)
    win_rates = store.version_win_rates()
    infos = versions.versions()
    paused = store.get_control(PAUSED_KEY, "0") == "1"
    status = services.supervisor.status if services.supervisor is not None else None
    warning = dashboard.reward_hacking_warning(ppo_metrics, win_rates)
    ppo = _frame(dashboard.ppo_curves(ppo_metrics), dashboard.PPO_COLUMNS)
    return (dashboard.counts_markdown(store.counts()) + "\n\n" + _feedback_summary(services),
            "\n\n".join([dashboard.reward_markdown(reward_metrics, ppo_metrics), dashboard.kl_budget_markdown(
                ppo_metrics), dashboard.gate_markdown(store.latest_metrics("gate", 50))]),
            dashboard.trainer_markdown(status, paused, list(services.live.loaded)),
            dashboard.versions_markdown(infos),
            gr.update(value=warning or "", visible=warning is not None),
            ppo, ppo, ppo,
            _frame(dashboard.reward_curve(reward_metrics), dashboard.REWARD_COLUMNS),
            _frame(dashboard.win_rate_rows(win_rates), dashboard.WIN_COLUMNS),
            gr.update(choices=[BASE_VERSION] + [info.name for info in infos]))


def _feedback_mode(services) -> str:
    try:
        return current_feedback_mode(services.store, services.cfg.feedback.feedback_mode)
    except ValueError:
        return "human"  # what the trainer falls back to (it logs the bad value)


def _constitution(services):
    try:
        return load_constitution(services.cfg.feedback, services.cfg.data_path)
    except (OSError, ValueError):
        return None


def _feedback_summary(services) -> str:
    constitution = _constitution(services)
    return dashboard.feedback_markdown(services.store.feedback_counts(), _feedback_mode(services),
                                       constitution.version if constitution else None)


def _listens_locally(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _require_admin(services, token: str) -> None:
    """Every admin handler calls this first: the page hiding a button stops nobody who calls the endpoint.

    With a token configured, it is required. Without one, admin actions are open only when the server listens
    on a loopback address outside Spaces: then everyone who can reach it is on this machine (a developer).
    A server reachable from other machines without a token refuses them all, and says how to enable them.
    """
    expected = services.cfg.limits.admin_token
    if expected:
        if not hmac.compare_digest((token or "").encode(), expected.encode()):
            raise gr.Error("Wrong or missing admin token.", title="Not allowed", print_exception=False)
        return
    if not _listens_locally(services.cfg.host) or on_spaces(os.environ):
        raise gr.Error(f"Admin actions are disabled: this server is reachable from other machines and no admin "
                       f"token is set. Set the {ADMIN_TOKEN_ENV} secret (environment variable) and restart.",
                       title="Not allowed", print_exception=False)


def unlock_admin_ui(services, token: str) -> tuple:
    """Show the admin controls once the token checks out (each action checks it again)."""
    _require_admin(services, token)
    return gr.update(visible=True), "Admin actions unlocked on this page."


def set_paused_ui(services, paused: bool, token: str) -> str:
    _require_admin(services, token)
    with _friendly_errors():
        services.store.set_control(PAUSED_KEY, "1" if paused else "0")
    return "Training paused: the trainer stops after its current step." if paused else "Training resumed."


def set_feedback_mode_ui(services, mode: str, token: str) -> str:
    """Switch between human, AI and mixed feedback; the trainer reads the choice at its next step."""
    _require_admin(services, token)
    with _friendly_errors():
        mode = set_feedback_mode(services.store, mode)
    return f"Feedback: {dashboard.FEEDBACK_MODE_LABELS[mode]}. The trainer switches at its next step."


def save_constitution_ui(services, text: str, token: str) -> str:
    """Save the admin's principles (atomically, in the data folder); the judge uses them from its next label."""
    _require_admin(services, token)
    with _friendly_errors():
        try:
            constitution = save_constitution(services.cfg.data_path, text)
        except OSError as error:
            raise gr.Error(f"Could not save the constitution ({error}); the previous one stays in use.",
                           title="Not saved") from error
    return (f"Constitution saved: version `{constitution.version}`, {len(constitution.principles)} listed "
            "principles. New AI labels use it.")


def rollback_ui(services, version: str, token: str) -> str:
    """Retire every version newer than `version`; the server stops serving them, the trainer follows."""
    _require_admin(services, token)
    known = {BASE_VERSION} | {info.name for info in services.registry.versions()}
    if version not in known:
        raise gr.Error(f"Unknown version {version!r}; pick one from the list.", title="Invalid input",
                       print_exception=False)
    retired = services.registry.retire_after(version)
    services.live.refresh()
    if not retired:
        return f"`{version}` is already the newest version; nothing to roll back."
    return f"Rolled back to `{version}`; retired {', '.join(f'`{name}`' for name in retired)}."


def delete_version_ui(services, version: str, token: str) -> str:
    """Delete one published version from disk (a rollback keeps it; this does not). Its number is never reused."""
    _require_admin(services, token)
    known = {info.name for info in services.registry.versions(include_retired=True)}
    if version not in known:
        raise gr.Error(f"Unknown version {version!r}: pick a published version (the base model cannot be "
                       "deleted).", title="Invalid input", print_exception=False)
    services.registry.delete(version)
    services.live.refresh()
    return f"Deleted `{version}`."


def export_ui(services, token: str) -> tuple:
    """A zip of the TRL preference and SFT exports, for download (written to a temporary folder Gradio serves)."""
    _require_admin(services, token)
    folder = Path(tempfile.mkdtemp(prefix="rlhf-export-"))
    summary = export_trl(services.store, folder / "export")
    archive = shutil.make_archive(str(folder / f"rlhf_online-export-{time.strftime('%Y%m%d-%H%M%S')}"), "zip",
                                  folder / "export")
    return archive, summary.describe().capitalize() + "."


def reset_data_ui(services, confirmation: str, token: str) -> str:
    """Start a fresh preference database; the old one is moved aside whole, never deleted."""
    _require_admin(services, token)
    if (confirmation or "").strip() != RESET_CONFIRMATION:
        raise gr.Error(f"Type {RESET_CONFIRMATION} in the box to confirm.", title="Not confirmed",
                       print_exception=False)
    backup = services.reset_data()
    return f"Started a fresh database. The previous data is kept in `{backup}`."


def training_settings_ui(services, token: str, *values) -> str:
    """Store new training settings; the trainer applies them before its next step."""
    _require_admin(services, token)
    settings = {}
    for name, value in zip(TRAINING_SETTINGS, values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise gr.Error(f"{name} must be a number, got {value!r}", title="Invalid input",
                           print_exception=False) from None
        if not 0 <= number < 1e6:
            raise gr.Error(f"{name} must be between 0 and 1e6, got {number}", title="Invalid input",
                           print_exception=False)
        settings[name] = number
    with _friendly_errors():
        services.store.set_control(TRAINING_SETTINGS_KEY, json.dumps(settings))
    return "Saved; the trainer uses " + ", ".join(f"{k} = {v:g}" for k, v in settings.items()) + " from its next step."


# ---- layout -----------------------------------------------------------------------------------------------------

def _typed_api(services):
    """gr.api derives each endpoint's schema from type hints, so the partials get thin typed wrappers."""
    def chat(conversation_id: str, message: str, request: gr.Request) -> tuple[str, int, str, str]:
        yield from api_chat(services, conversation_id, message, f"api:{request.session_hash}", _client(request))

    def regenerate(conversation_id: str, request: gr.Request) -> tuple[str, int, str, str]:
        yield from api_regenerate(services, conversation_id, f"api:{request.session_hash}", _client(request))

    def vote(pair_id: int, choice: str, better_answer: str, request: gr.Request) -> tuple[int, str, str]:
        return api_vote(services, pair_id, choice, better_answer, f"api:{request.session_hash}",
                        _client(request))

    def stats() -> dict:
        return api_stats(services)

    for fn in (chat, regenerate, vote, stats):
        gr.api(fn, api_name=fn.__name__, concurrency_id="model" if fn in (chat, regenerate) else None)


def build_app(services) -> gr.Blocks:
    bind = functools.partial
    private = {"api_visibility": "private"}
    with gr.Blocks(title="rlhf_online: chat, vote, watch it learn") as demo:
        state = gr.State(SessionState())
        gr.Markdown("## Chat, pick the better answer, and watch the model learn from your votes\n"
                    "Two model versions answer each message; their sides are shuffled, so you see only **A** and "
                    "**B**. Your vote trains a reward model, which trains the chat model in the background.")
        if services.training_notice:
            gr.Markdown(f"**Note:** {services.training_notice}")
        chatbot = gr.Chatbot(label="Conversation", height=300, sanitize_html=True, allow_tags=False,
                             feedback_options=None)
        with gr.Row():
            message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                 max_lines=8)
            send = gr.Button("Send", variant="primary", scale=1)
        with gr.Row():  # model output goes in plain textboxes: nothing it writes is rendered as HTML
            answer_a = gr.Textbox(label="A", lines=8, interactive=False, buttons=["copy"])
            answer_b = gr.Textbox(label="B", lines=8, interactive=False, buttons=["copy"])
        with gr.Row():
            vote_buttons = [(choice, gr.Button(label)) for choice, label in VOTE_BUTTONS]
        status = gr.Markdown()
        with gr.Accordion("Write a better answer", open=False):
            better = gr.Textbox(label="Your answer (starts as answer A; edit it)", lines=6)
            better_choice = gr.Radio([(label, choice) for choice, label in VOTE_BUTTONS], value="both_bad",
                                     label="And of the two shown answers")
            submit_better = gr.Button("Submit my answer with the vote", variant="primary")
        with gr.Row():
            regenerate = gr.Button("Regenerate")
            new_chat = gr.Button("New conversation")

        with gr.Sidebar(label="Training", open=False, position="right", width=440) as sidebar:
            warning = gr.Markdown(visible=False)
            counts_md, reward_md, trainer_md = gr.Markdown(), gr.Markdown(), gr.Markdown()
            reward_plot = gr.LinePlot(x="iteration", y="mean_score", title="Mean reward per PPO iteration")
            kl_plot = gr.LinePlot(x="iteration", y="kl", title="KL to the reference policy")
            length_plot = gr.LinePlot(x="iteration", y="mean_length", title="Mean answer length (tokens)")
            accuracy_plot = gr.LinePlot(x="pairs", y="accuracy", color="series", y_lim=[0, 1],
                                        title="Reward-model accuracy vs pairs learned")
            win_plot = gr.BarPlot(x="matchup", y="win_rate", y_lim=[0, 1], title="Human win rate: newer vs older")
            versions_md = gr.Markdown()
            with gr.Accordion("Admin", open=False):
                token = gr.Textbox(label="Admin token", type="password")
                unlock = gr.Button("Unlock admin actions")
                admin_status = gr.Markdown()
                with gr.Group(visible=False) as admin_controls:  # hidden until unlocked; each handler re-checks
                    with gr.Row():
                        pause, resume = gr.Button("Pause training"), gr.Button("Resume training")
                    rollback_to = gr.Dropdown([BASE_VERSION], value=BASE_VERSION, label="Roll back to")
                    rollback = gr.Button("Roll back", variant="stop")
                    feedback_mode = gr.Radio([(label, key) for key, label in dashboard.FEEDBACK_MODE_LABELS.items()],
                                             value=_feedback_mode(services), label="Preferences come from")
                    constitution_box = gr.Textbox(value=getattr(_constitution(services), "text", ""),
                                                  label="Constitution: the principles the AI judge applies", lines=8,
                                                  max_lines=20)
                    save_constitution_button = gr.Button("Save constitution")
                    delete_button = gr.Button("Delete the version selected above", variant="stop")
                    with gr.Row():
                        settings = [gr.Number(getattr(services.cfg.ppo, name), label=name)
                                    for name in TRAINING_SETTINGS]
                    save_settings = gr.Button("Apply training settings")
                    export_button = gr.Button("Export preferences (TRL JSONL + datasets, zip)")
                    export_file = gr.File(label="Export", interactive=False)
                    reset_confirmation = gr.Textbox(label=f"Type {RESET_CONFIRMATION} to start a fresh database "
                                                          "(the old one is kept as a backup)")
                    reset_button = gr.Button("Reset data", variant="stop")
        timer = gr.Timer(REFRESH_S, active=False)  # ticks only while the panel is open

        turn_outputs = [state, chatbot, answer_a, answer_b, status, better, message]
        for trigger in (send.click, message.submit):
            trigger(bind(chat_ui, services), [state, message], turn_outputs, concurrency_id="model", **private)
        regenerate.click(bind(regenerate_ui, services), [state], turn_outputs, concurrency_id="model", **private)
        new_chat.click(bind(new_conversation_ui, services), [state], turn_outputs, **private)
        for choice, button in vote_buttons:
            button.click(bind(vote_ui, services, choice), [state], turn_outputs, **private)
        submit_better.click(bind(vote_ui, services), [better_choice, state, better], turn_outputs, **private)

        panel = [counts_md, reward_md, trainer_md, versions_md, warning, reward_plot, kl_plot, length_plot,
                 accuracy_plot, win_plot, rollback_to]
        refresh = bind(refresh_dashboard, services, dashboard.VersionCache(services.registry))
        timer.tick(refresh, None, panel, show_progress="hidden", concurrency_id="dashboard", **private)
        sidebar.expand(lambda: gr.Timer(active=True), None, timer, **private).then(
            refresh, None, panel, show_progress="hidden", **private)
        sidebar.collapse(lambda: gr.Timer(active=False), None, timer, **private)
        pause.click(bind(set_paused_ui, services, True), [token], admin_status, **private)
        resume.click(bind(set_paused_ui, services, False), [token], admin_status, **private)
        rollback.click(bind(rollback_ui, services), [rollback_to, token], admin_status, **private)
        unlock.click(bind(unlock_admin_ui, services), [token], [admin_controls, admin_status], **private)
        delete_button.click(bind(delete_version_ui, services), [rollback_to, token], admin_status, **private)
        save_settings.click(bind(training_settings_ui, services), [token, *settings], admin_status, **private)
        export_button.click(bind(export_ui, services), [token], [export_file, admin_status], **private)
        reset_button.click(bind(reset_data_ui, services), [reset_confirmation, token], admin_status, **private)
        feedback_mode.input(bind(set_feedback_mode_ui, services), [feedback_mode, token], admin_status, **private)
        save_constitution_button.click(bind(save_constitution_ui, services), [constitution_box, token], admin_status,
                                       **private)
        _typed_api(services)
    return demo
