"""LLM text stream -> speakable chunks: a small first chunk, then growing ones.

The first chunk is cut early (first clause, or a few words) so synthesis can start before the
LLM finishes its first sentence; later chunks grow, since by then audio is already playing and
longer text gives Piper better prosody for the same total work.

Cuts only happen at whitespace that is already followed by the next word's first character, so
a delta ending mid-word (or right after "3." of "3.5") never causes a cut, and the output depends
only on the text, not on how it was split into deltas.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

_WS = re.compile(r"\s+")
#: Closing characters that may follow the punctuation that ends a sentence or a clause.
_CLOSERS = "\"')]}»”’"
_OPENERS = "\"'([{«“‘"
_SENTENCE_END = ".!?…"
_CLAUSE_END = ",;:"
_DASHES = ("—", "–", "-", "--")
#: Lowercased tokens (without their final dot) whose dot does not end a sentence.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs etc e.g i.e cf approx apt dept est fig inc ltd corp "
    "no nos vol ca al gen col lt sgt capt rev hon jan feb mar apr jun jul aug sep sept oct "
    "nov dec".split()
)
#: Abbreviations that end sentences so often that a following capital letter means a cut.
_SENTENCE_OK_ABBR = frozenset({"etc", "no", "mar", "jun", "jul", "aug", "dec"})
_DOTTED = re.compile(r"^(?:[A-Za-z]\.){2,}$")  # U.S.  e.g.  a.m.
_INITIAL = re.compile(r"^[A-Z]\.$")  # J. K. Rowling
_LIST_NUMBER = re.compile(r"^\d+[.)]$")


class ChunkerConfig(BaseModel):
    """How an LLM text stream is cut into chunks for TTS."""

    model_config = ConfigDict(extra="forbid")

    first_min_words: int = Field(
        default=2, ge=1, description="The first chunk never ends before this many words (short clauses "
        "like 'Well,' are joined to what follows)."
    )
    first_max_words: int = Field(
        default=3, ge=1, description="The first chunk is cut after this many words even without any "
        "punctuation, so the first audio starts early (one word later if that word is an "
        "abbreviation such as 'Dr.'): on a CPU each LLM token costs 30-70 ms before the first audio."
    )
    next_words: int = Field(
        default=5, ge=1, description="Word budget of the second chunk: it is cut at a clause boundary "
        "(, ; : dash) once it has this many words; sentence ends always cut."
    )
    growth: float = Field(
        default=1.5, ge=1.0, description="Each later chunk's word budget is the previous one times this."
    )
    max_words: int = Field(
        default=40, ge=1, description="Upper bound of the budget. A chunk with no boundary is cut at twice "
        "its budget (at most this), at the next space (not right after an abbreviation)."
    )
    clean: bool = Field(
        default=True, description="Strip markdown symbols and emojis from chunks (see clean_for_speech)."
    )
    adaptive: bool = Field(
        default=True, description="After the first chunk, size chunks by the audio the caller has in "
        "hand (when the stream knows it): small while the buffer is thin, up to max_words when it is "
        "full; off = the fixed next_words/growth schedule."
    )
    ms_per_word: float = Field(
        default=150.0, gt=0, description="What one word of a chunk costs to generate and synthesize under "
        "load (adaptive): a chunk is cut at a clause once it has buffer/(2*ms_per_word) words, and "
        "at any word once it has buffer/ms_per_word, so its audio comes before the buffer runs dry."
    )

    @model_validator(mode="after")
    def _check_order(self) -> ChunkerConfig:
        if self.first_min_words > self.first_max_words:
            raise ValueError("first_min_words must be <= first_max_words")
        return self


# --- cleaning ----------------------------------------------------------------------------------

_EMOJI_RANGES = (
    (0x1F000, 0x1FAFF),  # emoticons, pictographs, transport, flags, skin tones...
    (0x2600, 0x27BF),  # misc symbols, dingbats
    (0x2B00, 0x2BFF),  # arrows and stars used as emojis
    (0x2300, 0x23FF),  # watch, hourglass, media controls
    (0xFE00, 0xFE0F),  # variation selectors
    (0xE0000, 0xE007F),  # tag characters (subdivision flags)
)
_ZWJ = "\u200d"
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_MD_LINE_PREFIX = re.compile(r"(?m)^[ \t]*(?:#{1,6}[ \t]*|>[ \t]*|[-*+•◦▪][ \t]+)")
_MD_RULE = re.compile(r"(?m)^[ \t]*(?:[-*_=][ \t]*){3,}$")
_MD_EMPHASIS_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_+|_+(?![A-Za-z0-9])")


def _is_emoji(ch: str) -> bool:
    cp = ord(ch)
    if ch == _ZWJ:
        return True
    return any(lo <= cp <= hi for lo, hi in _EMOJI_RANGES)


def clean_for_speech(text: str) -> str:
    """Remove what a TTS voice would read aloud but a person would not: markdown and emojis.

    Headers, bullets, quote marks (>), emphasis (* _), code backticks, horizontal rules and link
    targets go; link texts stay. Whitespace is collapsed to single spaces.
    """
    text = _MD_LINK.sub(r"\1", text)
    text = _MD_RULE.sub(" ", text)
    text = _MD_LINE_PREFIX.sub("", text)
    text = text.replace("`", "").replace("*", "").replace("#", "").replace("|", " ")
    text = _MD_EMPHASIS_UNDERSCORE.sub("", text)
    text = "".join(
        " " if _is_emoji(ch) else ch
        for ch in text
        if unicodedata.category(ch) not in ("Cc", "Cf") or ch in "\n\t " or ch == _ZWJ
    )
    return _WS.sub(" ", text).strip()


# --- boundaries --------------------------------------------------------------------------------

_NONE, _CLAUSE, _SENTENCE = 0, 1, 2


def _is_word(token: str) -> bool:
    return any(ch.isalnum() for ch in token)


def _is_abbreviation(token: str) -> bool:
    """'Mr.', 'e.g.', 'U.S.', 'J.': a dot that usually does not end the sentence."""
    core = token.rstrip(_CLOSERS).lstrip(_OPENERS)
    if not core.endswith("."):
        return False
    return core[:-1].lower() in _ABBREVIATIONS or bool(_DOTTED.match(core) or _INITIAL.match(core))


def _boundary(token: str, gap: str, next_char: str) -> int:
    """Strength of the boundary after ``token`` (a complete word), given what follows it."""
    if "\n" in gap:
        return _SENTENCE
    core = token.rstrip(_CLOSERS)
    if not core:
        return _NONE
    if token in _DASHES or core.endswith(("—", "–")):
        return _CLAUSE
    last = core[-1]
    if last in _CLAUSE_END:
        return _CLAUSE
    if last not in _SENTENCE_END:
        return _NONE
    if last != ".":
        return _SENTENCE
    if core.endswith(".."):  # ellipsis written with dots
        return _SENTENCE
    if _is_abbreviation(core):
        if core[:-1].lstrip(_OPENERS).lower() in _SENTENCE_OK_ABBR and next_char.isupper():
            return _SENTENCE
        return _NONE
    if next_char.islower():  # "approx. five", unknown abbreviations
        return _NONE
    return _SENTENCE


class TextChunker:
    """Incremental splitter: ``push`` deltas, get completed chunks; ``flush`` at end of stream.

    Not thread-safe; one instance per text stream. After ``flush`` the next text starts a new
    segment, whose first chunk is short again. ``buffer_ms``, when given, says how much audio the
    listener has in hand right now (None: unknown); with ``config.adaptive`` it sizes the chunks
    after the first, which then depend on timing as well as on the text.
    """

    def __init__(self, config: ChunkerConfig | None = None,
                 buffer_ms: Callable[[], float | None] | None = None) -> None:
        self.config = config or ChunkerConfig()
        self._buffer_ms = buffer_ms if self.config.adaptive else None
        self.reset()

    def reset(self) -> None:
        """Drop pending text and start a new segment."""
        self._buf = ""
        self._pos = 0  # where the next whitespace search starts
        self._tok_start = 0  # start of the word being read
        self._words = 0  # complete words in the pending chunk
        self._index = 0  # chunks emitted in this segment

    @property
    def pending(self) -> str:
        """Text received but not yet emitted."""
        return self._buf

    @property
    def chunks_emitted(self) -> int:
        """Chunks returned so far in the current segment."""
        return self._index

    def push(self, delta: str) -> list[str]:
        """Add a text delta; return the chunks it completed (possibly none)."""
        if not delta:
            return []
        self._buf += delta
        out: list[str] = []
        buf = self._buf
        while True:
            m = _WS.search(buf, self._pos)
            # Undecidable until the next word starts: the run may grow or hide a mid-word split.
            if m is None or m.end() >= len(buf):
                break
            token = buf[self._tok_start : m.start()]
            self._pos = self._tok_start = m.end()
            if _is_word(token):
                self._words += 1
            if self._should_cut(token, m.group(), buf[m.end()]):
                self._emit(buf[: m.start()], out)
                buf = buf[m.end() :]
                self._pos = self._tok_start = self._words = 0
        self._buf = buf
        return out

    def cut(self) -> list[str]:
        """Return the complete words pending now as a chunk, without waiting for a boundary (the
        listener is about to run out of audio); none before the first chunk, nor right after an
        abbreviation ("Dr." waits for "Smith"). The segment goes on: the next chunk is not short."""
        if self._words == 0 or self._index == 0:
            return []
        head = self._buf[: self._tok_start]
        words = head.split()
        if not words or _is_abbreviation(words[-1]) or (self._words == 1 and _LIST_NUMBER.match(words[-1])):
            return []  # "Dr." waits for "Smith", and "1." for its item
        out: list[str] = []
        self._emit(head, out)
        self._buf = self._buf[self._tok_start :]
        self._pos = self._tok_start = self._words = 0
        return out

    def flush(self) -> list[str]:
        """Return the remaining text as a last chunk (if any) and start a new segment."""
        out: list[str] = []
        self._emit(self._buf, out)
        self.reset()
        return out

    def _budget(self) -> float:
        cfg = self.config
        buffer = self._buffer_ms() if self._buffer_ms is not None else None
        if buffer is not None:
            # half of what the buffer covers: the forced cut (twice the budget) still fits in it
            words = buffer / (2 * cfg.ms_per_word)
            return min(float(cfg.max_words), max(float(cfg.first_max_words), words))
        return min(float(cfg.max_words), cfg.next_words * cfg.growth ** (self._index - 1))

    def _should_cut(self, token: str, gap: str, next_char: str) -> bool:
        if self._words == 0 or (self._words == 1 and _LIST_NUMBER.match(token)):
            return False
        cfg = self.config
        kind = _boundary(token, gap, next_char)
        if self._index == 0:
            if kind != _NONE and self._words >= cfg.first_min_words:
                return True
            limit = cfg.first_max_words
        else:
            if kind == _SENTENCE or (kind == _CLAUSE and self._words >= self._budget()):
                return True
            # without punctuation, cut at twice the budget: one huge chunk would leave a silence
            # after a short first chunk while it is synthesized
            limit = min(cfg.max_words, math.ceil(2 * self._budget()))
        # A forced cut waits one word rather than separate "Dr." from "Smith".
        return self._words >= limit and not _is_abbreviation(token)

    def _emit(self, raw: str, out: list[str]) -> None:
        text = clean_for_speech(raw) if self.config.clean else _WS.sub(" ", raw).strip()
        if text:
            out.append(text)
            self._index += 1
