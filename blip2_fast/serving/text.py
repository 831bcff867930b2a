"""One choice's text as it grows: deltas from diffing full decodes, cut at stop strings.

The final text is the full decode stripped (as model.answer / model.caption strip theirs), cut
before the first stop string. While the request runs, a delta holds back what could still change:
trailing whitespace (it may be stripped at the end), an incomplete multi-byte character (the
decoder shows it as U+FFFD until its last byte arrives), and a tail that could be the start of a
stop string. So the deltas of a stream add up to exactly the non-streamed text.
"""
from __future__ import annotations


class ChoiceText:
    def __init__(self, stop: tuple[str, ...] = ()):
        self.stop = stop
        self.sent = ""  # what a streaming client has been given
        self.text = ""  # the text so far (after the final update: the choice's whole text)
        self.stopped = False  # a stop string was found: the request should end now

    def update(self, full: str, final: bool) -> str:
        """The new full decode -> the delta to send now (the remainder when `final` or stopped)."""
        text = full.lstrip()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped, final = text[:cut], True, True
        if final:
            text = text.rstrip()
        else:
            text = text.rstrip().rstrip("\ufffd")
            text = text[: len(text) - self._stop_prefix(text)].rstrip()
        self.text = text
        if not text.startswith(self.sent):
            # a later token changed how earlier ones decode (rare; e.g. tokenizer clean-up rules):
            # what was sent cannot be taken back, so wait until the text agrees with it again
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
