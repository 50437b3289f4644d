"""Message and Topic: immutability, signing, serialization, malformed input."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from converge.core import Identity, Message, Topic
from converge.errors import MessageFormatError, UsageError


def make() -> Message:
    return Message(
        sender="alice",
        recipient="bob",
        topics=["chat.general", Topic("alerts")],
        payload={"text": "hi", "n": [1, 2, {"deep": True}]},
        task_id="t1",
    )


def test_topics_are_normalised_to_topic_objects() -> None:
    msg = make()
    assert msg.topics == (Topic("chat.general"), Topic("alerts"))


@pytest.mark.parametrize("name", ["", ".a", "a..b", "a b", "a/b", "a.", 5])
def test_invalid_topic_names_are_rejected(name: Any) -> None:
    with pytest.raises(UsageError):
        Topic(name)


@pytest.mark.parametrize(
    ("topic", "pattern", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.*", True),
        ("a.b.c", "a.*", False),
        ("a.b.c", "a.#", True),
        ("a", "a.#", True),
        ("ab.c", "a.#", False),
        ("a", "a.*", False),
    ],
)
def test_topic_pattern_matching(topic: str, pattern: str, expected: bool) -> None:
    assert Topic(topic).matches(pattern) is expected


def test_message_is_immutable_including_payload() -> None:
    msg = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.sender = "mallory"  # type: ignore[misc]
    with pytest.raises(TypeError):
        msg.payload["text"] = "changed"  # type: ignore[index]
    assert isinstance(msg.payload["n"], tuple)


def test_dict_and_bytes_round_trip() -> None:
    msg = make().sign(Identity())
    assert Message.from_dict(msg.to_dict()) == msg
    assert Message.from_bytes(msg.to_bytes()) == msg
    assert json.loads(msg.to_bytes())["payload"] == {"text": "hi", "n": [1, 2, {"deep": True}]}


def test_signature_verifies_with_signers_key_only() -> None:
    alice, eve = Identity(), Identity()
    signed = make().sign(alice)
    assert signed.verify(alice.public_key)
    assert signed.verify(alice.public_key_bytes)
    assert not signed.verify(eve.public_key)
    assert not make().verify(alice.public_key)


def test_any_change_invalidates_the_signature() -> None:
    alice = Identity()
    signed = make().sign(alice)
    for change in [
        {"payload": {"text": "HI", "n": [1, 2, {"deep": True}]}},
        {"recipient": "carol"},
        {"topics": ("chat.general",)},
        {"timestamp": signed.timestamp + 1},
        {"task_id": None},
    ]:
        assert not dataclasses.replace(signed, **change).verify(alice.public_key)


def test_signature_survives_serialization() -> None:
    alice = Identity()
    wire = make().sign(alice).to_bytes()
    assert Message.from_bytes(wire).verify(alice.public_key)


def test_sign_rejects_a_non_identity() -> None:
    with pytest.raises(UsageError, match="Identity"):
        make().sign("alice")  # type: ignore[arg-type]  # raised AttributeError


def test_verify_rejects_a_non_key() -> None:
    with pytest.raises(UsageError):
        make().verify(b"short")
    with pytest.raises(UsageError):
        make().verify("key")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "payload",
    [{"x": float("nan")}, {"x": object()}, {1: "int key"}, {"x": {"y": b"bytes"}}, "not a map"],
)
def test_non_json_payload_is_rejected(payload: Any) -> None:
    with pytest.raises(MessageFormatError):
        Message(sender="a", payload=payload)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"[1,2]",
        b'{"payload": {}}',
        b'{"sender": "a", "extra": 1}',
        b'{"sender": 5}',
        b'{"sender": "a", "timestamp": "yesterday"}',
        b'{"sender": "a", "topics": "chat"}',
        b'{"sender": "a", "topics": ["bad topic"]}',
        b'{"sender": "a", "signature": "!!!"}',
        b'{"sender": "a", "signature": 12}',
        b'{"sender": "a", "payload": [1]}',
        b"[" * 100_000,
    ],
)
def test_malformed_bytes_raise_message_format_error(data: bytes) -> None:
    with pytest.raises(MessageFormatError):
        Message.from_bytes(data)


def test_from_bytes_rejects_non_bytes() -> None:
    with pytest.raises(MessageFormatError):
        Message.from_bytes("text")  # type: ignore[arg-type]


def test_absurdly_nested_payload_is_a_format_error() -> None:
    payload: dict[str, Any] = {}
    node = payload
    for _ in range(5000):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(MessageFormatError, match="nested"):
        Message(sender="a", payload=payload)
