"""ChatHistory: pure logic (no model)."""

from __future__ import annotations

import pytest

from services.conversation.history import MESSAGE_OVERHEAD, ChatHistory
from services.errors import InvalidArgument


def roles(msgs: list[dict[str, str]]) -> list[str]:
    return [m["role"] for m in msgs]


def test_system_prompt_then_alternating_turns() -> None:
    h = ChatHistory("be brief")
    h.add_user("hello")
    h.add_assistant("hi there")
    h.add_user("what time is it?")
    msgs = h.messages()
    assert roles(msgs) == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"] == "be brief"
    assert msgs[-1]["content"] == "what time is it?"
    assert len(h) == 3


def test_no_system_message_when_prompt_empty() -> None:
    h = ChatHistory("")
    h.add_user("hi")
    assert roles(h.messages()) == ["user"]


def test_empty_user_turn_rejected() -> None:
    h = ChatHistory("s")
    with pytest.raises(InvalidArgument):
        h.add_user("   ")


def test_interrupted_answer_keeps_heard_text_without_any_marker() -> None:
    """Markers in the text became the answer style of small models (defect 11)."""
    h = ChatHistory("s")
    h.add_user("tell me a story")
    h.add_assistant("Once upon a time ", interrupted=True)
    h.add_user("stop")
    msgs = h.messages()
    assert msgs[2] == {"role": "assistant", "content": "Once upon a time"}
    assert h.turns[1].interrupted and h.records()[2]["interrupted"]


def test_answer_heard_not_at_all_leaves_no_assistant_message() -> None:
    h = ChatHistory("s")
    h.add_user("one")
    h.add_assistant("", interrupted=True)
    h.add_user("two")
    assert roles(h.messages()) == ["system", "user"] and h.messages()[1]["content"] == "one two"


def test_late_truncate_of_the_last_answer() -> None:
    h = ChatHistory("s")
    h.add_user("q")
    h.add_assistant("one two three four")
    assert h.truncate_last_assistant("one two")
    assert h.messages()[-1]["content"] == "one two" and h.turns[-1].interrupted
    assert h.truncate_last_assistant("") and roles(h.messages()) == ["system", "user"]
    assert not h.truncate_last_assistant("x")


def test_empty_uninterrupted_answer_is_not_a_turn_and_users_merge() -> None:
    h = ChatHistory("s")
    h.add_user("first part")
    h.add_assistant("")
    h.add_user("second part")
    msgs = h.messages()
    assert roles(msgs) == ["system", "user"]
    assert msgs[1]["content"] == "first part second part"


def test_consecutive_assistant_parts_merge_with_last_interrupt_flag() -> None:
    h = ChatHistory("s")
    h.add_user("q")
    h.add_assistant("part one", interrupted=False)
    h.add_assistant("part two", interrupted=True)
    msgs = h.messages()
    assert roles(msgs) == ["system", "user", "assistant"]
    assert msgs[2]["content"] == "part one part two" and h.turns[-1].interrupted


def test_max_turns_keeps_newest_and_starts_with_user() -> None:
    h = ChatHistory("s")
    for i in range(5):
        h.add_user(f"u{i}")
        h.add_assistant(f"a{i}")
    h.add_user("last")
    msgs = h.messages(max_turns=4)
    # the four newest are a3, u4, a4, last; the leading assistant message is dropped
    assert roles(msgs) == ["system", "user", "assistant", "user"]
    assert [m["content"] for m in msgs[1:]] == ["u4", "a4", "last"]
    with pytest.raises(InvalidArgument):
        h.messages(max_turns=-1)


def test_char_budget_trims_oldest_first() -> None:
    h = ChatHistory("sys", max_chars=10_000)
    for i in range(10):
        h.add_user(f"user message number {i}")
        h.add_assistant(f"assistant answer number {i}")
    h.add_user("final question")
    full = h.messages()
    assert len(full) == 22
    budget = 3 + MESSAGE_OVERHEAD + 3 * (30 + MESSAGE_OVERHEAD)
    msgs = h.messages(budget=budget)
    assert msgs[0]["role"] == "system"
    assert msgs[-1]["content"] == "final question"
    assert msgs[1]["role"] == "user"
    used = sum(len(m["content"]) + MESSAGE_OVERHEAD for m in msgs)
    assert used <= budget
    assert len(msgs) < len(full)
    # what is kept is a suffix of the full conversation
    assert msgs[1:] == full[len(full) - len(msgs) + 1 :]


def test_latest_turn_kept_even_if_over_budget() -> None:
    h = ChatHistory("sys", max_chars=20)
    h.add_user("x" * 100)
    msgs = h.messages()
    assert roles(msgs) == ["system", "user"]


def test_token_budget_with_count_function() -> None:
    h = ChatHistory("a b c")
    h.add_user("one two three four")
    h.add_assistant("five six")
    h.add_user("seven")

    def words(s: str) -> int:
        return len(s.split())

    # system 3+8, "seven" 1+8 fit in 20; "five six" (2+8) does not
    msgs = h.messages(budget=20, count=words)
    assert [m["content"] for m in msgs] == ["a b c", "seven"]


def test_clear_keeps_system_prompt() -> None:
    h = ChatHistory("sys")
    h.add_user("hi")
    h.clear()
    assert h.messages() == [{"role": "system", "content": "sys"}]
