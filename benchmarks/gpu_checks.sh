#!/bin/sh
# The checks for a CUDA machine, in one run of 8 minutes at most (CI has no GPU, so
# these run by hand, or through the device tool when a session is lent a GPU):
#   1. the test suite on the GPU: device="auto" resolves to CUDA there, so every
#      estimator test takes the CUDA path (uint8 batches staged through pinned buffers
#      on a side stream, float16 autocast, GPU preprocessing, training, recalibration);
#   2. extraction: throughput (skdeep against the model on ready tensors), timm,
#      float16, and the input pipeline reading ahead against on demand;
#   3. fine-tuning speed: skdeep against skorch given the same settings and against the
#      bare training step on ready tensors, float32 and float16 (one seed);
#   4. devices= on the GPUs present (with one GPU, the table says so);
#   5. Dask extraction with one worker per GPU (local_cluster(gpus=...) and the command
#      line's --device cuda --workers N);
#   6. torch.compile on top of skdeep's network, if time is left.
# Each benchmark writes results/<name>_cuda.md, copied to LOG_FOLDER with the logs.
#
# Run from the repository root:  sh benchmarks/gpu_checks.sh [LOG_FOLDER]
# PYTHON (default python3) must import torch with CUDA, skdeep and pytest (with
# pytest-xdist and pytest-timeout); the offline weights and data packages, skorch and
# img2vec_pytorch are used when installed. Each step has its own time limit, so that a
# slow step cannot take the others' time: they add up to 480 s.
set -u
PYTHON=${PYTHON:-python3}
LOGS=${1:-gpu-checks}
mkdir -p "$LOGS"
LOGS=$(cd "$LOGS" && pwd)
export PYTHONUNBUFFERED=1
GPUS=$(nvidia-smi -L | wc -l)

{
    nvidia-smi -L
    "$PYTHON" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision",
torchvision.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())'
} 2>&1 | tee "$LOGS/machine.log"

# One thread per test process (14 of them), so that they do not fight over the cores;
# -v names each test as it ends, so that the log says how far a stopped run got.
OMP_NUM_THREADS=1 timeout 140 "$PYTHON" -m pytest -v -p no:cacheprovider -n 14 \
    --timeout 100 --tb=short 2>&1 | tee "$LOGS/pytest.log" |
    grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" | tail -60

cd benchmarks || exit 1
timeout 110 "$PYTHON" bench_extraction.py --device cuda \
    --sections throughput timm precision pipeline 2>&1 | tee "$LOGS/extraction.log"
timeout 110 "$PYTHON" bench_fine_tune.py --device cuda --sections speed --seeds 1 \
    2>&1 | tee "$LOGS/fine_tune.log"
timeout 40 "$PYTHON" bench_distributed.py --device cuda --devices "$((GPUS > 1 ? GPUS : 2))" \
    --seeds 1 --epochs 2 2>&1 | tee "$LOGS/distributed.log"
timeout 40 "$PYTHON" bench_scale.py --device cuda --large-images 2000 \
    2>&1 | tee "$LOGS/scale.log"
timeout 40 "$PYTHON" bench_compile.py --device cuda 2>&1 | tee "$LOGS/compile.log"
cp results/*_cuda.md "$LOGS/" 2>/dev/null
ls -l "$LOGS"
