#!/usr/bin/env bash
# TTFT benchmark on the lent GPU, in cells that each fit one 10-minute device command.
#
# Run from the repository root on the GPU machine (the image as it is: torch, transformers, numpy):
#   bash experiments/bench_gpu.sh must          # llama-7b, 4000 tokens, pinned + disk      (~4 min)
#   bash experiments/bench_gpu.sh gqa qwen      # llama3-8b @4000 (3 tiers); qwen1.5-7b @4000 (~6 min)
#   bash experiments/bench_gpu.sh lengths long  # llama-7b 500..8000 pinned; 16000 pinned   (~6 min)
#   bash experiments/bench_gpu.sh pageable      # llama-7b @4000 pageable                   (~2 min)
#   bash experiments/bench_gpu.sh overlap       # llama-7b @4000 pinned, eager and eager-overlap
#                                               # new-input paths beside the graph rows     (~2 min)
#   bash experiments/bench_gpu.sh issue-thread  # llama-7b 2000,4000 pinned with the loads issued by a
#                                               # loader thread of their own (--loader-issue thread),
#                                               # into ttft-issue-thread.csv beside accept's rows (~2 min)
#   bash experiments/bench_gpu.sh accept        # the GPU acceptance rows: llama-7b 500..8000 pinned
#                                               # and 4000 disk, krul = krul-svd-loss with its plan
#                                               # (made here by python -m krul.plans), then the
#                                               # verdicts (python -m krul.gpu_accept)       (~5 min)
# Cells run in the order given; the script starts no new work after KRUL_LIMIT_S seconds (540).
# Rows are appended to $KRUL_BENCH_DIR/ttft.csv (default results/bench_ttft/gpu; rows already there
# are skipped, so a cell cut short resumes on the next call while the machine is warm) with
# ttft.env.json and ttft.timeline.jsonl beside it; all three (and this script's log) are copied to
# $OUT after every cell. A plan file at $KRUL_PLAN_FILE (default results/plans/krul_plans.json;
# carry it, it is git-ignored) is passed to krul when present; without one krul is uncompressed and
# its rows say so; `accept` writes it from the committed calibration records first, so nothing is
# carried by hand. Set KRUL_GIT_SHA if the working tree there has no .git. `accept` writes its rows
# to results/fig2_ttft/reference/h200-<sha7>/ (unless KRUL_BENCH_DIR is set) and its verdicts to
# accept.json and the log beside them.
set -uo pipefail
cd "$(dirname "$0")/.."
export KRUL_GIT_SHA=${KRUL_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
if [ -z "${KRUL_BENCH_DIR:-}" ] && [[ "${1:-}" == accept* ]]; then
  KRUL_BENCH_DIR=results/fig2_ttft/reference/h200-${KRUL_GIT_SHA:0:7}
fi
RES=${KRUL_BENCH_DIR:-results/bench_ttft/gpu}
DISK=${KRUL_DISK_ROOT:-$PWD/results/.bench_states}   # must be a real disk, not tmpfs
LIMIT=${KRUL_LIMIT_S:-540}
RESERVE=${KRUL_RESERVE_S:-120}  # seconds kept back from each bench call's budget for its last policy
PLAN=${KRUL_PLAN_FILE:-results/plans/krul_plans.json}
PY=${PYTHON:-python3}
mkdir -p "$RES" "$DISK"
PLAN_ARGS=()
[ -f "$PLAN" ] && PLAN_ARGS=(--plan-file "$PLAN")
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
LOG="$RES/bench_gpu.log"

copy_out() {
  if [ -n "${OUT:-}" ]; then cp -f "$RES"/ttft*.csv "$RES"/ttft*.env.json "$RES"/ttft*.timeline.jsonl "$RES"/accept.json "$LOG" "$OUT"/ 2>/dev/null; fi
  return 0
}
trap copy_out EXIT

bench() {  # bench ARGS... : one python process, within what is left of LIMIT
  local left=$(( LIMIT - SECONDS ))
  if [ "$left" -lt 90 ]; then echo "bench_gpu: ${left}s left, not starting: $*" | tee -a "$LOG"; return 0; fi
  echo "bench_gpu: [$SECONDS s] $* (plan: ${PLAN_ARGS[*]:-none})" | tee -a "$LOG"
  timeout --signal=INT --kill-after=20 "$left" "$PY" -m krul.bench ttft --profile full \
      --out "$RES/ttft.csv" --disk-root "$DISK" --time-budget-s $(( left - RESERVE )) \
      ${PLAN_ARGS[@]+"${PLAN_ARGS[@]}"} "$@" 2>&1 | tee -a "$LOG"
  echo "bench_gpu: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
  copy_out
}

{ date; nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max --format=csv,noheader;
  df -hT "$DISK" | tail -1; free -g | head -2; "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee -a "$LOG"

[ $# -eq 0 ] && set -- must
for cell in "$@"; do
  case "$cell" in
    must)     bench --shapes llama-7b --lengths 4000 --tiers pinned,disk --repeats-disk 3 ;;
    gqa)      bench --shapes llama3-8b --lengths 4000 --tiers pinned,pageable,disk --repeats-disk 3 ;;
    qwen)     bench --shapes qwen1.5-7b --lengths 4000 --tiers pinned,disk --repeats-disk 3 ;;
    pageable) bench --shapes llama-7b --lengths 4000 --tiers pageable ;;
    overlap)  bench --shapes llama-7b --lengths 4000 --tiers pinned --prefill eager,eager-overlap ;;
    lengths)  bench --shapes llama-7b --lengths 500,1000,2000,8000 --tiers pinned ;;
    long)     bench --shapes llama-7b,llama3-8b --lengths 16000 --tiers pinned --repeats 3 ;;
    issue-thread)  # its own csv: --loader-issue is in the row stamp, so sharing accept's would set those aside
      [ -f "$PLAN" ] || "$PY" -m krul.plans --out "$PLAN" 2>&1 | tee -a "$LOG"
      [ -f "$PLAN" ] && PLAN_ARGS=(--plan-file "$PLAN")
      bench --shapes llama-7b --lengths 4000,2000 --tiers pinned --loader-issue thread \
            --policies full-load,cake,krul-svd-loss,kvsharer --out "$RES/ttft-issue-thread.csv" ;;
    gqa-lengths) bench --shapes llama3-8b --lengths 1000,8000 --tiers pinned,disk --repeats-disk 2 ;;
    accept)
      "$PY" -m krul.plans --out "$PLAN" 2>&1 | tee -a "$LOG"
      [ -f "$PLAN" ] && PLAN_ARGS=(--plan-file "$PLAN")
      P="full-recompute,full-load,partial-recompute,cake,krul-svd-loss,minicache,kvsharer"
      bench --shapes llama-7b --lengths 4000,2000,8000,1000,500 --tiers pinned --policies "$P"
      bench --shapes llama-7b --lengths 4000 --tiers disk --repeats-disk 3 \
            --policies full-recompute,full-load,partial-recompute,cake,krul-svd-loss
      "$PY" -m krul.gpu_accept "$RES/ttft.csv" --json "$RES/accept.json" 2>&1 | tee -a "$LOG"
      copy_out ;;
    accept-4000)  # the 4000-token pinned rows of accept alone (a short device session)
      "$PY" -m krul.plans --out "$PLAN" 2>&1 | tee -a "$LOG"
      [ -f "$PLAN" ] && PLAN_ARGS=(--plan-file "$PLAN")
      bench --shapes llama-7b --lengths 4000 --tiers pinned --rates-grid 1000,4000 \
            --policies full-load,partial-recompute,cake,krul-svd-loss,minicache,kvsharer
      "$PY" -m krul.gpu_accept "$RES/ttft.csv" --json "$RES/accept.json" 2>&1 | tee -a "$LOG"
      copy_out ;;
    smoke)    bench --shapes llama3-8b --lengths 1000 --tiers pinned,pageable,disk --repeats 2 --repeats-disk 1 ;;
    *) echo "bench_gpu: unknown cell '$cell'; known: must gqa qwen pageable overlap lengths long gqa-lengths smoke accept accept-4000" >&2; exit 2 ;;
  esac
done
rm -rf "$DISK"
