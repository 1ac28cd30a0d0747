"""relay.json_depth against a reference (the decoded document, walked), on texts built to mislead it."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from relay.json_depth import MAX_JSON_DEPTH, depth, too_deep


def reference(doc: Any) -> int:
    if isinstance(doc, list):
        return 1 + max((reference(x) for x in doc), default=0)
    if isinstance(doc, dict):
        return 1 + max((reference(x) for x in doc.values()), default=0)
    return 0


def interleaved(n: int) -> bytes:
    """n nested arrays whose strings hold the brackets that would pair them off as 2 levels."""
    return b'["]",' * (n - 1) + b"[1]" + b',"["]' * (n - 1)


TEXTS = [
    b"1",
    b'"[["',
    b"[]",
    b"{}",
    b'{"a": [1, {"b": []}]}',
    b'{"a": {"b": {"c": [[{}]]}}}',
    b"[" * 100 + b"]" * 100,
    b'{"a":' * 70 + b"1" + b"}" * 70,
    b'{"k[": "v]", "x": [[["{"]]]}',
    b'{"a": "\\"[[[", "b": [[]]}',
    b'{"a": "\\\\", "b": [[["]"]]]}',
    b'{"a": "\\\\\\"]]", "b": [[{"c": "\\\\"}]]}',
    b'["\\u005b", [["\\u005d"]]]',
    interleaved(100),
    interleaved(3),
]


@pytest.mark.parametrize("text", TEXTS)
def test_depth_matches_the_decoded_document(text: bytes) -> None:
    assert depth(text) == reference(json.loads(text))


def test_depth_of_random_documents_with_brackets_quotes_and_escapes_in_strings() -> None:
    rng = random.Random(14)
    texts = ["", "x[", "]}", '"[', "\\", "\\]", '\\"]', "{{", "é["]
    atoms: list[Any] = [1, None, *texts]

    def doc(level: int) -> Any:
        if level == 0 or rng.random() < 0.2:
            return rng.choice(atoms)
        if rng.random() < 0.5:
            return [doc(level - 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(texts) + str(i): doc(level - 1) for i in range(rng.randint(0, 3))}

    for _ in range(2000):
        d = doc(rng.randint(0, 14))
        for text in (json.dumps(d).encode(), json.dumps(d, ensure_ascii=False).encode()):
            assert depth(text) == reference(d), text


def test_too_deep_counts_brackets_first() -> None:
    assert not too_deep(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    assert too_deep(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    assert too_deep(interleaved(MAX_JSON_DEPTH + 1))
    wide = json.dumps({"evses": [{"connectors": [{"id": str(i)}]} for i in range(200)]}).encode()
    assert not too_deep(wide)  # many brackets, shallow
