"""The JSON schema and chat request the structured-output tests (engine and server) share."""

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 2},
    },
    "required": ["name", "age", "color", "tags"],
}
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON: name, age, favourite color, tags."}]
