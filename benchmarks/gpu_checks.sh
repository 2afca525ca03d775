#!/bin/sh
# The checks for a CUDA machine, in one run (CI has no GPU, so these run by hand):
#   1. the test suite on the GPU: device="auto" resolves to CUDA there, so every
#      estimator test takes the CUDA path (pinned uint8 batches, float16 autocast,
#      GPU preprocessing, training and recalibration on the GPU);
#   2. the GPU benchmarks: feature extraction (throughput, timm, float16, memory) and
#      fine-tuning (accuracy, speed against skorch); each writes results/<name>_cuda.md.
#
# Run from the repository root:  sh benchmarks/gpu_checks.sh [LOG_FOLDER]  (about 9 minutes
# at most on an H200: the time limits below add up to that)
# PYTHON (default python3) must import torch with CUDA, skdeep and pytest (with
# pytest-xdist and pytest-timeout); the offline weights and data packages, skorch and
# img2vec_pytorch are used when installed. Each step has its own time limit, so that a
# slow step cannot take the others' time; the logs and result files go to LOG_FOLDER.
set -u
PYTHON=${PYTHON:-python3}
LOGS=${1:-gpu-checks}
mkdir -p "$LOGS"
LOGS=$(cd "$LOGS" && pwd)
export PYTHONUNBUFFERED=1

{
    nvidia-smi -L
    "$PYTHON" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision",
torchvision.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())'
} 2>&1 | tee "$LOGS/machine.log"

# One thread per test process (14 of them), so that they do not fight over the cores;
# -v names each test as it ends, so that the log says how far a stopped run got.
OMP_NUM_THREADS=1 timeout 180 "$PYTHON" -m pytest -v -p no:cacheprovider -n 14 \
    --timeout 120 --tb=short 2>&1 | tee "$LOGS/pytest.log" |
    grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" | tail -60

cd benchmarks || exit 1
timeout 130 "$PYTHON" bench_extraction.py --device cuda \
    --sections throughput timm precision memory 2>&1 | tee "$LOGS/extraction.log"
# On an H200 the accuracy table took about a minute; the speed table (12 fits) did not
# finish within two minutes of its own there, so this limit may need raising.
timeout 240 "$PYTHON" bench_fine_tune.py --device cuda 2>&1 | tee "$LOGS/fine_tune.log"
cp results/*_cuda.md "$LOGS/" 2>/dev/null
ls -l "$LOGS"
