"""Text from tokens as they come: pieces that never change once shown, ending at a stop string.

A client streaming an answer sees each piece once; the pieces must add up to
exactly the final text. Two things make the newest text provisional: a
character that spans several BPE tokens decodes as U+FFFD until its last byte
arrives, and the end of the text may be the start of a stop string (which is
never shown). So the whole text is decoded at every token and only what is
final is handed out: the text up to a stop string, less any trailing
replacement characters and any tail that could still grow into a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 character


class Detokenizer:
    """The text of a growing list of token ids, in final pieces; it ends before the first stop string.

    skip_prefix is text the model writes before the answer proper (the chat
    template's space after "Assistant:"), removed from the text when present.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = (), skip_prefix: str = ""):
        self.decode, self.stops, self.skip_prefix = decode, [s for s in stops if s], skip_prefix
        self.ids: list[int] = []
        self.shown = ""  # the pieces handed out so far, joined: the final text once finish() is called
        self.stopped = False  # a stop string was written

    def add(self, token: int) -> str:
        """Take the next token; the new final text (often ''). After a stop string, nothing more."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.text()
        cut = min((found for stop in self.stops if (found := text.find(stop)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self.reveal(text[:cut])
        # Hold back the longest tail that is the start of a stop string, and half-decoded characters.
        held = max((n for stop in self.stops for n in range(len(stop) - 1, 0, -1) if text.endswith(stop[:n])),
                   default=0)
        return self.reveal(text[:len(text) - held].rstrip(REPLACEMENT))

    def finish(self) -> str:
        """No token follows: the rest of the text, held back in case it became a stop string or a letter."""
        return "" if self.stopped else self.reveal(self.text())

    def text(self) -> str:
        text = self.decode(self.ids)
        if self.skip_prefix.startswith(text):
            return ""  # the prefix, or the start of it: nothing of the answer yet
        return text.removeprefix(self.skip_prefix)

    def reveal(self, final: str) -> str:
        """The part of final not shown yet (final always extends what was shown)."""
        if len(final) <= len(self.shown) or not final.startswith(self.shown):
            return ""
        piece, self.shown = final[len(self.shown):], final
        return piece
