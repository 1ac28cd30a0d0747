"""Every typed problem of a body, not only the first: msgspec's decoder stops at the first error.

Only on the slow path (a body the typed decoder refused): the body is read as plain JSON and walked along
its model's fields (msgspec.structs.fields), each leaf checked with ``msgspec.convert`` (the same
constraints and DateTime hook as the decoder), so that a CSMS developer sees every missing field and
every wrong type in one answer instead of one per attempt.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import msgspec

from relay.errors import Problem
from relay.timestamps import NOT_OCPI_DATETIME, instant_hook

# A body with more problems than this gets the first ones: the answer stays small whatever is sent.
MAX_PROBLEMS = 50


def type_problems(model: type[msgspec.Struct], doc: Any, path: str = "$") -> list[Problem]:
    """The problems of ``doc`` (plain JSON) against ``model``, in field order, at most MAX_PROBLEMS."""
    found: list[Problem] = []
    _check(model, doc, path, found)
    return found[:MAX_PROBLEMS]


def _problem(path: str, message: str) -> Problem:
    rule = "ocpi.datetime" if message == NOT_OCPI_DATETIME else "ocpi.type"
    return Problem(field=path, rule=rule, message=message)


def _struct_of(tp: Any) -> type[msgspec.Struct] | None:
    return tp if isinstance(tp, type) and issubclass(tp, msgspec.Struct) else None


def _check(tp: Any, value: Any, path: str, found: list[Problem]) -> None:
    if len(found) >= MAX_PROBLEMS:
        return
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        inner = typing.get_args(tp)[0]
        if _struct_of(inner) or typing.get_origin(inner) in (list, typing.Union, types.UnionType):
            _check(inner, value, path, found)
            return
    if (model := _struct_of(tp)) is not None and isinstance(value, dict):
        _check_struct(model, value, path, found)
        return
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(tp) or (Any,)
        for i, element in enumerate(value):
            _check(item, element, f"{path}[{i}]", found)
        return
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if value is None and type(None) in members:
            return
        structs = [m for m in members if _struct_of(m) or typing.get_origin(m) is list]
        if len(structs) == 1 and isinstance(value, (dict, list)):
            _check(structs[0], value, path, found)
            return
    _leaf(tp, value, path, found)


def _check_struct(model: type[msgspec.Struct], value: dict[str, Any], path: str, found: list[Problem]) -> None:
    fields = msgspec.structs.fields(model)
    known = {f.encode_name for f in fields}
    for f in fields:
        here = f"{path}.{f.encode_name}"
        if f.encode_name not in value:
            if f.required:
                found.append(Problem(field=here, rule="ocpi.required",
                                     message=f"Object missing required field `{f.encode_name}`"))  # fmt: skip
            continue
        _check(f.type, value[f.encode_name], here, found)
    if model.__struct_config__.forbid_unknown_fields:
        found += [_problem(f"{path}.{k}", "Object contains unknown field") for k in value if k not in known]


def _leaf(tp: Any, value: Any, path: str, found: list[Problem]) -> None:
    try:
        msgspec.convert(value, tp, dec_hook=instant_hook)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        found.append(_problem(path + where.rstrip("`"), message))
    except (TypeError, ValueError, RecursionError) as exc:  # msgspec cannot convert to it: report, never crash
        found.append(_problem(path, str(exc)))
