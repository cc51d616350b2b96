"""serve/replica/llm.py TextStream: token ids become streamed text as soon as it is final. Pure, no model:
a byte tokenizer whose ids are bytes, decoded the way the synthetic tokenizer's ByteLevel decoder
does (each maximal invalid UTF-8 subpart becomes one U+FFFD)."""
from __future__ import annotations

from serve.replica.llm import TextStream


class ByteIds:
    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def stream(ids: list[int], stop=()) -> list[str]:
    text = TextStream(ByteIds(), list(stop))
    return [text.update(ids[: i + 1], i == len(ids) - 1)[0] for i in range(len(ids))]


def test_a_multibyte_character_waits_for_its_last_byte():
    assert stream(list("a€b".encode())) == ["a", "", "", "€", "b"]


def test_a_run_of_invalid_bytes_streams_one_step_behind():
    """Each invalid byte is final once the next one arrives: the text is not held to the end."""
    parts = stream([0xFF] * 6 + [ord("x")])
    assert parts == ["", "\ufffd", "\ufffd", "\ufffd", "\ufffd", "\ufffd", "\ufffdx"]
    assert "".join(parts) == "\ufffd" * 6 + "x"


def test_a_truncated_sequence_then_an_invalid_byte():
    assert "".join(stream([0xE2, 0x82, 0xFF, ord("y")])) == "\ufffd\ufffdy"


def test_the_end_flushes_what_was_held():
    assert stream([ord("o"), 0xE2]) == ["o", "\ufffd"]


def test_a_stop_string_ends_the_text_before_it_and_its_prefix_is_held():
    parts = stream(list(b"hello END more"), stop=["END"])
    assert "".join(parts) == "hello "
