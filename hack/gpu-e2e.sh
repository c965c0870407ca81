#!/usr/bin/env bash
# GPU checkpoint/restore through the shim's own GPU code, on a machine with an NVIDIA GPU.
#
# Needs: driver r570+, PyTorch with CUDA for python3, NVIDIA's cuda-checkpoint, and CRIU 4.x.
# Nothing is downloaded: bring CRIU along as Debian packages unpacked into a folder (as
# hack/install-testbed.sh does under /opt/hotrestart-testbed) and the cuda-checkpoint binary.
#
#   sudo CRIU=/opt/hotrestart-testbed/bin/criu CUDA_CHECKPOINT=./cuda-checkpoint \
#        bash hack/gpu-e2e.sh [--gib 8]
#
# Prints the time to move GPU state to the host and back (and GB/s next to the PCIe bound),
# CRIU's dump and restore times, and whether the restored process found its GPU memory intact.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CRIU=${CRIU:-$(command -v criu || true)}
CUDA_CHECKPOINT=${CUDA_CHECKPOINT:-$(command -v cuda-checkpoint || true)}
[[ $(id -u) -eq 0 ]] || { echo "run as root (CRIU needs it)" >&2; exit 1; }
[[ -x $CRIU ]] || { echo "no CRIU: set CRIU=/path/to/criu" >&2; exit 1; }
[[ -x $CUDA_CHECKPOINT ]] || { echo "no cuda-checkpoint: set CUDA_CHECKPOINT=/path/to/cuda-checkpoint" >&2; exit 1; }
python3 -c 'import torch; assert torch.cuda.is_available()' ||
    { echo "python3 has no PyTorch with CUDA" >&2; exit 1; }
python3 -c 'import google.protobuf, zstandard' 2>/dev/null ||
    echo "note: the shim's Python dependencies are partly missing; only the GPU modules are used" >&2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$CRIU" check || { echo "criu check failed on this kernel" >&2; exit 1; }
export HOTRESTART_CUDA_CHECKPOINT=$CUDA_CHECKPOINT
exec python3 "$HERE/gpu_e2e.py" --criu "$CRIU" "$@"
