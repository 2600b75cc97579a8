#!/usr/bin/env bash
# The GPU check of the README's run book: install, `build --target gpu`, serve, parity with
# transformers, speed. Run it inside the NGC Triton container, from the repository root:
#
#   scripts/gpu_check.sh                           # google-t5/t5-small, fp32 engine: every token equal
#   MODEL=google/flan-t5-base ENGINE_PRECISION=bf16 MIN_TOKEN_MATCH=0.9 scripts/gpu_check.sh
#   MODEL=random-t5-small scripts/gpu_check.sh     # offline: a preset, no model hub
#
# Settings (environment): MODEL, ENGINE_PRECISION (fp32 | bf16 | fp16), MIN_TOKEN_MATCH (default 1.0
# with fp32, else 0.9), OUT (build/gpu-check), MAX_INPUT_TOKENS, MAX_NEW_TOKENS, MAX_BATCH_SIZE,
# MAX_NUM_BEAMS, HTTP_PORT / GRPC_PORT / METRICS_PORT, INSTALL=0 (skip the pip installs), BENCH=0
# (skip `t5-triton bench`), TRT_VERSION / CUDA_MAJOR (override what is read from the container).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-google-t5/t5-small}
ENGINE_PRECISION=${ENGINE_PRECISION:-fp32}
if [ "$ENGINE_PRECISION" = fp32 ]; then MIN_TOKEN_MATCH=${MIN_TOKEN_MATCH:-1.0}; else MIN_TOKEN_MATCH=${MIN_TOKEN_MATCH:-0.9}; fi
OUT=${OUT:-build/gpu-check}
HTTP_PORT=${HTTP_PORT:-8000}
GRPC_PORT=${GRPC_PORT:-8001}
METRICS_PORT=${METRICS_PORT:-8002}
BACKENDS=/opt/tritonserver/backends

say() { printf '\n== %s\n' "$*"; }
die() { printf 'gpu_check: %s\n' "$*" >&2; exit 1; }

say "the container"
command -v nvidia-smi >/dev/null || die "no nvidia-smi: start the container with --gpus all"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
REAL_TRITONSERVER=$(command -v tritonserver) || die "no tritonserver on PATH: run this inside nvcr.io/nvidia/tritonserver:<yy.mm>-py3"
for backend in tensorrt onnxruntime python; do
  [ -d "$BACKENDS/$backend" ] || die "this Triton has no $backend backend ($BACKENDS/$backend)"
done

# The engine only loads in a Triton whose TensorRT is the version that built it: take the version the
# tensorrt backend links, and install that TensorRT's Python wheel for the container's CUDA.
if [ -z "${TRT_VERSION:-}" ]; then
  lib=$(ldd "$BACKENDS/tensorrt/libtriton_tensorrt.so" | awk '/libnvinfer\.so/ { print $3; exit }')
  if [ -z "$lib" ] || [ ! -e "$lib" ]; then die "cannot find the libnvinfer of the tensorrt backend; set TRT_VERSION"; fi
  TRT_VERSION=$(readlink -f "$lib" | sed -nE 's/.*libnvinfer\.so\.([0-9]+\.[0-9]+\.[0-9]+).*/\1/p')
  [ -n "$TRT_VERSION" ] || die "cannot read the TensorRT version from $(readlink -f "$lib"); set TRT_VERSION"
fi
if [ -z "${CUDA_MAJOR:-}" ]; then
  cuda=${CUDA_VERSION:-$(python3 -c 'import json; print(json.load(open("/usr/local/cuda/version.json"))["cuda"]["version"])' 2>/dev/null || true)}
  [ -n "$cuda" ] || die "cannot tell the container's CUDA version; set CUDA_MAJOR (12 or 13)"
  CUDA_MAJOR=${cuda%%.*}
fi
echo "Triton's TensorRT: $TRT_VERSION; CUDA $CUDA_MAJOR; $(python3 --version)"

if [ "${INSTALL:-1}" = 1 ]; then
  say "install t5-triton and TensorRT $TRT_VERSION (tensorrt-cu$CUDA_MAJOR) into the container's Python"
  # The python backend runs model code with this Python: t5_generate needs torch and tokenizers here.
  export PIP_BREAK_SYSTEM_PACKAGES=1
  python3 -m pip install --quiet -c requirements/constraints.txt -e .
  python3 -m pip install --quiet "tensorrt-cu${CUDA_MAJOR}==${TRT_VERSION}.*"
fi
python3 - "$TRT_VERSION" <<'EOF' || die "fix the environment above, then run again"
import sys

import tensorrt
import torch

if not torch.cuda.is_available():
    sys.exit(
        f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no GPU: the host driver is older "
        "than that CUDA needs; upgrade the driver or install the torch build for it (pytorch.org)"
    )
if not tensorrt.__version__.startswith(sys.argv[1]):
    sys.exit(f"Python TensorRT {tensorrt.__version__} != Triton's {sys.argv[1]}: the engine would not load")
print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}; TensorRT {tensorrt.__version__}")
EOF

say "build $MODEL --target gpu --engine-precision $ENGINE_PRECISION -> $OUT"
python3 -m t5_triton.cli build --model "$MODEL" --output "$OUT" --target gpu --force \
  --engine-precision "$ENGINE_PRECISION" \
  --max-input-tokens "${MAX_INPUT_TOKENS:-512}" --max-new-tokens "${MAX_NEW_TOKENS:-512}" \
  --max-batch-size "${MAX_BATCH_SIZE:-8}" --max-num-beams "${MAX_NUM_BEAMS:-8}"

# `t5-triton serve` and `bench` start the tritonserver found on PATH with their own flags; this wrapper
# adds the GPU ones: a CUDA pool that holds the largest decoder call (the build computed it) and the
# python backend's shared memory for the small CPU tensors (texts in, ids and texts out).
POOL=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["gpu"]["cuda_memory"]["cuda_memory_pool_byte_size"])' "$OUT/build_report.json")
WRAPPER=$(mktemp -d)
cat > "$WRAPPER/tritonserver" <<EOF
#!/bin/sh
exec "$REAL_TRITONSERVER" --cuda-memory-pool-byte-size=0:$POOL \
  --backend-config=python,shm-default-byte-size=16777216 --backend-config=python,shm-growth-byte-size=67108864 "\$@"
EOF
chmod +x "$WRAPPER/tritonserver"
export PATH="$WRAPPER:$PATH"
echo "tritonserver flags added: --cuda-memory-pool-byte-size=0:$POOL ($((POOL >> 20)) MiB) and the python shm sizes"

say "serve $OUT"
LOG="$OUT.tritonserver.log"
python3 -m t5_triton.cli serve --model-repository "$OUT" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" \
  --metrics-port "$METRICS_PORT" --log-file "$LOG" &
SERVER=$!
stop_server() {
  if kill -0 "$SERVER" 2>/dev/null; then kill -TERM "$SERVER"; wait "$SERVER" || true; fi
}
trap 'stop_server; rm -rf "$WRAPPER"' EXIT
for _ in $(seq 1 600); do
  kill -0 "$SERVER" 2>/dev/null || die "the server exited; its log: $LOG"
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$HTTP_PORT/v2/health/ready', timeout=2)" \
    2>/dev/null && break
  sleep 1
done
python3 -m t5_triton.cli generate --url "127.0.0.1:$HTTP_PORT" --num-beams 4 \
  "translate English to German: The house is wonderful." "summarize: The quick brown fox jumps over the lazy dog."

say "parity with transformers.generate on this GPU (minimum token match $MIN_TOKEN_MATCH)"
status=0
python3 scripts/parity.py --model "$MODEL" --url "127.0.0.1:$GRPC_PORT" --protocol grpc \
  --min-token-match "$MIN_TOKEN_MATCH" --json "$OUT.parity.json" || status=$?
stop_server

if [ "$status" = 0 ] && [ "${BENCH:-1}" = 1 ]; then
  say "t5-triton bench (its transformers column runs on the CPU; the parity table above has transformers on the GPU)"
  python3 -m t5_triton.cli bench --model "$MODEL" --repository "$OUT" --passes 3 --runs 5 --threads "$(nproc)" \
    --json "$OUT.bench.json"
fi

say "summary"
python3 - "$OUT/build_report.json" <<'EOF'
import json
import sys

gpu = json.load(open(sys.argv[1]))["gpu"]
encoder = gpu["encoder"]
print(f"encoder: TensorRT {encoder['tensorrt_version']} {encoder['precision']}, {encoder['fp32_layers']} of "
      f"{encoder['network_layers']} layers kept fp32, profile inputs {encoder['profile']['batch']} tokens "
      f"{encoder['profile']['tokens']}")
print(f"decoder: onnxruntime, CUDA EP; CUDA pool {gpu['cuda_memory']['tritonserver_flag']}")
EOF
[ "$status" = 0 ] && echo "gpu_check: PASSED" || echo "gpu_check: FAILED (parity)"
exit "$status"
