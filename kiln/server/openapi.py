"""The OpenAPI document served at /openapi.json: the request bodies of the native, OpenAI and KServe generate
routes. The OpenAI bodies come from their pydantic models (kiln.server.openai_schema); the native body, which
is validated by hand (kiln.server.seed_protocol), is described here, and docs/api.md is its prose form."""
from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}
_STR = {"type": "string"}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_STOP = {"anyOf": [_STR, {"type": "array", "items": {"anyOf": [_STR, _IDS]}}]}

NATIVE_REQUEST: dict[str, Any] = {
    "title": "NativeRequest",
    "type": "object",
    "description": "The seed's native request (docs/api.md); one of text, input_ids or messages is required.",
    "properties": {
        "req_id": _STR, "text": _STR, "input_ids": _IDS, "system": _STR,
        "messages": {"type": "array", "items": {"type": "object", "required": ["content"], "properties": {
            "role": _STR, "content": {"anyOf": [_STR, {"type": "array"}]}}}},
        "max_dec_len": {"type": "integer", "minimum": 1}, "min_dec_len": {"type": "integer", "minimum": 1},
        "seq_len": {"type": "integer", "minimum": 1}, "max_tokens": {"type": "integer", "minimum": 1},
        "topp": {"type": "number", "minimum": 0, "maximum": 1}, "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "temperature": {"type": "number", "minimum": 0}, "top_k": {"type": "integer", "minimum": -1},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1}, "penalty_score": {"type": "number", "exclusiveMinimum": 0},
        "frequency_score": {"type": "number", "minimum": -2, "maximum": 2},
        "presence_score": {"type": "number", "minimum": -2, "maximum": 2},
        "seed": _INT, "infer_seed": _INT, "eos_token_ids": {"anyOf": [_INT, _IDS]},
        "stop_sequences": _STOP, "stop": _STOP, "stream": _BOOL, "return_all_tokens": _BOOL,
        "return_usage": _BOOL, "benchmark": _BOOL, "timeout": {"type": "number", "exclusiveMinimum": 0},
        "enable_text_truncate": _BOOL, "model": _STR,
    },
}

KSERVE_GENERATE: dict[str, Any] = {
    "title": "KServeGenerateRequest",
    "type": "object",
    "description": "{\"IN\": json.dumps([native request])}, {\"text_input\", \"parameters\"}, or a native request.",
    "properties": {"IN": {"anyOf": [_STR, {"type": "array"}, {"type": "object"}]}, "text_input": _STR,
                   "parameters": {"type": "object"}, "id": _STR},
}


def _body(ref: str) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "$ref": f"#/components/schemas/{ref}"}}}},
            "responses": {"200": {"description": "the answer (JSON, NDJSON or SSE when streaming)"},
                          "4XX": {"description": "a bad request: the body says what to fix"}}}


@lru_cache(maxsize=1)
def _document() -> dict:
    from kiln.server.openai_schema import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                           EmbeddingRequest, TokenizeChatRequest, TokenizeCompletionRequest)

    schemas: dict[str, Any] = {"NativeRequest": NATIVE_REQUEST, "KServeGenerateRequest": KSERVE_GENERATE}
    from kiln.server.responses_api import OPENAPI_SCHEMA as responses_request
    schemas["ResponsesRequest"] = responses_request
    schemas["LoadLoRAAdapterRequest"] = {"type": "object", "required": ["lora_name", "lora_path"],
                                         "properties": {"lora_name": _STR, "lora_path": _STR}}
    schemas["UnloadLoRAAdapterRequest"] = {"type": "object", "required": ["lora_name"],
                                           "properties": {"lora_name": _STR}}
    for model in (ChatCompletionRequest, CompletionRequest, TokenizeCompletionRequest, TokenizeChatRequest,
                  DetokenizeRequest, EmbeddingRequest):
        s = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(s.pop("$defs", {}))
        schemas[model.__name__] = s
    schemas["ChatOrNative"] = {"anyOf": [{"$ref": "#/components/schemas/ChatCompletionRequest"},
                                         {"$ref": "#/components/schemas/NativeRequest"}]}
    schemas["CompletionOrNative"] = {"anyOf": [{"$ref": "#/components/schemas/CompletionRequest"},
                                               {"$ref": "#/components/schemas/NativeRequest"}]}
    schemas["TokenizeRequest"] = {"anyOf": [{"$ref": "#/components/schemas/TokenizeCompletionRequest"},
                                            {"$ref": "#/components/schemas/TokenizeChatRequest"}]}
    paths = {
        "/v1/chat/completions": {"post": _body("ChatOrNative")},
        "/v1/completions": {"post": _body("CompletionOrNative")},
        "/v1/chat/completions/chat/completions": {"post": _body("ChatCompletionRequest")},
        "/v1/chat/completions/completions": {"post": _body("CompletionRequest")},
        "/v1/embeddings": {"post": _body("EmbeddingRequest")},
        "/v1/responses": {"post": _body("ResponsesRequest")},
        "/tokenize": {"post": _body("TokenizeRequest")},
        "/detokenize": {"post": _body("DetokenizeRequest")},
        "/v1/load_lora_adapter": {"post": _body("LoadLoRAAdapterRequest")},  # KILN_ALLOW_RUNTIME_LORA_UPDATING
        "/v1/unload_lora_adapter": {"post": _body("UnloadLoRAAdapterRequest")},
        "/v2/models/model/generate": {"post": _body("KServeGenerateRequest")},
        "/v2/models/model/generate_stream": {"post": _body("KServeGenerateRequest")},
    }
    import kiln

    return {"openapi": "3.1.0", "info": {"title": "Kiln", "version": getattr(kiln, "__version__", "0")},
            "paths": paths, "components": {"schemas": schemas}}


def openapi_schema() -> dict:
    return copy.deepcopy(_document())
