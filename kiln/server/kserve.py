"""The KServe v2 / Triton model Kiln serves, shared by gRPC (grpc_server.py) and KServe HTTP (kserve_http.py):
its name and version, its metadata and configuration, which names reach it, the request held in its
input IN (`json.dumps([request])`, the seed's fields), and the repository's load / unload (LoRA adapters)."""
from __future__ import annotations

import json
from typing import Any, Iterable

from kiln.errors import ErrorKind, RequestError

MODEL_NAME = "model"
MODEL_VERSION = "1"
INPUT_NAME = "IN"
OUTPUT_NAME = "OUT"
SERVER_NAME = "kiln"
EXTENSIONS = ["model_configuration", "generate", "statistics"]


def server_version() -> str:
    import kiln

    return getattr(kiln, "__version__", "")


def _tensor(name: str) -> dict:
    return {"name": name, "datatype": "BYTES", "shape": [1]}


def model_metadata() -> dict:
    return {"name": MODEL_NAME, "versions": [MODEL_VERSION], "platform": "kiln",
            "inputs": [_tensor(INPUT_NAME)], "outputs": [_tensor(OUTPUT_NAME)]}


def model_config() -> dict:
    """Triton's model configuration, in its JSON form (gRPC parses it into the protobuf message)."""
    return {"name": MODEL_NAME, "backend": "kiln", "max_batch_size": 0,
            "version_policy": {"latest": {"num_versions": 1}},
            "input": [{"name": INPUT_NAME, "data_type": "TYPE_STRING", "dims": [1]}],
            "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_STRING", "dims": [1]}],
            "model_transaction_policy": {"decoupled": True},
            "instance_group": [{"name": "model_0", "kind": "KIND_MODEL", "count": 1}]}


def repository_index(ready: bool, adapters: Iterable[str] = ()) -> list[dict]:
    """The model repository as Triton indexes it: the model and each LoRA adapter (a model of its own name), READY
    once the engine is."""
    return [{"name": name, "version": MODEL_VERSION, "state": "READY" if ready else "UNAVAILABLE",
             "reason": "" if ready else "the engine is not ready"} for name in (MODEL_NAME, *adapters)]


REPOSITORY_OFF = ("model load / unload is off: start the server with KILN_ALLOW_RUNTIME_LORA_UPDATING=1 to load LoRA "
                  "adapters as models (load_model(name, config='{\"lora_path\": \"/dir\"}'))")


async def repository_update(frontend: Any, name: str, load: bool, parameters: dict[str, Any]) -> None:
    """Triton's repository load / unload of model `name`, where KILN_ALLOW_RUNTIME_LORA_UPDATING allows it: a LoRA
    adapter, whose directory is the parameter `lora_path` or the `lora_path` of the JSON `config` (tritonclient's
    load_model(name, config=...)). Loading the served model is a no-op (it is loaded); unloading it is refused.
    RequestError says what to fix."""
    if not frontend.cfg.allow_runtime_lora_updating:
        raise RequestError(REPOSITORY_OFF, ErrorKind.NOT_FOUND)
    if name in (MODEL_NAME, frontend.model_name):
        if load:
            return
        raise RequestError(f"'{name}' is the served model: it stays loaded (LoRA adapters unload)", ErrorKind.INVALID)
    if not name:
        raise RequestError("give the adapter's model name", ErrorKind.INVALID)
    path = parameters.get("lora_path")
    config = parameters.get("config")
    if path is None and config is not None:
        try:
            path = json.loads(config).get("lora_path") if isinstance(config, (str, bytes)) else None
        except (ValueError, AttributeError):
            path = None
    if load and (not isinstance(path, str) or not path):
        raise RequestError("a LoRA adapter's load needs its directory: the parameter lora_path, or config "
                           "'{\"lora_path\": \"/dir\"}'", ErrorKind.INVALID)
    await frontend.update_lora(name, load, path if load else "")


def _duration(count: int, seconds: float) -> dict:
    return {"count": count, "ns": int(seconds * 1e9)}


def model_statistics(stats: Any) -> dict:
    """Triton's model statistics (JSON form) from the engine's stats (kiln.engine.request.EngineStats; None
    before the engine has reported): requests ended since ready, server-wide (every API's), and engine steps as
    executions. The queue is arrival to first scheduling; compute_infer the rest of a request's time;
    tokenization runs in the front ends, outside these figures (compute_input / compute_output stay 0)."""
    r = getattr(stats, "requests", None) or {}
    ok, ok_s, queue_s = int(r.get("succeeded", 0)), float(r.get("success_seconds", 0)), float(r.get("queue_seconds", 0))
    steps = 0 if stats is None else stats.num_steps_total - stats.num_warmup_steps
    zero = _duration(0, 0.0)
    return {"model_stats": [{
        "name": MODEL_NAME, "version": MODEL_VERSION,
        "last_inference": int(float(r.get("last_end_time", 0.0)) * 1000),
        "inference_count": ok, "execution_count": steps,
        "inference_stats": {"success": _duration(ok, ok_s),
                            "fail": _duration(int(r.get("failed", 0)), float(r.get("fail_seconds", 0.0))),
                            "queue": _duration(ok, queue_s), "compute_input": zero,
                            "compute_infer": _duration(ok, max(0.0, ok_s - queue_s)), "compute_output": zero,
                            "cache_hit": zero, "cache_miss": zero},
        "batch_stats": []}]}


def check_model(name: str, version: str | None, aliases: tuple[str, ...] = ()) -> None:
    """RequestError (not_found) unless `name` / `version` is the model (`model`, or the served model name)."""
    if name != MODEL_NAME and name not in aliases:
        raise RequestError(f"Request for unknown model: '{name}' is not found", ErrorKind.NOT_FOUND)
    if version not in (None, "", MODEL_VERSION):
        raise RequestError(f"Request for unknown model: '{name}' version {version} is not found",
                           ErrorKind.NOT_FOUND)


def bad(msg: str) -> RequestError:
    """A protocol-level problem (missing IN, wrong shape, not JSON): the seed's bad-body error."""
    return RequestError(msg, ErrorKind.BAD_BODY)


def request_in(value: Any) -> dict:
    """The seed request held in input IN: its JSON text (`json.dumps([request])`; a bare object too), or,
    over HTTP, the array or object itself."""
    from kiln.server.validation import loads_json

    if isinstance(value, (str, bytes)):
        try:
            value = loads_json(value, f"input {INPUT_NAME!r}")
        except RequestError as e:
            raise bad(f"{e.message}; it must hold json.dumps([request])") from None
    if isinstance(value, list):
        if len(value) != 1:
            raise bad(f"input {INPUT_NAME!r} must hold a JSON array of exactly one request object, "
                      f"got {len(value)} items")
        value = value[0]
    if not isinstance(value, dict):
        raise bad(f"input {INPUT_NAME!r} must hold a JSON request object (json.dumps([request])), "
                  f"got {type(value).__name__}")
    return value
