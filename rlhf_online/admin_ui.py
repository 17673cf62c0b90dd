"""The admin panel: pause and resume training, roll back or delete versions, export, reset, training settings,
AI-feedback mode and constitution.

Its own module because every action here changes what the model learns or deletes data, so each handler checks
the admin token on the server (the page only hides the controls; a hidden event is still callable by anyone who
can reach the server). With `ui.py`, the only modules that import Gradio.
"""

import contextlib
import functools
import hmac
import json
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr

from rlhf_online import dashboard
from rlhf_online.export import export_zip
from rlhf_online.judge import current_feedback_mode, load_constitution, save_constitution, set_feedback_mode
from rlhf_online.store import StoreWriteError
from rlhf_online.versions import BASE_VERSION
from rlhf_online.worker import PAUSED_KEY, TRAINING_SETTINGS, TRAINING_SETTINGS_KEY

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "RLHF_ADMIN_TOKEN"
RESET_CONFIRMATION = "RESET"


@contextlib.contextmanager
def _admin_errors() -> Iterator[None]:
    """A failed write or an invalid value becomes a message in the panel; nothing else breaks."""
    try:
        yield
    except StoreWriteError as error:
        log.error("%s", error)
        raise gr.Error(f"{error}. Nothing was saved; please try again in a moment.", title="Not saved",
                       print_exception=False) from error
    except ValueError as error:
        raise gr.Error(str(error), title="Invalid input", print_exception=False) from error


def shown_feedback_mode(services) -> str:
    """The feedback mode as the page shows it (the admin panel's choice, the side panel's summary)."""
    try:
        return current_feedback_mode(services.store, services.cfg.feedback.feedback_mode)
    except ValueError:
        return "human"  # what the trainer falls back to (it logs the bad value)


def shown_constitution(services):
    """The constitution in use, or None when it cannot be read (the panel then says it is missing)."""
    try:
        return load_constitution(services.cfg.feedback, services.cfg.data_path)
    except (OSError, ValueError):
        return None


def ensure_admin_token(cfg, announce=print) -> str:
    """The admin token: the configured one, or else one generated now and printed once to the console.

    As Jupyter does: a server with no token configured used to allow admin actions when it listened on
    loopback, but a share link, a notebook host that turns sharing on by itself, an SSH tunnel or a reverse proxy
    on the same machine all reach a loopback server. So an admin action always needs a token, and whoever can
    read this process's output (the person who started it) has it. A configured token is never printed.
    """
    if not cfg.limits.admin_token:
        cfg.limits.admin_token = secrets.token_urlsafe(24)
        announce(f"Admin token for this run (generated, as no {ADMIN_TOKEN_ENV} is set; set one to choose your "
                 f"own): {cfg.limits.admin_token}", flush=True)
    return cfg.limits.admin_token


def _require_admin(services, token: str) -> None:
    """Every admin handler calls this first: the page hiding a button stops nobody who calls the endpoint
    (hidden events stay callable by fn_index through Gradio's queue). No configured token means no admin
    action at all (`ensure_admin_token` makes sure the app always has one)."""
    expected = services.cfg.limits.admin_token
    if not expected:
        raise gr.Error(f"Admin actions are disabled: no admin token is set. Set {ADMIN_TOKEN_ENV} and restart.",
                       title="Not allowed", print_exception=False)
    if not hmac.compare_digest((token or "").encode(), expected.encode()):
        raise gr.Error("Wrong or missing admin token.", title="Not allowed", print_exception=False)


def unlock_admin_ui(services, token: str) -> tuple:
    """Show the admin controls once the token checks out (each action checks it again)."""
    _require_admin(services, token)
    return gr.update(visible=True), "Admin actions unlocked on this page."


def set_paused_ui(services, paused: bool, token: str) -> str:
    _require_admin(services, token)
    with _admin_errors():
        services.store.set_control(PAUSED_KEY, "1" if paused else "0")
    return "Training paused: the trainer stops after its current step." if paused else "Training resumed."


def set_feedback_mode_ui(services, mode: str, token: str) -> str:
    """Switch between human, AI and mixed feedback; the trainer reads the choice at its next step."""
    _require_admin(services, token)
    with _admin_errors():
        mode = set_feedback_mode(services.store, mode)
    return f"Feedback: {dashboard.FEEDBACK_MODE_LABELS[mode]}. The trainer switches at its next step."


def save_constitution_ui(services, text: str, token: str) -> str:
    """Save the admin's principles (atomically, in the data folder); the judge uses them from its next label."""
    _require_admin(services, token)
    with _admin_errors():
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
    """A zip of the TRL preference and SFT exports, for download (temporary: see `export.export_zip`)."""
    _require_admin(services, token)
    archive, summary = export_zip(services.store)
    return str(archive), summary.describe().capitalize() + "."


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
    with _admin_errors():
        services.store.set_control(TRAINING_SETTINGS_KEY, json.dumps(settings))
    return "Saved; the trainer uses " + ", ".join(f"{k} = {v:g}" for k, v in settings.items()) + " from its next step."


# ---- layout -----------------------------------------------------------------------------------------------------

@dataclass
class AdminPanel:
    """What the rest of the page needs from the panel: the version list the dashboard refresh keeps current."""

    rollback_to: gr.Dropdown


def build_admin_panel(services) -> AdminPanel:
    """The "Admin" accordion and its events; call inside the page's Blocks context.

    Each event has an explicit (private) name, so a log or a test can tell which hidden event is which.
    """
    ensure_admin_token(services.cfg)
    bind = functools.partial
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
                                     value=shown_feedback_mode(services), label="Preferences come from")
            constitution_box = gr.Textbox(value=getattr(shown_constitution(services), "text", ""),
                                          label="Constitution: the principles the AI judge applies", lines=8,
                                          max_lines=20)
            save_constitution_button = gr.Button("Save constitution")
            delete_button = gr.Button("Delete the version selected above", variant="stop")
            with gr.Row():
                settings = [gr.Number(getattr(services.cfg.ppo, name), label=name) for name in TRAINING_SETTINGS]
            save_settings = gr.Button("Apply training settings")
            export_button = gr.Button("Export preferences (TRL JSONL + datasets, zip)")
            export_file = gr.File(label="Export", interactive=False)
            reset_confirmation = gr.Textbox(label=f"Type {RESET_CONFIRMATION} to start a fresh database "
                                                  "(the old one is kept as a backup)")
            reset_button = gr.Button("Reset data", variant="stop")

    events = [  # (trigger, handler, inputs, outputs, name)
        (pause.click, bind(set_paused_ui, services, True), [token], admin_status, "admin_pause"),
        (resume.click, bind(set_paused_ui, services, False), [token], admin_status, "admin_resume"),
        (rollback.click, bind(rollback_ui, services), [rollback_to, token], admin_status, "admin_rollback"),
        (unlock.click, bind(unlock_admin_ui, services), [token], [admin_controls, admin_status], "admin_unlock"),
        (delete_button.click, bind(delete_version_ui, services), [rollback_to, token], admin_status,
         "admin_delete_version"),
        (save_settings.click, bind(training_settings_ui, services), [token, *settings], admin_status,
         "admin_training_settings"),
        (export_button.click, bind(export_ui, services), [token], [export_file, admin_status], "admin_export"),
        (reset_button.click, bind(reset_data_ui, services), [reset_confirmation, token], admin_status,
         "admin_reset_data"),
        (feedback_mode.input, bind(set_feedback_mode_ui, services), [feedback_mode, token], admin_status,
         "admin_feedback_mode"),
        (save_constitution_button.click, bind(save_constitution_ui, services), [constitution_box, token],
         admin_status, "admin_save_constitution"),
    ]
    for trigger, handler, inputs, outputs, name in events:
        trigger(handler, inputs, outputs, api_name=name, api_visibility="private")
    return AdminPanel(rollback_to=rollback_to)
