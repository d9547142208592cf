"""The json_schema verifier: finding the object, the schema as the answer or an option."""

from __future__ import annotations

import pytest

pytest.importorskip("jsonschema")

from areal_agents.verifiers import Verdict
from areal_agents.verifiers.json_schema import JSONSchemaVerifier, find_json_object

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}


@pytest.mark.parametrize(
    ("response", "verdict"),
    [
        ('{"name": "Ada", "age": 36}', Verdict(1.0, "the JSON object is valid under the schema")),
        (
            'Here it is:\n```json\n{"name": "Ada", "age": 36}\n```',
            Verdict(1.0, "the JSON object is valid under the schema"),
        ),
        (
            '{"name": "Ada"}',
            Verdict(0.0, "the JSON object does not match the schema: 'age' is a required property"),
        ),
        (
            '{"name": "Ada", "age": -1}',
            Verdict(
                0.0,
                "the JSON object does not match the schema: -1 is less than the minimum of 0 (at age)",
            ),
        ),
        (
            '{"name": "Ada", "age": 36',
            Verdict(0.0, 'no JSON object found in the response \'{"name": "Ada", "age": 36\''),
        ),
        ("[1, 2]", Verdict(0.0, "no JSON object found in the response '[1, 2]'")),
        ("", Verdict(0.0, "empty response")),
    ],
)
def test_schema_as_the_answer(response, verdict):
    assert JSONSchemaVerifier().verify(response, PERSON) == verdict


def test_schema_as_a_json_string_answer():
    assert JSONSchemaVerifier().verify('{"a": 1}', '{"type": "object"}').score == 1.0


def test_schema_option_with_an_expected_object():
    v = JSONSchemaVerifier(schema=PERSON)
    assert v.verify('{"name": "Ada", "age": 36}', None).score == 1.0
    assert v.verify('{"name": "Ada", "age": 36}', {"name": "Ada", "age": 36}) == Verdict(
        1.0, "the JSON object is valid and equals the expected object"
    )
    assert v.verify('{"name": "Bob", "age": 36}', {"name": "Ada", "age": 36}) == Verdict(
        0.0, "the JSON object is valid but not the expected object"
    )


def test_find_json_object_takes_the_last_top_level_object():
    assert find_json_object('draft {"a": 1} final {"a": {"b": 2}}') == {"a": {"b": 2}}
    assert find_json_object("{not json} {}") == {}
    assert find_json_object("nothing") is None


def test_invalid_schemas_raise_value_error():
    with pytest.raises(ValueError, match="the schema option is not a valid JSON Schema"):
        JSONSchemaVerifier(schema={"type": 12})
    with pytest.raises(ValueError, match="the reference answer \\(the schema\\) is not valid JSON"):
        JSONSchemaVerifier().verify("{}", "{oops")
    with pytest.raises(ValueError, match="must be a JSON Schema object, got list"):
        JSONSchemaVerifier().verify("{}", [1])
