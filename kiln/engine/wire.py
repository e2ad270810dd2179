"""The messages between the front ends and the engine core process, and their encoding.

Each message is a dataclass with a `kind`; on the wire it is one msgpack map {"kind": ..., field: value, ...}
per ZMQ frame. `encode()` and `decode()` are the only (de)serialization of the engine socket: `decode()`
raises WireError on anything that is not one of these messages (a foreign client's bytes included).

  front end -> engine: Hello (the per-start secret and the front end's pid; nothing is served before it),
                       AddRequest, Abort, LoRAUpdate (answered by an Outputs of its request_id)
  engine -> front end: Outputs (EngineOutputs of one or more requests), Stats (at least every heartbeat),
                       Fatal (the engine could not start)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import msgpack

from kiln.engine.request import EngineOutput, EngineStats


class WireError(ValueError):
    """Bytes that are not a message of this protocol."""


@dataclass
class Hello:
    kind: ClassVar[str] = "hello"
    secret: str
    pid: int


@dataclass
class AddRequest:
    kind: ClassVar[str] = "add"
    request_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]                 # SamplingParams.to_dict(); the engine rebuilds and checks it
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # the shapes only; the values (token ids, sampling fields) are EngineCore.add_request's to check
        if not (isinstance(self.request_id, str) and isinstance(self.prompt_token_ids, list)
                and isinstance(self.params, dict) and isinstance(self.eos_token_ids, list)):
            raise TypeError("add: request_id str, prompt_token_ids list, params map, eos_token_ids list")


@dataclass
class Abort:
    kind: ClassVar[str] = "abort"
    request_ids: list[str]

    def __post_init__(self) -> None:
        if not isinstance(self.request_ids, list):
            raise TypeError("abort: request_ids must be a list")


@dataclass
class LoRAUpdate:
    """Load (or unload) a LoRA adapter while serving; the engine answers with one finished EngineOutput of
    request_id, its error set where it could not."""
    kind: ClassVar[str] = "lora"
    request_id: str
    name: str
    load: bool
    path: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.request_id, str) and isinstance(self.name, str) and isinstance(self.load, bool)
                and isinstance(self.path, str)):
            raise TypeError("lora: request_id, name and path str, load bool")


@dataclass
class Outputs:
    kind: ClassVar[str] = "out"
    outputs: list[EngineOutput]


@dataclass
class Stats:
    kind: ClassVar[str] = "stats"
    stats: EngineStats


@dataclass
class Fatal:
    kind: ClassVar[str] = "fatal"
    message: str


Message = Union[Hello, AddRequest, Abort, LoRAUpdate, Outputs, Stats, Fatal]
_KINDS: dict[str, type] = {c.kind: c for c in (Hello, AddRequest, Abort, LoRAUpdate, Outputs, Stats, Fatal)}


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def encode(msg: Message) -> bytes:
    d = _fields(msg)
    if isinstance(msg, Outputs):
        d["outputs"] = [_fields(o) for o in msg.outputs]
    elif isinstance(msg, Stats):
        d["stats"] = _fields(msg.stats)
    d["kind"] = msg.kind
    return msgpack.packb(d)


def decode(raw: bytes) -> Message:
    try:
        d = msgpack.unpackb(raw)
    except Exception as e:  # noqa: BLE001 - any malformed bytes
        raise WireError(f"not msgpack: {e}") from None
    if not isinstance(d, dict) or d.get("kind") not in _KINDS:
        raise WireError("not a message of the engine protocol")
    cls = _KINDS[d.pop("kind")]
    try:
        if cls is Outputs:
            return Outputs([EngineOutput(**o) for o in d["outputs"]])
        if cls is Stats:
            return Stats(EngineStats(**d["stats"]))
        return cls(**d)
    except (TypeError, KeyError, ValueError) as e:
        raise WireError(f"a malformed {cls.kind!r} message: {e}") from None
