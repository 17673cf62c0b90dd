"""The chat-and-vote service behind the UI, the API and the benchmarks: plain Python, no Gradio.

A turn: the person's message goes into the conversation, two answers are sampled in one batched call (newest
adapter version against its predecessor, sides shuffled so position does not reveal which is which), the pair
is stored, and the vote decides which answer the conversation continues with.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from rlhf_online.config import SamplingConfig
from rlhf_online.generation import Generator, at_most_every
from rlhf_online.limits import Limits
from rlhf_online.store import AI_PLACEMENT, PreferenceStore, UnknownPairError, VoteReceipt, parse_choice
from rlhf_online.versions import BASE_VERSION

MAX_TOKEN_CHARS = 64  # a pair token is 22 characters; anything much longer is not one of ours


def new_pair_token() -> str:
    """128 random bits, URL-safe: what the API names a pair by. Row ids are sequential, so anyone could name
    (and vote on) every pair; a token is known only to the session the pair was shown to."""
    return secrets.token_urlsafe(16)


def _clean_text(text: str | None) -> str:
    """Text that SQLite and the tokenizer accept: no NUL bytes, no lone surrogates (JSON can carry "\\ud800",
    which is not valid UTF-8 and would fail when stored), no surrounding whitespace."""
    cleaned = (text or "").replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return cleaned.strip()


class EmptyMessageError(ValueError):
    """Raised for an empty message; the UI shows it as a hint, not an error."""


@dataclass
class Conversation:
    id: str
    owner: str = ""  # the session that started it; no other session can continue, regenerate or vote in it
    history: list[dict] = field(default_factory=list)  # turns already settled by a vote
    pending_message: str | None = None  # the user message whose pair awaits a vote
    pending_pair_id: int | None = None
    turn: int = 0


@dataclass(frozen=True)
class PairUpdate:
    conversation_id: str
    pair_id: int | None  # set on the final update, once the pair is stored (internal: the store's row id)
    answer_a: str
    answer_b: str
    done: bool
    notice: str | None = None
    pair_token: str | None = None  # set on the final update: what a vote names the pair by


class Arena:
    """Conversations live in memory (bounded); everything that matters for learning is in the store."""

    def __init__(self, store: PreferenceStore, generator: Generator, sampling: SamplingConfig,
                 pair_versions=None, chat_busy=None, seed: int | None = None,
                 max_conversations: int = 10_000, limits: Limits | None = None):
        self.store = store
        self.generator = generator
        self.sampling = sampling
        # () -> context manager yielding (newest, previous) and keeping both loaded: LiveAdapters.pinned_pair
        self.pair_versions = pair_versions or (lambda: contextlib.nullcontext((BASE_VERSION, BASE_VERSION)))
        self.chat_busy = chat_busy
        self.rng = random.Random(seed)
        self.max_conversations = max_conversations
        self.limits = limits  # applied to requests from the web (they name a client); internal callers are trusted
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()
        self._lock = threading.Lock()

    # ---- conversations --------------------------------------------------------------------------------------
    def new_conversation(self, session_id: str = "") -> Conversation:
        conversation = Conversation(id=uuid.uuid4().hex, owner=session_id)
        with self._lock:
            self._conversations[conversation.id] = conversation
            while len(self._conversations) > self.max_conversations:
                self._conversations.popitem(last=False)  # forget the least recently used
        return conversation

    def start_conversation(self, history: list[dict], session_id: str = "") -> Conversation:
        """A conversation that begins with earlier turns (imported prompts, simulated users)."""
        conversation = self.new_conversation(session_id)
        conversation.history = [dict(m) for m in history]
        return conversation

    def find(self, conversation_id: str | None, session_id: str = "") -> Conversation | None:
        """This session's conversation with this id; None for an unknown, expired or someone else's id."""
        with self._lock:
            found = self._conversations.get(conversation_id or "")
            if found is None or found.owner != session_id:
                return None
            self._conversations.move_to_end(found.id)
            return found

    def conversation(self, conversation_id: str | None, session_id: str = "") -> Conversation:
        """This session's conversation with this id, or a new one for an empty, unknown or expired id."""
        return self.find(conversation_id, session_id) or self.new_conversation(session_id)

    @property
    def open_conversations(self) -> int:
        with self._lock:
            return len(self._conversations)

    # ---- chat -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _chat_busy(self):
        """Tell the trainer process a person is waiting, so it pauses between its steps."""
        if self.chat_busy is None:
            yield
            return
        with self.chat_busy.get_lock():
            self.chat_busy.value += 1
        try:
            yield
        finally:
            with self.chat_busy.get_lock():
                self.chat_busy.value -= 1

    def _clean_message(self, message: str) -> tuple[str, str | None]:
        text = _clean_text(message)
        if not text:
            raise EmptyMessageError("Type a message first: empty messages are ignored.")
        if len(text) > self.sampling.max_message_chars:
            return text[:self.sampling.max_message_chars], \
                f"Your message was cut to its first {self.sampling.max_message_chars} characters."
        return text, None

    def chat(self, conversation_id: str | None, message: str, session_id: str = "",
             client: str | None = None) -> Iterator[PairUpdate]:
        """Add a user message and stream a pair of answers to it."""
        text, notice = self._clean_message(message)
        if self.limits is not None and client is not None:
            self.limits.check_chat(session_id, client)
        conversation = self.conversation(conversation_id, session_id)  # after the limits: state costs a message
        conversation.pending_message = text
        yield from self._sample_pair(conversation, session_id, notice)

    def regenerate(self, conversation_id: str, session_id: str = "",
                   client: str | None = None) -> Iterator[PairUpdate]:
        """A fresh pair for the pending message (the old pair stays stored, unvoted).

        Limited like a message, and an unknown id creates nothing: a stream of made-up ids must not be able to
        fill the conversation cache and evict everyone's open conversations.
        """
        if self.limits is not None and client is not None:
            self.limits.check_chat(session_id, client)
        conversation = self.find(conversation_id, session_id)
        if conversation is None or conversation.pending_message is None:
            raise EmptyMessageError("Nothing to regenerate yet: send a message first.")
        yield from self._sample_pair(conversation, session_id, None)

    def _sample_pair(self, conversation: Conversation, session_id: str, notice: str | None) -> Iterator[PairUpdate]:
        prompt = self.generator.build_prompt(conversation.history + [{"role": "user",
                                                                      "content": conversation.pending_message}])
        if prompt.truncated:
            notice = " ".join(filter(None, [notice, "The conversation was too long for the model: the oldest "
                                                    "turns were left out of what it sees."]))
        update = None
        with self.pair_versions() as (newest, previous), self._chat_busy():
            newest_left = self.rng.random() < 0.5
            version_a, version_b = (newest, previous) if newest_left else (previous, newest)
            placement = "same" if newest == previous else ("newest_left" if newest_left else "newest_right")
            stream = self.generator.stream_pair(prompt, (version_a, version_b))
            for update in at_most_every(stream, self.sampling.stream_interval_s):
                yield PairUpdate(conversation.id, None, update.texts[0], update.texts[1], False, notice)
        answer_a, answer_b = update.texts
        pair_id = self.store.record_pair(
            conversation_id=conversation.id, turn=conversation.turn, messages=prompt.messages, answer_a=answer_a,
            answer_b=answer_b, version_a=version_a, version_b=version_b, sampling=self._sampling_record(),
            session_id=session_id, placement=placement, token=(token := new_pair_token()))
        conversation.pending_pair_id = pair_id
        yield PairUpdate(conversation.id, pair_id, answer_a, answer_b, True, notice, pair_token=token)

    def _sampling_record(self) -> dict:
        return {"temperature": self.sampling.temperature, "top_p": self.sampling.top_p,
                "max_new_tokens": self.sampling.max_new_tokens,
                "repetition_penalty": self.sampling.repetition_penalty}

    def chat_to_end(self, conversation_id: str | None, message: str, session_id: str = "",
                    client: str | None = None) -> PairUpdate:
        """Non-streaming form for the API and benchmarks."""
        update = None
        for update in self.chat(conversation_id, message, session_id, client):
            pass
        return update

    # ---- vote -----------------------------------------------------------------------------------------------
    def vote(self, pair_token: str, choice: str, better_answer: str | None = None, session_id: str = "",
             client: str | None = None) -> VoteReceipt:
        """Store the vote (committed before this returns), then continue the conversation with the winner.

        Only the session a pair was shown to can vote on it: anyone else could otherwise cast the first vote on
        other people's pairs (theirs would then be dropped as a repeat), continue their conversation with text
        of their choosing, and store that text as a demonstration the model trains on. AI-made pairs were shown
        to nobody and take no human vote. The choice is checked first, so a malformed vote costs no limit.
        """
        choice = parse_choice(choice)
        better_answer = _clean_text(better_answer)[:self.sampling.max_message_chars] or None
        pair = self.store.get_pair_by_token(pair_token) \
            if isinstance(pair_token, str) and 0 < len(pair_token) <= MAX_TOKEN_CHARS else None
        if pair is None or pair.placement == AI_PLACEMENT or pair.session_id != session_id:
            raise UnknownPairError("no pair with this token was shown in this session")
        if self.limits is not None and client is not None:
            self.limits.check_vote(session_id, client)
        receipt = self.store.record_vote(pair_id=pair.id, choice=choice, better_answer=better_answer,
                                         session_id=session_id)
        conversation = self.find(pair.conversation_id, session_id)
        if conversation is not None and conversation.pending_pair_id == pair.id and not receipt.duplicate:
            preferred = better_answer or (pair.answer_b if choice == "b" else pair.answer_a)
            conversation.history = pair.messages + [{"role": "assistant", "content": preferred}]
            conversation.pending_message = None
            conversation.pending_pair_id = None
            conversation.turn += 1
        return receipt
