"""The two decisions of the listening side, as pure logic (no model, no I/O): is the user's turn
over, and is speech over the assistant's answer a real turn or noise/backchannel?

The conversation feeds them what it measures (silence length, the end-of-turn model's score, a
transcript) and acts on the answer; tests drive them with plain values.
"""

from __future__ import annotations

import re
from typing import Literal

from services.conversation.settings import Interruptions, TurnDetection

_WORD = re.compile(r"[a-z0-9']+")


class EndOfTurn:
    """Decides, from the silence so far and what is known of the utterance, whether the turn is over.

    Semantic mode ends a turn at ``min_silence_ms`` if the end-of-turn model calls it complete and
    the transcript does not stop mid-sentence, and at ``max_silence_ms`` whatever they say. While a
    signal is still being computed, the turn waits for it (up to ``max_silence_ms``). Without an
    end-of-turn model (score None after the call), the transcript decides alone.
    """

    def __init__(self, cfg: TurnDetection) -> None:
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        """A new pause begins: forget the signals of the last one."""
        self.score: float | None = None
        self.scored = False  # a model call finished (score None then means: no model)
        self.scoring = False  # a model call is in flight
        self.scored_at_ms = -1  # the silence its audio ended with
        self.transcript: str | None = None

    def _levels(self) -> list[int]:
        """Silences at which an 'incomplete' score is asked again: the model hears the growing
        silence too, and scores more finished sentences complete after 300 ms than after 100 ms."""
        cfg = self.cfg
        return sorted({cfg.min_silence_ms, 2 * cfg.min_silence_ms, (cfg.min_silence_ms + cfg.max_silence_ms) // 2}
                      - {cfg.max_silence_ms})

    def wants_score(self, silence_ms: int) -> bool:
        """Should the end-of-turn model (re)score the utterance now?"""
        if self.cfg.mode != "semantic" or self.scoring:
            return False
        if self.scored_at_ms < 0:
            return True
        if self.score is None or self.score >= self.cfg.completion_threshold:
            return False  # no model, or already complete
        return any(self.scored_at_ms < level <= silence_ms for level in self._levels())

    def start_score(self, silence_ms: int) -> None:
        self.scoring, self.scored_at_ms = True, silence_ms

    def set_score(self, score: float | None) -> None:
        self.score, self.scored, self.scoring = score, True, False

    def set_transcript(self, text: str) -> None:
        self.transcript = text

    def complete(self) -> bool | None:
        """Does the utterance look finished? None while a signal is still missing."""
        if self.transcript is not None and not self.transcript.strip():
            return True  # nothing was said (noise): end it, there is nothing to wait for
        if self.transcript is not None and transcript_looks_incomplete(self.transcript):
            return False
        if not self.scored or self.transcript is None:
            return None
        return self.score is None or self.score >= self.cfg.completion_threshold

    def decide(self, silence_ms: int) -> bool:
        """True: end the turn now."""
        cfg = self.cfg
        if cfg.mode == "manual":
            return False
        if cfg.mode == "silence":
            return silence_ms >= cfg.min_silence_ms
        if silence_ms >= cfg.max_silence_ms:
            return True
        if silence_ms >= 2 * cfg.min_silence_ms and self._finished_question():
            return True  # the model misjudges some long questions; a finished question needs no more wait
        return silence_ms >= cfg.min_silence_ms and self.complete() is True

    def _finished_question(self) -> bool:
        text = (self.transcript or "").strip()
        return text.endswith("?") and not transcript_looks_incomplete(text)


BargeVerdict = Literal["turn", "noise", "backchannel"]


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("-", " "))


def classify_barge_in(text: str, cfg: Interruptions) -> BargeVerdict:
    """What the user said over the answer: a real turn, noise (too few words) or a backchannel."""
    words = _words(text)
    if len(words) < max(cfg.min_words, 1):
        return "noise"
    phrases = {" ".join(_words(p)) for p in cfg.backchannels}
    backchannel_words = {w for p in phrases for w in p.split()}
    joined = " ".join(words)
    if joined in phrases or all(w in backchannel_words for w in words):
        return "backchannel"
    return "turn"


# --- the transcript half ------------------------------------------------------------------------

#: Words a finished English sentence practically never ends with: articles, possessive
#: determiners, conjunctions, prepositions, and the verb 'to be' waiting for its complement.
#: Left out on purpose: pronouns ("Thank you."), modals ("Yes, I can."), and prepositions that
#: are often verb particles in assistant commands ("Turn the lights on.", "Log in.").
FUNCTION_WORDS = frozenset("""
    a an the my your our their its every
    and or but nor because if than as whether unless although
    of to with about for from at into onto by between toward towards without until
    is are was were am
    that which whose
    very
    um uh er erm
""".split())

#: Of those, the ones a complete question may end with ("What is it for?", "Who was that?").
QUESTION_ENDINGS = frozenset("""
    to with about for from at into by is are was were am that which whose
""".split())

#: A trailing comma, colon, dash or ellipsis announces more to come.
_CONTINUES = re.compile(r"(,|;|:|-|–|—|\.\.\.|…)[\s\"')\]]*$")
_LAST_WORD = re.compile(r"([A-Za-z']+)[^A-Za-z']*$")


def transcript_looks_incomplete(text: str) -> bool:
    """True when a transcript reads as an unfinished sentence: it ends with a comma, dash or
    ellipsis, or with a function word ("What is the capital of", "I want to go to the").

    ASR adds final punctuation even to a cut sentence ("What is the capital of?"), so a final
    '.' or '?' does not make it complete; a question may only end with a stranded preposition
    or pronoun ("What is it for?", "Who is that?"), never with an article or a conjunction.
    """
    text = text.strip()
    if not text:
        return False  # nothing heard: leave the decision to the audio
    if _CONTINUES.search(text):
        return True
    match = _LAST_WORD.search(text)
    if match is None:
        return False
    word = match.group(1).lower().strip("'")
    if word not in FUNCTION_WORDS:
        return False
    is_question = text.rstrip("\"') ").endswith("?")
    return not (is_question and word in QUESTION_ENDINGS)
