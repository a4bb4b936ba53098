#!/usr/bin/env bash
# The frozen-LLM study's recipe sweep (docs/study/README.md): every line of benchmarks/study_sweep/configs.txt
# ("NAME JSON") as its own process, all at once on one GPU, each stopping on its own before BUDGET seconds (hard
# limit: timeout). Run from the repository root:
#   bash benchmarks/study_sweep/run.sh OUTDIR     (DEVICE=cpu LIMIT=2 EXTRA='{"s0_steps": 20, ...}' for a quick test)
# OUTDIR gets results.jsonl (a line per finished phase, progress lines every 250 steps), log.txt, env.txt and
# machine.json (benchmarks/record.py's run record).
# The recorded run: benchmarks/results/study_sweep.jsonl (one H200, 14 processes, 190 s; study_sweep_env.txt).
set -u
OUT=${1:?usage: bash benchmarks/study_sweep/run.sh OUTDIR}
mkdir -p "$OUT"
export DEVICE=${DEVICE:-cuda} PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 THREADS=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-190}
LIMIT=${LIMIT:-100}
export DEADLINE=$(( $(date +%s) + BUDGET - 22 ))
"$PYTHON" benchmarks/record.py bash benchmarks/study_sweep/run.sh "$@" > "$OUT/machine.json"
{ date -u; nproc; "$PYTHON" -c 'import torch, transformers, peft, timm, lightning, sys; print(sys.version, torch.__version__, transformers.__version__, peft.__version__, timm.__version__, lightning.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'; nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv 2>/dev/null; } > "$OUT/env.txt" 2>&1 &
n=0
while read -r name settings; do
  [ -z "$name" ] && continue
  [ "$n" -ge "$LIMIT" ] && break; n=$((n + 1))
  timeout -k 5 "$BUDGET" "$PYTHON" benchmarks/study_sweep/sweep.py "$OUT" "$name" "$settings" >> "$OUT/log.txt" 2>&1 &
done < benchmarks/study_sweep/configs.txt
wait
{ date -u; echo "finished: $n processes"; } >> "$OUT/env.txt"
