"""The chat tab's layout: the message box, the two answers, the vote buttons and what keeps them honest.

A UI module (Gradio). Which controls are clickable follows the pair's state (`controls_ui`): nothing while two
answers are being written, the votes only while a complete pair awaits one. Keys 1-4 vote (`PAGE_HEAD`), and
disabled buttons look disabled (`PAGE_CSS`). The handlers themselves live in `ui`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import gradio as gr

if TYPE_CHECKING:  # ui.py imports this module, so the session type is named for annotations only
    from rlhf_online.ui import SessionState

VOTE_BUTTONS = (("a", "A is better"), ("b", "B is better"), ("tie", "Tie"), ("both_bad", "Both are bad"))
VOTE_KEYS = {"1": "a", "2": "b", "3": "tie", "4": "both_bad"}

# Keys 1-4 click the vote buttons (only when they are enabled, and not while typing in a text box).
PAGE_HEAD = """<script>
document.addEventListener('keydown', (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  const target = event.target;
  if (target && (target.tagName === 'INPUT' || target.tagName === 'TEXTAREA' || target.isContentEditable)) return;
  const choice = {%s}[event.key];
  const button = choice && document.getElementById('vote-' + choice);
  if (button && !button.disabled) { event.preventDefault(); button.click(); }
});
</script>""" % ", ".join(f"'{key}': '{choice}'" for key, choice in VOTE_KEYS.items())
PAGE_CSS = """
button:disabled { opacity: 0.38 !important; cursor: not-allowed !important; filter: grayscale(1); }
#status-line { font-size: 0.95em; padding: 6px 8px; border-radius: 6px; background: var(--background-fill-secondary); }
.timeline .tl-card { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 10px; margin: 8px 0; }
.timeline .tl-prompt { font-weight: 600; margin-bottom: 4px; }
.timeline .tl-row { border-top: 1px dashed var(--border-color-primary); padding: 4px 0; }
.timeline .tl-base { opacity: 0.85; background: var(--background-fill-secondary); }
.timeline .tl-meta { font-size: 0.85em; color: var(--body-text-color-subdued); }
.timeline .tl-answer { white-space: pre-wrap; }
.timeline mark { background: #fde68a; color: inherit; padding: 0 1px; border-radius: 2px; }
"""


def controls_ui(state: SessionState | None, busy: bool = False) -> tuple:
    """Which buttons a person can press now: votes (and "submit my answer", and Regenerate) only while a
    complete pair awaits a vote; New conversation once there is one; nothing while answers are being written.

    Outputs, in order: the four vote buttons, submit-better, Regenerate, New conversation, Send.
    """
    pair_ready = not busy and state is not None and bool(state.pair_token)
    started = not busy and state is not None and bool(state.conversation_id)
    return ((gr.update(interactive=pair_ready),) * (len(VOTE_BUTTONS) + 2)
            + (gr.update(interactive=started), gr.update(interactive=not busy)))


@dataclass
class ChatControls:
    chatbot: gr.Chatbot
    message: gr.Textbox
    send: gr.Button
    answer_a: gr.Textbox
    answer_b: gr.Textbox
    vote_buttons: list[tuple[str, gr.Button]]
    status: gr.Markdown
    better: gr.Textbox
    better_choice: gr.Radio
    submit_better: gr.Button
    regenerate: gr.Button
    new_chat: gr.Button

    @property
    def buttons(self) -> list[gr.Button]:
        """In the order `controls_ui` returns their states."""
        return [b for _, b in self.vote_buttons] + [self.submit_better, self.regenerate, self.new_chat, self.send]


def typed_text_limit(max_request_kb: int) -> int | None:
    """The most characters the text boxes take (None: no limit), so that whatever a person pastes still fits in one
    request. The server refuses a body over --max-request-kb before reading it, which the page can only show as
    "Error" over every box; a capped box instead keeps the start of a huge paste, and the server then cuts the
    message to --max-message-chars with a notice. A character is at most 3 bytes of UTF-8 per UTF-16 unit (what
    a browser counts), so a quarter of the limit in characters leaves room for the rest of the request."""
    return max_request_kb * 1024 // 4 if max_request_kb > 0 else None


def build_chat(max_chars: int | None = None) -> ChatControls:
    """The chat tab; `max_chars` caps what the message and better-answer boxes take (see `typed_text_limit`)."""
    chatbot = gr.Chatbot(label="Conversation", height=230, sanitize_html=True, allow_tags=False,
                         feedback_options=None, elem_id="chatbot",
                         placeholder="**Ask anything.** Two versions of the model answer side by side; pick the "
                                     "better one and watch the Training panel learn from your vote.")
    with gr.Row():
        message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6, lines=1,
                             max_lines=8, elem_id="message", autofocus=True, max_length=max_chars)
        send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
    with gr.Row():  # model output goes in plain textboxes: nothing it writes is rendered as HTML
        answer_a = gr.Textbox(label="A", lines=5, max_lines=12, interactive=False, buttons=["copy"], elem_id="answer-a")
        answer_b = gr.Textbox(label="B", lines=5, max_lines=12, interactive=False, buttons=["copy"], elem_id="answer-b")
    keys = {choice: key for key, choice in VOTE_KEYS.items()}
    with gr.Row():
        vote_buttons = [(choice, gr.Button(f"{label}  [{keys[choice]}]", interactive=False, elem_id=f"vote-{choice}",
                                           elem_classes="vote-button"))
                        for choice, label in VOTE_BUTTONS]
    status = gr.Markdown("Vote with the buttons or keys 1–4 (Esc leaves the text box first).", elem_id="chat-status")
    with gr.Accordion("Write a better answer", open=False):
        better = gr.Textbox(label="Your answer (starts as answer A; edit it)", lines=6, max_length=max_chars)
        better_choice = gr.Radio([(label, choice) for choice, label in VOTE_BUTTONS], value="both_bad",
                                 label="And of the two shown answers")
        submit_better = gr.Button("Submit my answer with the vote", variant="primary", interactive=False,
                                  elem_id="submit-better")
    with gr.Row():
        regenerate = gr.Button("Regenerate", interactive=False, elem_id="regenerate")
        new_chat = gr.Button("New conversation", interactive=False, elem_id="new-conversation")
    return ChatControls(chatbot, message, send, answer_a, answer_b, vote_buttons, status, better, better_choice,
                        submit_better, regenerate, new_chat)
