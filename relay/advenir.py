"""Advenir (S4): the IOP never sees the real token of a non-roaming charge, pushed or pulled."""

from __future__ import annotations

from typing import Any

from relay.config import Operator, Settings


def is_local(op: Operator, cdr_token: dict[str, Any]) -> bool:
    """A charge is not roaming when its token was issued by one of the operator's local issuers."""
    issuer = f"{str(cdr_token.get('country_code', '')).upper()}:{str(cdr_token.get('party_id', '')).upper()}"
    local = op.advenir_local_issuers or [f"{op.country_code}:{op.party_id}"]
    return issuer in {x.upper() for x in local}


def anonymise(settings: Settings, country_code: str, party_id: str, doc: dict[str, Any]) -> dict[str, Any]:
    """The document as the IOP may see it: ``cdr_token`` replaced for a non-roaming charge, else unchanged."""
    op = settings.operator(country_code, party_id)
    token = doc.get("cdr_token")
    if op is None or not op.advenir or not isinstance(token, dict) or not is_local(op, token):
        return doc
    a = settings.advenir
    # The whole cdr_token is replaced, not patched: an extra field of the CSMS's must not identify the driver.
    return {
        **doc,
        "cdr_token": {
            "country_code": a.country_code,
            "party_id": a.party_id,
            "uid": a.uid,
            "type": a.type,
            "contract_id": a.contract_id,
        },
    }
