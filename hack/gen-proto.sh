#!/usr/bin/env bash
# Regenerate the Python protobuf modules from shim/hotrestart/api/**/*.proto.
#
#   hack/gen-proto.sh [OUT_ROOT]
#
# OUT_ROOT defaults to shim/, i.e. regenerate in place; the output for
# shim/hotrestart/api/x/y.proto lands in OUT_ROOT/hotrestart/api/x/y_pb2.py(i).
# tests/unit/test_proto_current.py passes a temporary directory and compares.
# PYTHON selects the interpreter (default python3); it must have the pinned
# grpcio-tools, because the generated code embeds the protobuf version that
# produced it and changes with it.
#
# Only message code is generated (--python_out, --pyi_out): the services are
# served over ttrpc by our own code, never through grpc stubs.
set -euo pipefail

GRPCIO_TOOLS_VERSION=1.85.1

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$repo/shim}
python=${PYTHON:-python3}
api=hotrestart/api

if ! have=$("$python" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))' 2>/dev/null); then
    echo "gen-proto: grpcio-tools is not installed for $python;" \
        "run: $python -m pip install grpcio-tools==$GRPCIO_TOOLS_VERSION" >&2
    exit 2
fi
if [[ $have != "$GRPCIO_TOOLS_VERSION" ]]; then
    echo "gen-proto: grpcio-tools $have found, $GRPCIO_TOOLS_VERSION required;" \
        "run: $python -m pip install grpcio-tools==$GRPCIO_TOOLS_VERSION" >&2
    exit 2
fi

cd "$repo"
mkdir -p "$out"
out=$(cd "$out" && pwd)

protos=()
while IFS= read -r f; do protos+=("$f"); done < <(
    cd shim && find "$api" -type f -name '*.proto' | LC_ALL=C sort)
if [[ ${#protos[@]} -eq 0 ]]; then
    echo "gen-proto: no .proto files under shim/$api" >&2
    exit 1
fi

# Remove earlier output so a deleted .proto leaves nothing behind.
if [[ -d $out/$api ]]; then
    find "$out/$api" -type f \( -name '*_pb2.py' -o -name '*_pb2.pyi' -o -name '*_pb2_grpc.py' \) -delete
fi

"$python" -m grpc_tools.protoc -I shim --python_out="$out" --pyi_out="$out" \
    "${protos[@]/#/shim/}"

# Every directory from hotrestart/api down to each .proto is a package.
for f in "${protos[@]}"; do
    d=$(dirname "$f")
    while :; do
        [[ -e $out/$d/__init__.py ]] || : >"$out/$d/__init__.py"
        [[ $d == "$api" ]] && break
        d=$(dirname "$d")
    done
done
