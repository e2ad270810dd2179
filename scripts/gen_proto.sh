#!/usr/bin/env bash
# Regenerate the KServe v2 / Triton gRPC Python modules in kiln/server/proto/ from the .proto files
# beside them (needs grpcio-tools: pip install grpcio-tools). The generated files are committed, so
# this only needs running after editing a .proto or to move to a newer protobuf / grpcio.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
D=kiln/server/proto
rm -f "$D"/*_pb2.py "$D"/*_pb2.pyi "$D"/*_pb2_grpc.py
"$PY" -m grpc_tools.protoc -I "$D" --python_out="$D" --pyi_out="$D" --grpc_python_out="$D" \
    "$D/model_config.proto" "$D/grpc_service.proto"
rm -f "$D/model_config_pb2_grpc.py"   # model_config.proto has no service
# Post-process:
# - protoc writes top-level imports ("import model_config_pb2"); make them package-relative;
# - drop the exact-version guards newer protoc/grpcio-tools emit: the code only needs
#   protobuf >= 3.20 (builder API) and grpcio >= 1.63 (_registered_method), and the project runs
#   on machines whose protobuf / grpcio differ from the generating one;
# - register the descriptors in a private pool (kiln/server/proto/_pool.py) instead of protobuf's
#   default one, so that Kiln's server and tritonclient (which registers the same "inference.*"
#   names) can be imported in one process, e.g. a test run.
"$PY" - "$D" <<'PYEOF'
import pathlib, re, sys
d = pathlib.Path(sys.argv[1])
for p in sorted(d.glob("*_pb2*.py")):
    s = p.read_text()
    s = re.sub(r"^import (model_config_pb2|grpc_service_pb2) as ", r"from . import \1 as ", s, flags=re.M)
    s = re.sub(r"^from google\.protobuf import runtime_version as _runtime_version\n", "", s, flags=re.M)
    s = re.sub(r"^_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:.*\n)*?\)\n", "", s, flags=re.M)
    # the grpcio guard: from "GRPC_GENERATED_VERSION = ..." to the end of its "raise RuntimeError(...)"
    s = re.sub(r"^GRPC_GENERATED_VERSION = [^\n]*\n(?:[^\n]*\n)*?    \)\n", "", s, flags=re.M)
    s = s.replace("DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(",
                  "from ._pool import POOL as _POOL\nDESCRIPTOR = _POOL.AddSerializedFile(")
    p.write_text(s)
PYEOF
echo "generated: $(cd "$D" && ls *_pb2*.py* | tr '\n' ' ')"
