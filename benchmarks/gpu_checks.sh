#!/usr/bin/env bash
# README table 7 and the CUDA tests in one command on a GPU machine, each part under a time
# limit of its own (one that hangs leaves the others their time), in the order PARTS names
# them; one log and the benchmarks' JSON and plot land in OUT:
#
#     bash benchmarks/gpu_checks.sh OUT [corpus.jsonl]
#     PARTS="profile bench tests" PRECISIONS=bf16 PROFILE_PARTS=fusions,step bash benchmarks/gpu_checks.sh OUT
#
# Parts: tests (the CUDA tests: the kernels, fast against reference kernels in each precision,
# the graphed trainer, the sync-free step, the optimiser's fused passes, the model's own forward
# pass against TransformerLens's bridge; TEST_FILES replaces the list, one line per test in the
# log), bench (bench_gpu's step times and trainer end to end), profile (profile_gpu's kernel
# breakdown and A/Bs: PROFILE_PARTS), harvest (harvest through the bridge and through the
# model's own forward pass, and training from the model), compile (the model's forward pass
# eager against torch.compile), harvest-profile (where the harvest's time goes); the last three
# need the offline model, and so do the tests of the graphed trainer (its tiny harvest).
set -u
out=${1:?give an output folder}
corpus=${2:-}
mkdir -p "$out"
log="$out/checks.log"
part() {  # name, time limit in seconds, command…
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "== $name: $(date +%T), limit ${limit}s" | tee -a "$log"
  timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0))s" | tee -a "$log"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__)'; } | tee -a "$log"
tests=${TEST_FILES:-"tests/engine/sae/test_kernels.py tests/engine/sae/test_moe.py
  tests/engine/training/test_cuda_graph.py tests/engine/training/test_precision.py
  tests/engine/training/test_schedule.py tests/engine/test_hf_forward.py"}
for name in ${PARTS:-tests bench profile harvest}; do
  case $name in
    tests) part tests "${LIMIT_TESTS:-100}" python3 -m pytest -v -p no:cacheprovider $tests ;;
    bench) part bench "${LIMIT_BENCH:-220}" python3 benchmarks/bench_gpu.py --parts step,trainer \
      --train-steps 400 ${PRECISIONS:+--precisions "$PRECISIONS"} --out "$out/gpu-cuda.json" ;;
    profile) part profile "${LIMIT_PROFILE:-150}" python3 benchmarks/profile_gpu.py \
      --parts "${PROFILE_PARTS:-step,kernels,decoder,topk}" --archs "topk,scale e=2" \
      --out "$out/profile-gpu.json" ;;
    harvest) part harvest "${LIMIT_HARVEST:-200}" python3 benchmarks/bench_gpu.py \
      --parts "${HARVEST_PARTS:-harvest,stream}" ${HARVEST_TOKENS:+--harvest-tokens "$HARVEST_TOKENS"} \
      ${corpus:+--corpus "$corpus"} --out "$out/gpu-cuda-harvest.json" ;;
    compile) part compile "${LIMIT_COMPILE:-150}" python3 benchmarks/profile_gpu.py --parts compile \
      --out "$out/profile-compile.json" ;;
    harvest-profile) part harvest-profile "${LIMIT_HARVEST_PROFILE:-90}" python3 benchmarks/profile_gpu.py \
      --parts harvest --tokens 1000000 --batches 256,1024 ${corpus:+--corpus "$corpus"} \
      --out "$out/profile-harvest.json" ;;
    *) echo "== unknown part $name (tests, bench, profile, harvest, compile, harvest-profile)" | tee -a "$log" ;;
  esac
done
