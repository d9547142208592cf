"""``json_schema``: the response contains a JSON object valid under a JSON Schema."""

from __future__ import annotations

import json
import re
from typing import Any

from areal_agents.extras import require

from .base import Verdict, shorten

_MAX_STARTS = 256  # '{' positions tried per response: bounds the work on pathological text
_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.DOTALL)


def _jsonschema() -> Any:
    return require("jsonschema", "json_schema", "the 'json_schema' verifier")


def find_json_object(text: str) -> dict[str, Any] | None:
    """The last JSON object in ``text`` (inside a ```json fence when there is one), or None.

    Example:
        >>> find_json_object('Sure: {"name": "Ada", "age": 36}. Done.')
        {'name': 'Ada', 'age': 36}
    """
    fenced = _FENCE.findall(text)
    if fenced:
        text = fenced[-1]
    decoder, found, end = json.JSONDecoder(), None, 0
    starts = [i for i, ch in enumerate(text) if ch == "{"][:_MAX_STARTS]
    for i in starts:
        if i < end:
            continue  # inside the object decoded last
        try:
            value, stop = decoder.raw_decode(text, i)
        except ValueError:
            continue
        if isinstance(value, dict):
            found, end = value, stop
    return found


def _load_schema(schema: Any, what: str) -> dict[str, Any]:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ValueError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{what} must be a JSON Schema object, got {type(schema).__name__}")
    cls = _jsonschema().validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except _jsonschema().SchemaError as exc:
        raise ValueError(f"{what} is not a valid JSON Schema: {exc.message}") from None
    return schema


class JSONSchemaVerifier:
    """Score 1 when the response holds a JSON object valid under a JSON Schema.

    The object is the last one in the response (inside the last ```json fence when there is
    one). Without a ``schema`` option the task's answer is the schema (a dict or a JSON
    string). With ``schema``, the answer is either None (validity is enough) or the expected
    object, which the response's object must also equal.

    Args:
        schema: a JSON Schema for every task (dict or JSON string), or None.

    Raises:
        ModuleNotFoundError: ``jsonschema`` is not installed (the message names the extra).
        ValueError: ``schema`` is not a valid JSON Schema.

    Example:
        >>> v = JSONSchemaVerifier({"type": "object", "required": ["age"]})
        >>> v.verify('{"age": 36}', None).score, v.verify('{"name": "Ada"}', None).reason
        (1.0, "the JSON object does not match the schema: 'age' is a required property")
    """

    def __init__(self, schema: dict[str, Any] | str | None = None) -> None:
        _jsonschema()
        self.schema = None if schema is None else _load_schema(schema, "the schema option")

    def verify(self, response: str, answer: Any) -> Verdict:
        """See the class docstring. Raises ``ValueError`` only for an unusable ``answer``."""
        if self.schema is None:
            schema, expected = _load_schema(answer, "the reference answer (the schema)"), None
        else:
            schema, expected = self.schema, answer
        text = response if isinstance(response, str) else ""
        if not text.strip():
            return Verdict(0.0, "empty response")
        obj = find_json_object(text)
        if obj is None:
            return Verdict(0.0, f"no JSON object found in the response {shorten(text)!r}")
        validator = _jsonschema().validators.validator_for(schema)(schema)
        error = _jsonschema().exceptions.best_match(validator.iter_errors(obj))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)
            at = f" (at {where})" if where else ""
            return Verdict(0.0, f"the JSON object does not match the schema: {error.message}{at}")
        if expected is not None:
            if isinstance(expected, str):
                expected = json.loads(expected)
            if obj != expected:
                return Verdict(0.0, "the JSON object is valid but not the expected object")
            return Verdict(1.0, "the JSON object is valid and equals the expected object")
        return Verdict(1.0, "the JSON object is valid under the schema")
