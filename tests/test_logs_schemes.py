"""Found in review of issue 18's redactor change (prose after "token" left alone): what it now lets through."""

from __future__ import annotations

import pytest

from relay.logs import REDACTED, Redactor


@pytest.mark.parametrize(
    "line",
    [
        # An HTTP header as a library or an exception prints it, OCPI's scheme in lower case (RFC 7235: schemes are
        # case-insensitive; some OCPI clients send "token"), a token of lower-case letters (a passphrase-style
        # secret, or a peer's token the relay does not know, e.g. one rotated away).
        "authorization: token wkxqmhzrtplvbnsd",
        "Authorization: token wkxqmhzrtplvbnsd",
        "headers={'Authorization': 'token wkxqmhzrtplvbnsd'}",
        "token wkxqmhzrtplvbnsd",
    ],
)
def test_lower_case_token_after_token_scheme_is_redacted(line: str) -> None:
    # Before issue 18, _AUTH_RE replaced any "token <4+ chars>"; _prose() now keeps "token" + [a-z]+ as prose,
    # and _PAIR_RE's lookahead skips "authorization: token …" because _AUTH_RE was supposed to have handled it.
    out = Redactor()._clean(line)
    assert "wkxqmhzrtplvbnsd" not in out, out
    assert REDACTED in out
