"""TextChunker: LLM text deltas -> speakable chunks (pure logic, no models)."""

from __future__ import annotations

import random
import re

import pytest
from pydantic import ValidationError

from services.chunking import ChunkerConfig, TextChunker, clean_for_speech

LONG = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch "
    "and wonders why it keeps doing that every single morning. It is a mystery, and nobody "
    "in the village has an answer; some say the fox is bored, others think it likes the dog. "
    "Either way, the show goes on! Would you watch it too? I certainly would."
)


def random_deltas(text: str, seed: int, max_len: int = 7) -> list[str]:
    """Split text into random-size pieces, often inside words and around spaces."""
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, max_len)
        out.append(text[i : i + n])
        i += n
    return out


def run(deltas: list[str], cfg: ChunkerConfig | None = None) -> list[str]:
    c = TextChunker(cfg)
    out: list[str] = []
    for d in deltas:
        out += c.push(d)
    return out + c.flush()


def words(text: str) -> list[str]:
    return text.split()


def boundary_offsets(text: str, chunks: list[str]) -> list[int]:
    """Word index at which each chunk after the first starts, checking chunks tile the words."""
    all_words = words(text)
    idx, starts = 0, []
    for ch in chunks:
        cw = words(ch)
        assert all_words[idx : idx + len(cw)] == cw, (ch, all_words[idx : idx + len(cw)])
        idx += len(cw)
        starts.append(idx)
    assert idx == len(all_words)
    return starts[:-1]


@pytest.mark.parametrize("seed", range(25))
def test_token_stream_small_first_chunk_no_split_words(seed: int) -> None:
    cfg = ChunkerConfig()
    chunks = run(random_deltas(LONG, seed), cfg)
    assert len(chunks) > 3
    assert cfg.first_min_words <= len(words(chunks[0])) <= cfg.first_max_words
    # Joining the chunks gives back the text (modulo whitespace), and every cut is at a space.
    assert " ".join(chunks) == " ".join(words(LONG))
    boundary_offsets(LONG, chunks)


def test_output_does_not_depend_on_how_text_was_split() -> None:
    reference = run([LONG])
    for seed in range(10):
        assert run(random_deltas(LONG, seed, max_len=3)) == reference
    assert run(list(LONG)) == reference  # one character at a time


def test_delta_ending_mid_word_is_not_cut() -> None:
    c = TextChunker(ChunkerConfig(first_min_words=1, first_max_words=2))
    assert c.push("Hello wonder") == []
    assert c.push("ful ") == []  # the next word has not started: the cut is not decided yet
    assert c.push("world") == ["Hello wonderful"]
    assert c.flush() == ["world"]


def test_first_chunk_cut_at_clause_when_long_enough() -> None:
    chunks = run(["Sure, I can help, it is easy to do and quick."], ChunkerConfig(first_min_words=3, first_max_words=6))
    assert chunks[0] == "Sure, I can help,"  # 'Sure,' alone is too short
    chunks = run(["Sure, I can help, it is easy to do and quick."])  # defaults: 2-3 words
    assert chunks[0] == "Sure, I can"
    chunks = run(["Of course, that is right."], ChunkerConfig(first_min_words=2))
    assert chunks[0] == "Of course,"


def test_first_chunk_cut_after_max_words_without_punctuation() -> None:
    cfg = ChunkerConfig(first_min_words=3, first_max_words=5)
    chunks = run(["one two three four five six seven eight nine ten"], cfg)
    assert chunks[0] == "one two three four five"


def test_lowercase_after_period_is_not_a_sentence_end() -> None:
    cfg = ChunkerConfig(first_min_words=1, first_max_words=40)
    assert run(["We met at the Univ. of something. Then left."], cfg) == [
        "We met at the Univ. of something.",
        "Then left.",
    ]


def test_forced_cut_does_not_separate_abbreviation_from_name() -> None:
    cfg = ChunkerConfig(first_min_words=1, first_max_words=3)
    assert run(["I met Dr. Smith at noon today"], cfg) == ["I met Dr. Smith", "at noon today"]


def test_later_chunks_grow_and_cut_at_sentences_and_clauses() -> None:
    cfg = ChunkerConfig(first_min_words=2, first_max_words=4, next_words=4, growth=2.0)
    text = (
        "Hi there, friend. A b c d, e f g h, i j k l m n, o p q r s t u v w x, y z. "
        "Short one. Last"
    )
    chunks = run([text], cfg)
    assert chunks == [
        "Hi there,",
        "friend.",  # sentence ends always cut (budget 4)
        "A b c d, e f g h,",  # budget 8: the first clause boundary after 8 words
        "i j k l m n, o p q r s t u v w x,",  # budget 16
        "y z.",
        "Short one.",
        "Last",
    ]


def test_max_words_cuts_text_without_punctuation() -> None:
    cfg = ChunkerConfig(first_min_words=1, first_max_words=2, max_words=5)
    chunks = run([" ".join(f"w{i}" for i in range(20))], cfg)
    assert [len(words(c)) for c in chunks] == [2, 5, 5, 5, 3]


@pytest.mark.parametrize(
    "text",
    [
        "Mr. Smith and Dr. Jones met at St. Mary's church at noon today.",
        "You can use fruit e.g. apples or pears i.e. anything sweet you like.",
        "The price went up by 3.5 percent to 12.75 dollars per share this year.",
        "Call J. R. R. Tolkien fans in the U.S. and ask them about it.",
        "This costs approx. five dollars per pound at the shop.",
    ],
)
def test_abbreviations_and_decimals_are_not_cut(text: str) -> None:
    cfg = ChunkerConfig(first_min_words=1, first_max_words=40)  # only a sentence end may cut
    for seed in range(5):
        assert run(random_deltas(text, seed, max_len=3), cfg) == [text]


def test_sentence_after_abbreviation_like_etc_still_cuts() -> None:
    cfg = ChunkerConfig(first_min_words=1, first_max_words=40)
    chunks = run(["Apples, pears, etc. Then we left."], cfg)
    assert chunks == ["Apples,", "pears, etc.", "Then we left."]


def test_flush_returns_remainder_and_starts_new_segment() -> None:
    c = TextChunker(ChunkerConfig(first_min_words=2, first_max_words=3))
    out = c.push("one two three four five six seven")
    assert out == ["one two three"]
    assert c.pending == "four five six seven"
    assert c.flush() == ["four five six seven"]
    assert c.flush() == []
    # A new segment gets a small first chunk again.
    assert c.push("a b c d e f g h ") + c.flush() == ["a b c", "d e f g h"]


def test_reset_drops_pending_text() -> None:
    c = TextChunker()
    c.push("some unfinished text that")
    c.reset()
    assert c.pending == ""
    assert c.flush() == []


def test_newlines_and_markdown_are_cleaned() -> None:
    text = (
        "## Shopping list\n\n"
        "Here is what you need:\n"
        "- **two** apples 🍎\n"
        "* some `fresh` bread 👍🏽\n"
        "1. milk\n"
        "> see [the shop](https://example.com) 😀\n"
    )
    chunks = run(random_deltas(text, 3), ChunkerConfig(first_min_words=1))
    assert chunks == [
        "Shopping list",
        "Here is what you need:",
        "two apples",
        "some fresh bread",
        "1. milk",
        "see the shop",
    ]
    for ch in chunks:
        assert not re.search(r"[*#`>\[\]()]", ch)


def test_clean_for_speech() -> None:
    assert clean_for_speech("**Bold** and _italic_ and `code` 🙂!") == "Bold and italic and code !"
    assert clean_for_speech("# Title\n---\n+ item") == "Title item"
    assert clean_for_speech("snake_case stays, 3.5 stays, C# loses its hash") == (
        "snake_case stays, 3.5 stays, C loses its hash"
    )
    assert clean_for_speech("👨‍👩‍👧 family ❤️") == "family"
    assert clean_for_speech("   ") == ""


def test_emoji_only_chunk_is_dropped() -> None:
    chunks = run(["Great job, you did it. 🎉🎉 \n Bye now."], ChunkerConfig(first_min_words=1))
    assert chunks == ["Great job,", "you did it.", "Bye now."]


def test_config_is_validated() -> None:
    with pytest.raises(ValidationError):
        ChunkerConfig(first_min_words=5, first_max_words=3)
    with pytest.raises(ValidationError):
        ChunkerConfig(unknown=1)  # type: ignore[call-arg]


def test_unpunctuated_text_is_cut_at_twice_the_budget() -> None:
    """A short first chunk must not be followed by one huge chunk (a silence while it is synthesized)."""
    words = [f"w{i}" for i in range(40)]
    chunks = run([" ".join(words)], ChunkerConfig(first_min_words=2, first_max_words=3, next_words=8, growth=1.5))
    sizes = [len(c.split()) for c in chunks]
    assert sizes[0] == 3 and sizes[1] == 16 and max(sizes) <= 24, sizes
    assert " ".join(chunks).split() == words


def test_cut_speaks_the_complete_words_now_and_the_segment_goes_on() -> None:
    ch = TextChunker(ChunkerConfig(adaptive=False, next_words=8))
    assert ch.push("Sure, the boiling point ") == ["Sure, the boiling"]
    assert ch.cut() == []  # "point" is not complete until the next word starts
    assert ch.push("of water is approx") == []
    assert ch.cut() == ["point of water is"]
    assert ch.cut() == []  # nothing complete pending
    assert ch.push("imately 100°C (212°F). Then") == ["approximately 100°C (212°F)."]
    assert ch.chunks_emitted == 3  # one segment: the next chunk is not a short first one


def test_cut_waits_for_the_first_chunk_and_after_an_abbreviation() -> None:
    ch = TextChunker(ChunkerConfig(adaptive=False))
    ch.push("Hello there ")
    assert ch.cut() == []  # the first chunk has rules of its own
    assert ch.push("friend. Ask Dr. S") == ["Hello there friend."]
    assert ch.cut() == []  # "Dr." waits for "Smith"
    ch.push("mith now ")
    assert ch.cut() == ["Ask Dr. Smith"]


def test_cut_keeps_a_list_number_with_its_item() -> None:
    ch = TextChunker(ChunkerConfig(adaptive=False))
    assert ch.push("Yes. You need them.\n1. F") == ["Yes. You need", "them."]
    assert ch.cut() == []  # "1." alone would be read as "one"
