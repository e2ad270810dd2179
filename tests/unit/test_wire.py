"""kiln.engine.wire: every message survives the trip; anything else is a WireError, never a crash."""
from __future__ import annotations

import msgpack
import pytest

from kiln.engine.request import EngineOutput, EngineStats, SamplingParams
from kiln.engine.wire import Abort, AddRequest, Fatal, Hello, Outputs, Stats, WireError, decode, encode
from kiln.errors import ErrorKind


@pytest.mark.parametrize("msg", [
    Hello("secret", 1234),
    AddRequest("r1", [1, 2, 3], SamplingParams(max_tokens=4, stop=["x"]).to_dict(), [2]),
    Abort(["r1", "r2"]),
    Outputs([EngineOutput("r1", [5], False, None, 3, [(-0.5, [(5, -0.5)])], queue_time=0.01),
             EngineOutput("r2", [], True, "error", 3, error="full", error_type=ErrorKind.QUEUE_FULL,
                          error_args={"why": "queue_full", "waiting": 2, "limit": 2})]),
    Stats(EngineStats(timestamp=1.5, num_running=2, max_model_len=640, ready=True)),
    Fatal("engine failed to start: no model"),
])
def test_round_trip(msg):
    back = decode(encode(msg))
    assert type(back) is type(msg)
    if isinstance(msg, Outputs):  # msgpack gives lists for tuples
        assert [o.request_id for o in back.outputs] == ["r1", "r2"]
        assert back.outputs[0].logprobs == [[-0.5, [[5, -0.5]]]]
        assert back.outputs[1].error_type is ErrorKind.QUEUE_FULL and back.outputs[1].error_args["limit"] == 2
    else:
        assert back == msg
    if isinstance(msg, AddRequest):
        assert SamplingParams.from_dict(back.params).stop == ["x"]


@pytest.mark.parametrize("raw", [
    b"\xc1 not msgpack",
    msgpack.packb(["hello", "secret", 1]),                                   # the old positional lists
    msgpack.packb({"kind": "launch"}),                                      # no such kind
    msgpack.packb({"kind": "add", "request_id": "r", "prompt_token_ids": "1 2", "params": {}}),
    msgpack.packb({"kind": "abort", "request_ids": "r1"}),
    msgpack.packb({"kind": "hello", "secret": "s"}),                          # a field missing
    msgpack.packb({"kind": "out", "outputs": [{"nonsense": 1}]}),
])
def test_anything_else_is_a_wire_error(raw):
    with pytest.raises(WireError):
        decode(raw)
