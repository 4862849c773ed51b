#!/usr/bin/env bash
# README table 7 and the CUDA tests in one command on a GPU machine, each part under a time
# limit of its own (one that hangs leaves the others their time); one log and the benchmarks'
# JSON and plot land in OUT:
#
#     bash benchmarks/gpu_checks.sh OUT [corpus.jsonl]
#     PARTS="tests bench" PRECISIONS=bf16,fp32 bash benchmarks/gpu_checks.sh OUT
#
# Parts: tests (the graphed trainer, fast against reference kernels in each precision, the
# sync-free step, the model's own forward pass against TransformerLens's bridge), bench (bench_gpu's step times and trainer end to end), profile
# (profile_gpu's kernel breakdown, the decoder backward's A/B and the TopK's), harvest (harvest through the bridge and
# through the model's own forward pass, and training from the model), compile (the model's forward pass eager
# against torch.compile), harvest-profile (where the harvest's time goes); the last three need the offline model.
set -u
out=${1:?give an output folder}
corpus=${2:-}
mkdir -p "$out"
log="$out/checks.log"
parts=" ${PARTS:-tests bench profile harvest} "
part() {  # name, time limit in seconds, command…
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  [[ $parts == *" $name "* ]] || return 0
  echo "== $name: $(date +%T), limit ${limit}s" | tee -a "$log"
  timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$log"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__)'; } | tee -a "$log"
part tests "${LIMIT_TESTS:-100}" python3 -m pytest -q -p no:cacheprovider \
  tests/engine/training/test_cuda_graph.py tests/engine/training/test_precision.py \
  tests/engine/sae/test_moe.py tests/engine/sae/test_kernels.py tests/engine/test_hf_forward.py
part bench "${LIMIT_BENCH:-220}" python3 benchmarks/bench_gpu.py --parts step,trainer \
  --train-steps 400 ${PRECISIONS:+--precisions "$PRECISIONS"} --out "$out/gpu-cuda.json"
part profile "${LIMIT_PROFILE:-150}" python3 benchmarks/profile_gpu.py --parts ${PROFILE_PARTS:-step,kernels,decoder,topk} \
  --archs "topk,scale e=2" --out "$out/profile-gpu.json"
part harvest "${LIMIT_HARVEST:-200}" python3 benchmarks/bench_gpu.py --parts "${HARVEST_PARTS:-harvest,stream}" \
  ${HARVEST_TOKENS:+--harvest-tokens "$HARVEST_TOKENS"} ${corpus:+--corpus "$corpus"} \
  --out "$out/gpu-cuda-harvest.json"
part compile "${LIMIT_COMPILE:-150}" python3 benchmarks/profile_gpu.py --parts compile \
  --out "$out/profile-compile.json"
part harvest-profile "${LIMIT_HARVEST_PROFILE:-90}" python3 benchmarks/profile_gpu.py --parts harvest \
  --tokens 1000000 --batches 256,1024 ${corpus:+--corpus "$corpus"} --out "$out/profile-harvest.json"
