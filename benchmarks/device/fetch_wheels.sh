#!/usr/bin/env bash
# Fetches into .whl (git-ignored) the wheels that the device machines' image lacks, for Python 3.12 on x86-64, at
# the versions this checkout's .venv runs (pytest too: run AN's machine printed no test summary). Run here, in the
# repository root, before a device call that carries .whl.
set -e
pkgs="fastapi starlette uvicorn h11 click anyio sniffio annotated-doc annotated-types pydantic pydantic_core
typing-inspection typing_extensions opentelemetry-api importlib_metadata zipp pyzmq msgpack grpcio protobuf tritonclient
python-rapidjson ml_dtypes prometheus_client xgrammar apache-tvm-ffi setproctitle compressed-tensors loguru gguf
httpx httpcore certifi idna jsonschema jsonschema-specifications referencing rpds-py attrs pytest pluggy iniconfig packaging"
mkdir -p .whl
for p in $pkgs; do
  v=$(.venv/bin/pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}')
  spec=$p${v:+==$v}
  ls .whl | grep -qi "^$(echo $p | tr - _)-${v}-" && continue
  # another version of it from an earlier fetch: two versions of one package make the device's pip refuse them all
  # (run AP's first try: ml_dtypes 0.5.4 beside 0.7.0)
  [ -n "$v" ] && ls .whl | grep -i "^$(echo $p | tr - _)-[0-9]" | sed 's|^|.whl/|' | xargs -r rm -f
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 \
    -d .whl "$spec" || echo "MISSING: $spec"
done
du -sh .whl
