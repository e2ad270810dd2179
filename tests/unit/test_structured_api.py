"""kiln/server/structured_api.py: every API's structured-output fields become one StructuredSpec, and a bad
schema / regex / grammar / field is a 400 ("invalid") that names what is wrong."""
from __future__ import annotations

import asyncio
import json

import pytest

from kiln.engine.structured import StructuredSpec
from kiln.errors import RequestError
from kiln.server.structured_api import structured_outputs

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}, "required": ["b"]}


def read(body):
    return asyncio.run(structured_outputs(body))


def error(body) -> RequestError:
    with pytest.raises(RequestError) as e:
        read(body)
    assert e.value.error_type == "invalid" and e.value.http_status == 400
    return e.value


@pytest.mark.parametrize("body, spec", [
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredSpec("json_object", "")),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     StructuredSpec.json_schema(SCHEMA)),
    ({"response_format": json.dumps({"type": "json_object"})}, StructuredSpec("json_object", "")),  # KServe text
    ({"structured_outputs": {"json": SCHEMA}}, StructuredSpec.json_schema(SCHEMA)),
    ({"structured_outputs": {"regex": r"\d+"}}, StructuredSpec("regex", r"\d+")),
    ({"structured_outputs": {"choice": ["a", "b"]}}, StructuredSpec.choice(["a", "b"])),
    ({"structured_outputs": {"grammar": 'root ::= "x"'}}, StructuredSpec("grammar", 'root ::= "x"')),
    ({"guided_json": json.dumps(SCHEMA)}, StructuredSpec.json_schema(SCHEMA)),
    ({"guided_regex": "[ab]+"}, StructuredSpec("regex", "[ab]+")),
    ({"guided_choice": ["yes", "no"]}, StructuredSpec.choice(["yes", "no"])),
    ({"guided_grammar": 'root ::= "y"'}, StructuredSpec("grammar", 'root ::= "y"')),
])
def test_fields_become_one_spec(body, spec):
    assert read(body) == spec


def test_schema_keeps_property_order():
    spec = read({"structured_outputs": {"json": SCHEMA}})
    assert list(json.loads(spec.value)["properties"]) == ["b", "a"]


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}}},
     "response_format", ["JSON schema", "objekt"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", ["required"]),
    ({"response_format": {"type": "xml"}}, "response_format.type", ["text, json_object or json_schema"]),
    ({"response_format": "{nope"}, "response_format", ["not valid JSON"]),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", ["regex", "Unclosed"]),
    ({"structured_outputs": {"grammar": 'start ::= "a"'}}, "structured_outputs", ["grammar", "root"]),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", ["non-empty list"]),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", ["exactly one"]),
    ({"structured_outputs": "a+"}, "structured_outputs", ["must be an object"]),
    ({"guided_json": "{bad json"}, "guided_json", ["not valid JSON"]),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", ["one structured-output"]),
])
def test_bad_constraints_are_400s_that_say_what_is_wrong(body, param, words):
    e = error(body)
    assert e.param == param
    for w in words:
        assert w in e.message, e.message
    assert "/project/cpp" not in e.message  # xgrammar's source location is not the user's business
