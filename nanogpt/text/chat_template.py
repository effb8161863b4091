r"""The chat template: how a conversation becomes token ids, and which of them a finetune learns.

One place for both users: instruction data is encoded here when it is prepared
(nanogpt/dataset/sft.py), and a conversation is encoded here again when the
model answers (``nanogpt.chat``, ``LanguageModel.chat``), so the model always
sees at inference exactly the ids it was trained on.

No tokenizer nanogpt reads carries a chat template of its own (tiktoken
encodings and tokenizer.json files have none; Hugging Face keeps its Jinja
templates in tokenizer_config.json, which a GPT-2 tokenizer does not have), so
there is one plain-text template, written with characters any English
character vocabulary has::

    System: {system}
    User: {user}
    Assistant: {answer}<end>User: {user}
    Assistant: {answer}<end>

``<end>`` is the tokenizer's end-of-text token (GPT-2's ``<|endoftext|>``,
id 50256). A character vocabulary has no such token, so there an answer ends
with a blank line (``\\n\\n``) instead, and an answer may not contain one.
The loss covers each answer (with the space before it) and its end; the
system and user turns and the ``Assistant:`` prompt are masked. The template
is recorded (ChatTemplate.record) in the prepared data's meta.json and in
every checkpoint trained on it, and read back from there by chat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from nanogpt.text.tokenizers import Tokenizer

ROLES = ("system", "user", "assistant")
BLANK_LINE = "\n\n"  # how an answer ends where the vocabulary has no end-of-text token


@dataclass(frozen=True)
class ChatTemplate:
    """The plain template's pieces; ``end_id`` is the end-of-text token, or None to end with end_text."""

    name: str = "plain"
    system: str = "System: "
    user: str = "User: "
    assistant: str = "Assistant:"
    turn_end: str = "\n"  # after a system or user turn
    answer_start: str = " "  # learned with the answer: GPT-2 reads " word" as one token, "word" as another
    end_text: str = BLANK_LINE
    end_id: int | None = None

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> ChatTemplate:
        """The template for a tokenizer: its end-of-text token ends answers, else a blank line."""
        if tokenizer.eot is None:
            return cls()
        return cls(end_text=tokenizer.decode([tokenizer.eot]), end_id=tokenizer.eot)

    @classmethod
    def from_record(cls, record: dict | None, tokenizer: Tokenizer) -> ChatTemplate:
        """The template a checkpoint or meta.json recorded; a model trained without one gets the default."""
        if not record:
            return cls.for_tokenizer(tokenizer)
        return cls(**record)

    def record(self) -> dict:
        """What meta.json and checkpoints keep of the template: every piece, so it can be rebuilt exactly."""
        return asdict(self)

    def encode(self, messages: list[dict], encode: Callable[[str], list[int]],
               generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """(ids, learned) for checked messages; learned[i] is True where id i is part of an answer.

        Each stretch of masked text is encoded in one piece and each answer in
        another, so the boundary between them is the same in training and at
        inference. generation_prompt=True ends with the prompt for a new answer.
        """
        ids: list[int] = []
        learned: list[bool] = []
        pending = ""  # masked text not encoded yet

        def add(text: str, learn: bool) -> None:
            new = encode(text) if text else []
            ids.extend(new)
            learned.extend([learn] * len(new))

        for message in messages:
            role, content = message["role"], message["content"]
            if role == "assistant":
                add(pending + self.assistant, False)
                pending = ""
                end = "" if self.end_id is not None else self.end_text
                add(self.answer_start + content + end, True)
                if self.end_id is not None:
                    ids.append(self.end_id)
                    learned.append(True)
            else:
                pending += (self.system if role == "system" else self.user) + content + self.turn_end
        if generation_prompt:
            pending += self.assistant
        add(pending, False)
        return ids, learned

    def prompt(self, messages: list[dict], encode: Callable[[str], list[int]], budget: int,
               longest: int | None = None) -> tuple[list[int], int, int]:
        """(ids, turns dropped, ids cut): the prompt for the next answer, within budget ids.

        The oldest turns go first (a user's message with the answers to it; a
        system message stays) until the prompt fits budget. If the newest
        message alone is still longer, it is kept whole while it fits longest
        ids (budget unless given: the answer then has less room), and beyond
        that its ids are cut from the left to budget, as a long training example is.
        """
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        dropped = 0
        ids, _ = self.encode(system + turns, encode, generation_prompt=True)
        while len(ids) > budget and len(turns) > 1:
            turns = turns[1:]
            dropped += 1
            while len(turns) > 1 and turns[0]["role"] != "user":
                turns = turns[1:]
                dropped += 1
            ids, _ = self.encode(system + turns, encode, generation_prompt=True)
        cut = len(ids) - budget if len(ids) > (longest or budget) else 0
        return ids[cut:], dropped, cut

    def answer_problem(self, content: str) -> str | None:
        """Why this answer cannot be learned with this template, or None."""
        if not content.strip():
            return "the response is empty; every example needs an answer to learn"
        if self.end_id is None and self.end_text in content:
            return ("the response contains a blank line, which ends an answer for a base without an "
                    "end-of-text token (a character vocabulary); remove the blank lines")
        return None


def messages_problem(messages: object, for_training: bool) -> str | None:
    """What is wrong with a list of messages, in words, or None when it is a conversation.

    For training the last turn must be an answer to learn (and there must be
    one); for chat, the last turn is the user's, for the model to answer.
    """
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list of {"role": ..., "content": ...}'
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f'message {i + 1} must be {{"role": ..., "content": "text"}}, not {str(message)[:60]}'
        if message.get("role") not in ROLES:
            return (f"message {i + 1} has role {message.get('role')!r}; the roles are "
                    f"{', '.join(ROLES)}")
    roles = [m["role"] for m in messages]
    if for_training and "assistant" not in roles:
        return "no assistant turn: there is no answer to learn"
    if for_training and roles[-1] != "assistant":
        return f"the conversation ends with a {roles[-1]} turn; end it with the assistant's answer"
    if not for_training and roles[-1] != "user":
        return f"the last message is the {roles[-1]}'s; end with the user's message for the model to answer"
    return None
