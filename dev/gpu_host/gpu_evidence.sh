#!/usr/bin/env bash
# One GPU-host call on an nvidia-h200-x2 machine, two GPUs working side by side, for the
# evidence of issues 3 and 4 that fits in one 10-minute command:
#
#   bash dev/gpu_host/gpu_evidence.sh <commit> perf
#       GPU 0: the whole test suite on CUDA, then the decode benchmark (all d = 128
#              shapes, every bit pair, FlashInfer and SGLang Triton in bf16 and fp8);
#       GPU 1: the reference load test at --mem-fraction-static 0.25 (bf16, fp8, k4v4,
#              k3v3), as far as the time budget goes.
#   bash dev/gpu_host/gpu_evidence.sh <commit> accuracy
#       GPU 0: python -m sglang_tq.bench fidelity on SmolLM2 (fp8, k4v4, k3v3 against bf16, HF check);
#       GPU 1: python -m sglang_tq.bench radix on SmolLM2 (bf16, k4v4, k4v4 with packed prefill).
#       SmolLM2 must have been staged first (dev/gpu_host/unpack_model.sh stage, one call per
#       piece, back to back with this one).
#   bash dev/gpu_host/gpu_evidence.sh <commit> tune    # nvidia-h200-x4: four GPUs
#       phase 1 (150 s): GPUs 0-2 tune the d = 128 decode launch (sglang_tq.tools.tune, every bit
#                pair, both problem orientations), GPU 3 tunes d = 64 and d = 256;
#       phase 2, with the merged table (SGLANG_TQ_DECODE_LAUNCH): GPU 0 the decode benchmark
#                (every shape, bit pair and the write path), GPU 1 the load test for k4v4,
#                GPU 2 the decode-kernel tests on CUDA then k3v3, GPU 3 bf16 then fp8,
#                merged into one JSON.
#       decode_launch.json comes back for sglang_tq/kernels/.
#   bash dev/gpu_host/gpu_evidence.sh <commit> qwen    # nvidia-h200-x2, after staging the 8 pieces
#       GPU 0: key centers of Qwen2.5-Coder-0.5B (python -m sglang_tq.tools.key_centers), then fidelity
#              fp8, k4v4, k4v4-c (centered keys) against bf16 with the HF check;
#       GPU 1: fidelity k3v3, k3v3-c, k4v4-pp-c.
#   bash dev/gpu_host/gpu_evidence.sh <commit> qwen+serving   # nvidia-h200-x4: qwen on GPUs 0/1 and
#       GPU 2: shared-prefix load test, fp8 and k4v4 at 0.45 (target: k4v4 TTFT p50 < fp8's);
#       GPU 3: the same for k4v4 with SGLang's prefill CUDA graphs on (every other run
#              disables them), then the reference load test for k3v3 at 0.25.
#   bash dev/gpu_host/gpu_evidence.sh <commit> check   # nvidia-h200-x4, after an extend or split change:
#       GPUs 0/1 the shared-prefix load test, fp8 | k4v4 (target: k4v4 TTFT p50 < fp8's);
#       GPU 2 the whole test suite on CUDA; GPU 3 the decode benchmark (every shape and bit pair).
#   bash dev/gpu_host/gpu_evidence.sh <commit> final   # nvidia-h200-x4, the closing evidence of a commit:
#       GPU 0 the decode benchmark (every shape and bit pair), then the shared-prefix test for fp8;
#       GPU 1 the reference load test (0.25) for bf16, then the shared-prefix test for k4v4;
#       GPU 2 the reference load test for fp8, then the kernel and backend tests on CUDA and
#             profile-decode (kernel times of a step at small and large batch);
#       GPU 3 the reference load test for k4v4, then k3v3. One merged JSON per workload.
#   bash dev/gpu_host/gpu_evidence.sh <commit> mixed   # nvidia-h200-x4: the reference load test (0.25)
#       with SGLang's --enable-mixed-chunk for bf16 | fp8 | k4v4 | k3v3, one GPU each, then
#       the mixed-batch backend test on CUDA.
#   bash dev/gpu_host/gpu_evidence.sh <commit> lut3    # nvidia-h200-x4, after a 2/3-bit lookup change:
#       phase 1 (100 s): tune the d = 128 launch of k3v3 (GPU 0), k4v3 (GPU 1), k2v2 and
#                k4v2 (GPU 2), and the d = 256 launch of k3v3, k4v3, k2v2 (GPU 3); merged table;
#       phase 2: GPU 0 the decode benchmark with it (every shape and bit pair); GPU 1 the same-run
#                A/B of the 2/3-bit pairs against the previous package and its table (a
#                copy of sglang_tq with its kernels in .gpu_bundle/ab/old, carried, its own
#                decode benchmark run from that folder); GPU 2 the kernel tests on CUDA; GPU 3 the reference
#                load test (0.25) for k3v3.
#   bash dev/gpu_host/gpu_evidence.sh <commit> prefill # nvidia-h200 (one GPU), after an extend-path change
#       (FA3 staged first: dev/gpu_host/stage_fa3.sh): the FA3 extend and backend tests on CUDA, then
#       the reference load test (0.25) for k4v4, bf16 and fp8, one server after another.
#   bash dev/gpu_host/gpu_evidence.sh <commit> sp1     # nvidia-h200 (one GPU): the shared-prefix load test
#       (0.45) for k4v4 and fp8, then the reference load test (0.25) for k3v3.
#   bash dev/gpu_host/gpu_evidence.sh <commit> ref1    # nvidia-h200 (one GPU): the reference load
#       test (0.25) for bf16, fp8, k4v4 and k3v3, one server after another, one JSON.
#   bash dev/gpu_host/gpu_evidence.sh <commit> mla1    # nvidia-h200 (one GPU, FA3 staged): the MLA
#       decode tests on CUDA, then `python -m sglang_tq.bench decode-mla` at 16 and 128 heads
#       (MLA_POOL=<tokens>: the fp8 row's whole-pool cast at a server's pool size).
#   bash dev/gpu_host/gpu_evidence.sh <commit> tp      # nvidia-h100-x2/-x4 (FA3 and, for the identity
#       check, Qwen2.5-Coder-0.5B staged; issue 18): at TP = $TP (default all GPUs) a dummy
#       Llama-3.1-70B (TP >= 4) or -8B server starts and answers (k4v4, bf16); fidelity of k4v4 at
#       TP 1 and at TP against bf16; the reference and long-generation load tests at TP.
#   bash dev/gpu_host/gpu_evidence.sh <commit> swa1    # nvidia-h200 (one GPU, FA3 staged): decode per
#       step of Gemma-3-27B (global, 1024-window), gpt-oss-20b (full, 128-window, sinks) and
#       Qwen3-Next (d = 256) layers, sglang-tq k4v4/k3v3 against fa3 bf16/fp8 (SWA_SHAPES=...).
#   bash dev/gpu_host/gpu_evidence.sh <commit> mma1    # nvidia-h200 (one GPU): the CUDA decode stage 1
#       (tq_decode_mma.py) tests on CUDA, then ab-decode triton | mma (k4v4, MMA_SHAPES).
#   bash dev/gpu_host/gpu_evidence.sh <commit> ncu1    # nvidia-h200 (one GPU, FA3 staged): Nsight Compute
#       of the k4v4 decode stage 1 and FA3 bf16's kernel at 64 x 16k (NCU_SHAPES), full set: stall
#       reasons and pipe use for the decode-kernel redesign (issue 13); details CSV + per-SASS samples.
#   bash dev/gpu_host/gpu_evidence.sh <commit> rows1   # nvidia-h200 (one GPU): the store's one-token
#       programs (--store-row-tokens 64, 1 and 2 warps) against its 16-token tiles, N = 1, 8, 64.
#   bash dev/gpu_host/gpu_evidence.sh <commit> roof    # nvidia-h200 (one GPU), after a decode-kernel change
#       (FA3 staged first, for the decode benchmark's FA3 rows): the decode, store and backend tests
#       on CUDA; bench ab-decode per bit pair (the table's launch against register-capped
#       ones, CUDA-graph replay); the decode benchmark (FlashInfer, FA3 and SGLang Triton baselines).
#   bash dev/gpu_host/gpu_evidence.sh <commit> small   # nvidia-h200 (one GPU), after a small-batch change:
#       the decode and backend tests on CUDA; bench ab-decode of the small-batch switches
#       (fused query rotation, programmatic dependent launch), k4v4 and k3v3.
#   bash dev/gpu_host/gpu_evidence.sh <commit> split1  # nvidia-h200 (one GPU): kernel times of a k4v4
#       step at B <= 4 (profile-decode) and an A/B of split counts and launches there.
#   bash dev/gpu_host/gpu_evidence.sh <commit> lt1 <configs> [workloads [loadtest args...]]   # nvidia-h200
#       (one GPU, FA3 staged): sglang_tq.bench load's workloads (default: reference, long-gen,
#       single-stream) for <configs>, one fresh server each, into $OUT/loadtest.json (merge calls
#       with --merge); e.g. `lt1 k4v4,bf16 single-stream --profile-steps 32`.
#   bash dev/gpu_host/gpu_evidence.sh <commit> eval1 <configs> [tasks]   # nvidia-h200 (one GPU, FA3 and
#       the model's pieces staged): python -m sglang_tq.bench eval (GSM8K-CoT, HumanEval) for
#       <configs> on $EVAL_MODEL (default qwen2.5-coder-1.5b, unpacked here), resuming from
#       /tmp/eval or from $EVAL_PREV (a carried eval JSON); the call carries .eval_data. Its
#       budget comes from LIMIT_S (the call's limit_s, default 590, counted from the script's
#       start), and the JSON returns even when the budget cuts the run short.
#   bash dev/gpu_host/gpu_evidence.sh <commit> soak1   # nvidia-h200 (one GPU), called 3 times back to back:
#       sglang_tq.bench soak on the dummy Llama-3.1-8B with k4v4 (pool capped at $SOAK_POOL tokens,
#       default 100000, so that the offered load exceeds it 2x), $SOAK_S seconds (default
#       1200). The first call starts it under setsid (it outlives the call while the host
#       stays busy); every call waits until the soak ends or its LIMIT_S is nearly spent,
#       and the call that sees it end returns soak.json and the server log.
#   bash dev/gpu_host/gpu_evidence.sh <commit> arch1 <model config> [labels]   # nvidia-h200 (one GPU):
#       sglang_tq.bench smoke on benchmarks/model_configs/<model config> (dummy weights) for each
#       KV label (default bf16,fp8,k4v4; CUDA graphs on, SGLang's defaults otherwise): does the
#       server start and answer, and its pool tokens (issue 16: gemma-3-270m, gemma-3-27b,
#       qwen3-next-small), into $OUT/smoke_<model>_<label>.json.
#   bash dev/gpu_host/gpu_evidence.sh <commit> stock1   # nvidia-h200 (one GPU): `--kv-quant none` against
#       stock SGLang (the plugin not loaded: SGLANG_PLUGINS names another plugin), one server
#       each on the dummy Llama-3.1-8B, greedy output ids of sglang_tq.bench smoke compared
#       (issue 15: "--kv-quant none is still bit-identical"), into $OUT/stock_identity.json.
#   bash dev/gpu_host/gpu_evidence.sh <commit> store1   # nvidia-h200 (one GPU): the write-path A/B,
#       the decode benchmark's store rows and store + decode chain (k4v4, k3v3) at N = 1 and N = 64,
#       dense Πᵀ product against the fast Walsh-Hadamard rotation, 4 and 8 warps; then the
#       small-batch decode (fused query rotation: fp16 Π product | fast Walsh-Hadamard), same call;
#       STORE_WARPS="4" times one warp count only.
#   bash dev/gpu_host/gpu_evidence.sh <commit> suite   # nvidia-h200: the whole test suite on CUDA
#       (SUITE="<pytest args>" for a shard); UNPACK=<model> converts the staged pieces of that
#       model beside it (unpack_model.sh); SOAK=1 starts the soak of soak1 first.
#   bash dev/gpu_host/gpu_evidence.sh <commit> all     # what the 2026-11-28 run did:
#       tests of the prefill path + H100-equivalent load test, fidelity + radix at once
#
# 0.25 on a 141 GiB H200 leaves the bf16 pool at about the 166k tokens an 80 GiB H100
# gets at 0.45 (REFERENCE.md), so the reference workload meets the memory pressure of the
# H100 baselines. Everything lands in $OUT: at most 8 files come back, so the logs travel
# as one tarball and the JSON files sit at the top.
set -u
export PYTHONUNBUFFERED=1 SGLANG_TQ_COMMIT="${1:-unknown}"
MODE="${2:-all}"
# shellcheck source=/dev/null
source dev/gpu_host/gpu_host_setup.sh > "$OUT/setup.log" 2>&1 || { tail -20 "$OUT/setup.log"; exit 1; }
bash dev/gpu_host/stage_fa3.sh install >> "$OUT/setup.log" 2>&1 || { tail -5 "$OUT/setup.log"; exit 1; }
LOGS=$OUT/logs
mkdir -p "$LOGS"
T0=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - T0) )); }
LT=(--workloads reference --mem-fraction-static 0.25 --extra-server-args=--cuda-graph-max-bs-decode=64)
model() { bash dev/gpu_host/unpack_model.sh smollm2 2>> "$LOGS/unpack.log"; }
# launch tuning (tune, lut3): one sglang_tq.tools.tune job, the grid, the merged table
TUNE_G=(--programs-per-sm 8,16 --prefetch 1,0 --num-stages 2 --heads-n 0,1)
TUNE_SH=(--tiles 32x1,32x2,64x2 --shapes 64x16384,32x32768,128x4096,16x8192 "${TUNE_G[@]}")
tune_job() {  # GPU, seconds, log name, sglang_tq.tools.tune arguments
  local gpu=$1 secs=$2 name=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu timeout "$secs" python -m sglang_tq.tools.tune "$@" \
    --out "$LOGS/$name.json" --write-table "$LOGS/table_$name.json" > "$LOGS/$name.log" 2>&1
}
merge_tables() {  # the committed table with every table_*.json of this call, into $1
  python -m sglang_tq.tools.tune --merge-tables sglang_tq/kernels/decode_launch.json "$LOGS"/table_*.json \
    --write-table "$1" > "$LOGS/merge.log" 2>&1
}

soak_start() {  # sglang_tq.bench soak under setsid, once per host (its pid in /tmp/soak): it outlives the call
  SD=/tmp/soak
  mkdir -p "$SD"
  [ -f "$SD/pid" ] && return 0
  setsid nohup python -m sglang_tq.bench soak --model-path benchmarks/model_configs/llama-3.1-8b \
    --server-args "--load-format dummy --max-total-tokens ${SOAK_POOL:-100000}" \
    --duration-s "${SOAK_S:-1200}" --out "$SD/soak.json" > "$SD/soak.log" 2>&1 < /dev/null &
  echo $! > "$SD/pid"
}

case "$MODE" in
perf)
  (
    export CUDA_VISIBLE_DEVICES=0
    timeout 300 python -m pytest -q -p no:cacheprovider tests > "$OUT/pytest.log" 2>&1
    timeout "$(left 560)" python -m sglang_tq.bench decode \
      --shapes 1x4096,1x32768,16x8192,32x32768,64x16384,128x4096,64x16384x64,32x8192x256 \
      --kv k4v4,k4v3,k3v3,k4v2,k2v2 \
      --flashinfer-head-dims 128 --time-budget-s "$(left 530)" --out "$OUT/bench_decode.json" \
      > "$LOGS/bench.log" 2>&1
  ) &
  P0=$!
  (
    export CUDA_VISIBLE_DEVICES=1
    python -m sglang_tq.bench load --configs k4v4,bf16,fp8,k3v3 "${LT[@]}" --out "$OUT/loadtest.json" \
      --log-dir "$LOGS/lt" --budget-s "$(left 550)" > "$LOGS/loadtest.log" 2>&1
  ) &
  P1=$!
  wait "$P0" "$P1"
  { echo "== pytest"; tail -3 "$OUT/pytest.log"; echo "== bench"; tail -60 "$LOGS/bench.log"
    echo "== loadtest"; tail -25 "$LOGS/loadtest.log"; } > "$OUT/summary.txt" 2>&1
  ;;
tune)
  TAB=$OUT/decode_launch.json
  tune_job 0 150 tune_a --kv k4v4 "${TUNE_SH[@]}" & PA=$!
  tune_job 1 150 tune_b --kv k3v3,k4v3 "${TUNE_SH[@]}" & PB=$!
  tune_job 2 150 tune_c --kv k4v2,k2v2 "${TUNE_SH[@]}" & PC=$!
  ( tune_job 3 75 tune_d64 --head-dim 64 --shapes 64x16384,128x4096 --kv k4v4,k3v3,k4v2 \
      --tiles 32x1,32x2,64x2 "${TUNE_G[@]}"
    tune_job 3 75 tune_d256 --head-dim 256 --shapes 32x8192,16x8192 --kv k4v4,k3v3,k4v2 \
      --tiles 64x2,64x4,32x2 "${TUNE_G[@]}" ) & PD=$!
  wait "$PA" "$PB" "$PC" "$PD"
  merge_tables "$TAB"
  export SGLANG_TQ_DECODE_LAUNCH=$TAB
  echo "phase 2 at $(left 0 | tr -d -) s" > "$LOGS/phase.log"
  ( export CUDA_VISIBLE_DEVICES=0
    timeout "$(left 530)" python -m sglang_tq.bench decode \
      --shapes 1x4096,1x32768,16x8192,32x32768,64x16384,128x4096,64x16384x64,32x8192x256 \
      --kv k4v4,k4v3,k3v3,k4v2,k2v2 --flashinfer-head-dims 128 --time-budget-s "$(left 510)" \
      --out "$OUT/bench_decode.json" > "$LOGS/bench.log" 2>&1 ) & P0=$!
  lt() {  # GPU, configs, name
    CUDA_VISIBLE_DEVICES=$1 python -m sglang_tq.bench load --configs "$2" "${LT[@]}" --out "$LOGS/lt_$3.json" \
      --log-dir "$LOGS/lt_$3" --budget-s "$(left 520)" > "$LOGS/lt_$3.log" 2>&1
  }
  lt 1 k4v4 tq4 & P1=$!
  ( CUDA_VISIBLE_DEVICES=2 timeout 150 python -m pytest -q -p no:cacheprovider tests/kernels/test_kernels.py \
      tests/kernels/test_key_centers_kernels.py tests/kernels/test_launch_table.py > "$OUT/pytest.log" 2>&1
    lt 2 k3v3 tq3 ) & P2=$!
  ( lt 3 bf16 bf16; lt 3 fp8 fp8 ) & P3=$!
  wait "$P0" "$P1" "$P2" "$P3"
  python -m sglang_tq.bench load --merge "$LOGS"/lt_bf16.json "$LOGS"/lt_fp8.json "$LOGS"/lt_tq4.json \
    "$LOGS"/lt_tq3.json --out "$OUT/loadtest.json" > "$LOGS/lt_merge.log" 2>&1
  { echo "== pytest"; tail -3 "$OUT/pytest.log"; cat "$LOGS/phase.log"; grep -h BEST "$LOGS"/tune_*.log
    echo "== bench"; tail -60 "$LOGS/bench.log"; echo "== loadtest"; tail -25 "$LOGS/lt_merge.log"
  } > "$OUT/summary.txt" 2>&1
  ;;
check)
  # after a change to the extend path or the split policy, on four GPUs at once
  SPX=(--workloads shared-prefix --mem-fraction-static 0.45 --sp-requests-per-prefix 64
       --extra-server-args=--cuda-graph-max-bs-decode=64)
  for i in 0 1; do
    c=$([ $i = 0 ] && echo fp8 || echo k4v4)
    ( CUDA_VISIBLE_DEVICES=$i python -m sglang_tq.bench load --configs "$c" "${SPX[@]}" \
        --out "$LOGS/sp_$c.json" --log-dir "$LOGS/sp_$c" --budget-s "$(left 540)" \
        > "$LOGS/sp_$c.log" 2>&1 ) &
  done
  ( export CUDA_VISIBLE_DEVICES=2
    timeout "$(left 560)" python -m pytest -q -p no:cacheprovider tests > "$OUT/pytest.log" 2>&1 ) &
  ( export CUDA_VISIBLE_DEVICES=3
    timeout "$(left 540)" python -m sglang_tq.bench decode \
      --shapes 1x4096,1x32768,16x8192,32x32768,64x16384,128x4096,64x16384x64,32x8192x256 \
      --kv k4v4,k4v3,k3v3,k4v2,k2v2 --flashinfer-head-dims 128 --time-budget-s "$(left 520)" \
      --out "$OUT/bench_decode.json" > "$LOGS/bench.log" 2>&1 ) &
  wait
  python -m sglang_tq.bench load --merge "$LOGS/sp_fp8.json" "$LOGS/sp_k4v4.json" \
    --out "$OUT/loadtest_sp.json" > "$LOGS/sp_merge.log" 2>&1
  { echo "== pytest"; tail -3 "$OUT/pytest.log"; echo "== shared prefix"; tail -12 "$LOGS/sp_merge.log"
    echo "== bench"; tail -40 "$LOGS/bench.log"; } > "$OUT/summary.txt" 2>&1
  ;;
final)
  SPX=(--workloads shared-prefix --mem-fraction-static 0.45 --sp-requests-per-prefix 64
       --extra-server-args=--cuda-graph-max-bs-decode=64)
  lt() {  # GPU, config
    CUDA_VISIBLE_DEVICES=$1 python -m sglang_tq.bench load --configs "$2" "${LT[@]}" --out "$LOGS/lt_$2.json" \
      --log-dir "$LOGS/lt_$2" --budget-s "$(left 540)" > "$LOGS/lt_$2.log" 2>&1
  }
  sp() {  # GPU, config
    CUDA_VISIBLE_DEVICES=$1 python -m sglang_tq.bench load --configs "$2" "${SPX[@]}" --out "$LOGS/sp_$2.json" \
      --log-dir "$LOGS/sp_$2" --budget-s "$(left 540)" > "$LOGS/sp_$2.log" 2>&1
  }
  ( CUDA_VISIBLE_DEVICES=0 timeout "$(left 330)" python -m sglang_tq.bench decode \
      --shapes 1x4096,1x32768,16x8192,32x32768,64x16384,128x4096,64x16384x64,32x8192x256 \
      --kv k4v4,k4v3,k3v3,k4v2,k2v2 --flashinfer-head-dims 128 --time-budget-s "$(left 320)" \
      --out "$OUT/bench_decode.json" > "$LOGS/bench.log" 2>&1
    sp 0 fp8 ) &
  ( lt 1 bf16; sp 1 k4v4 ) &
  ( lt 2 fp8
    CUDA_VISIBLE_DEVICES=2 timeout "$(left 470)" python -m pytest -q -p no:cacheprovider \
      tests/kernels/test_kernels.py tests/kernels/test_key_centers_kernels.py tests/kernels/test_launch_table.py \
      tests/serving/test_backend.py > "$OUT/pytest.log" 2>&1
    CUDA_VISIBLE_DEVICES=2 timeout "$(left 560)" python -m sglang_tq.bench profile-decode \
      --shapes 1x4096,1x32768,16x8192,64x16384 --kv k4v4,k3v3,k4v2 \
      --out "$LOGS/profile_decode.json" > "$LOGS/profile.log" 2>&1 ) &
  ( lt 3 k4v4; lt 3 k3v3 ) &
  wait
  python -m sglang_tq.bench load --merge "$LOGS"/lt_bf16.json "$LOGS"/lt_fp8.json "$LOGS"/lt_k4v4.json \
    "$LOGS"/lt_k3v3.json --out "$OUT/loadtest.json" > "$LOGS/lt_merge.log" 2>&1
  python -m sglang_tq.bench load --merge "$LOGS"/sp_fp8.json "$LOGS"/sp_k4v4.json \
    --out "$OUT/loadtest_sp.json" > "$LOGS/sp_merge.log" 2>&1
  { echo "== pytest"; tail -3 "$OUT/pytest.log"; echo "== bench"; tail -45 "$LOGS/bench.log"
    echo "== loadtest"; tail -10 "$LOGS/lt_merge.log"; echo "== shared prefix"; tail -8 "$LOGS/sp_merge.log"
    echo "== profile"; cat "$LOGS/profile.log"; } > "$OUT/summary.txt" 2>&1
  ;;
mixed)
  LTM=(--workloads reference --mem-fraction-static 0.25
       "--extra-server-args=--cuda-graph-max-bs-decode=64 --enable-mixed-chunk")
  i=0
  for c in bf16 fp8 k4v4 k3v3; do
    CUDA_VISIBLE_DEVICES=$i python -m sglang_tq.bench load --configs "$c" "${LTM[@]}" \
      --out "$LOGS/ltm_$c.json" --log-dir "$LOGS/ltm_$c" --budget-s "$(left 500)" \
      > "$LOGS/ltm_$c.log" 2>&1 &
    i=$((i + 1))
  done
  wait
  CUDA_VISIBLE_DEVICES=0 timeout "$(left 570)" python -m pytest -q -p no:cacheprovider \
    tests/serving/test_backend.py > "$OUT/pytest.log" 2>&1
  python -m sglang_tq.bench load --merge "$LOGS"/ltm_bf16.json "$LOGS"/ltm_fp8.json "$LOGS"/ltm_k4v4.json \
    "$LOGS"/ltm_k3v3.json --out "$OUT/loadtest_mixed.json" > "$LOGS/ltm_merge.log" 2>&1
  { echo "== pytest"; tail -3 "$OUT/pytest.log"; echo "== loadtest (mixed chunk)"
    tail -14 "$LOGS/ltm_merge.log"; } > "$OUT/summary.txt" 2>&1
  ;;
lut3)
  TAB=$OUT/decode_launch.json
  tune_job 0 100 tune_k3v3 --kv k3v3 "${TUNE_SH[@]}" &
  tune_job 1 100 tune_k4v3 --kv k4v3 "${TUNE_SH[@]}" &
  tune_job 2 100 tune_k2 --kv k2v2,k4v2 "${TUNE_SH[@]}" &
  tune_job 3 100 tune_d256 --head-dim 256 --shapes 32x8192,16x8192 --kv k3v3,k4v3,k2v2 \
    --tiles 64x2,64x4,32x2 "${TUNE_G[@]}" &
  wait
  merge_tables "$TAB"
  SHAPES=1x4096,1x32768,16x8192,32x32768,64x16384,128x4096,64x16384x64,32x8192x256
  ( export CUDA_VISIBLE_DEVICES=0 SGLANG_TQ_DECODE_LAUNCH=$TAB
    timeout "$(left 560)" python -m sglang_tq.bench decode --shapes "$SHAPES" \
      --kv k4v4,k4v3,k3v3,k4v2,k2v2 --flashinfer-head-dims 128 --time-budget-s "$(left 540)" \
      --out "$OUT/bench_decode.json" > "$LOGS/bench.log" 2>&1 ) &
  ( export CUDA_VISIBLE_DEVICES=1
    AB=(--shapes "$SHAPES" --kv k3v3,k4v3,k2v2,k4v2 --impls sglang-tq --no-write-path --check first)
    ov=$PWD/.gpu_bundle/ab/old
    ( cd "$ov" && PYTHONPATH=$ov${PYTHONPATH:+:$PYTHONPATH} timeout "$(left 560)" \
      python -m sglang_tq.bench decode "${AB[@]}" --out "$LOGS/ab_old.json" > "$LOGS/ab_old.log" 2>&1 )
    SGLANG_TQ_DECODE_LAUNCH=$TAB timeout "$(left 560)" python -m sglang_tq.bench decode "${AB[@]}" \
      --out "$LOGS/ab_new.json" > "$LOGS/ab_new.log" 2>&1 ) &
  ( export CUDA_VISIBLE_DEVICES=2 SGLANG_TQ_DECODE_LAUNCH=$TAB
    timeout "$(left 560)" python -m pytest -q -p no:cacheprovider tests/kernels/test_lut.py tests/kernels/test_kernels.py \
      tests/kernels/test_key_centers_kernels.py tests/kernels/test_launch_table.py > "$OUT/pytest.log" 2>&1 ) &
  ( export SGLANG_TQ_DECODE_LAUNCH=$TAB
    CUDA_VISIBLE_DEVICES=3 python -m sglang_tq.bench load --configs k3v3 "${LT[@]}" --out "$OUT/loadtest_k3v3.json" \
      --log-dir "$LOGS/lt_k3v3" --budget-s "$(left 560)" > "$LOGS/lt_k3v3.log" 2>&1 ) &
  wait
  { echo "== merge"; cat "$LOGS/merge.log"; echo "== pytest"; tail -3 "$OUT/pytest.log"
    echo "== bench"; tail -45 "$LOGS/bench.log"; echo "== A/B old"; grep -E "^ +sglang-tq|check" "$LOGS/ab_old.log"
    echo "== A/B new"; grep -E "^ +sglang-tq|check" "$LOGS/ab_new.log"; echo "== loadtest k3v3"; tail -12 "$LOGS/lt_k3v3.log"
  } > "$OUT/summary.txt" 2>&1
  ;;
qwen|qwen+serving)
  SP=(--workloads shared-prefix --mem-fraction-static 0.45 --sp-requests-per-prefix 64
      --extra-server-args=--cuda-graph-max-bs-decode=64)
  if [ "$MODE" = qwen+serving ]; then
    ( export CUDA_VISIBLE_DEVICES=2
      python -m sglang_tq.bench load --configs fp8,k4v4 "${SP[@]}" --out "$OUT/loadtest_sp.json" \
        --log-dir "$LOGS/sp" --budget-s "$(left 540)" > "$LOGS/sp.log" 2>&1 ) & PS=$!
    ( export CUDA_VISIBLE_DEVICES=3
      python -m sglang_tq.bench load --configs k4v4 "${SP[@]}" --prefill-cuda-graph \
        --out "$OUT/loadtest_sp_prefill_graphs.json" --log-dir "$LOGS/spg" --budget-s "$(left 540)" \
        > "$LOGS/spg.log" 2>&1
      python -m sglang_tq.bench load --configs k3v3 "${LT[@]}" --out "$OUT/loadtest_k3v3.json" \
        --log-dir "$LOGS/lt_k3v3" --budget-s "$(left 545)" > "$LOGS/lt_k3v3.log" 2>&1 ) & PG=$!
  fi
  M=$(bash dev/gpu_host/unpack_model.sh qwen2.5-coder-0.5b 2>> "$LOGS/unpack.log") || M=""
  [ -n "$M" ] || { tail -5 "$LOGS/unpack.log"; exit 1; }
  C=$OUT/key_centers_qwen2.5-coder-0.5b.safetensors
  python -m sglang_tq.tools.key_centers --model-path "$M" --out "$C" --device cuda > "$LOGS/centers.log" 2>&1 \
    || { tail -5 "$LOGS/centers.log"; exit 1; }
  fid() {  # GPU, name, configs, extra args
    local gpu=$1 name=$2 configs=$3; shift 3
    CUDA_VISIBLE_DEVICES=$gpu timeout -s TERM "$(left 560)" python -m sglang_tq.bench fidelity \
      --model-path "$M" --configs "$configs" --key-centers "$C" --log-dir "$LOGS/$name" \
      --work-dir "/tmp/fidelity_$name" --out "$OUT/fidelity_qwen_$name.json" "$@" > "$LOGS/$name.log" 2>&1
  }
  fid 0 a fp8,k4v4,k4v4-c --check-hf & P0=$!
  fid 1 b k3v3,k3v3-c,k4v4-pp-c & P1=$!
  wait "$P0" "$P1"
  [ "$MODE" = qwen+serving ] && wait "$PS" "$PG"
  { echo "== fidelity a"; tail -32 "$LOGS/a.log"; echo "== fidelity b"; tail -22 "$LOGS/b.log"
    [ "$MODE" = qwen+serving ] && { echo "== shared prefix"; tail -16 "$LOGS/sp.log"
      echo "== shared prefix, prefill CUDA graphs"; tail -16 "$LOGS/spg.log"
      echo "== reference k3v3"; tail -12 "$LOGS/lt_k3v3.log"; }
  } > "$OUT/summary.txt" 2>&1
  ;;
accuracy)
  M=$(model) || M=""
  [ -n "$M" ] || { tail -5 "$LOGS/unpack.log"; exit 1; }
  (
    export CUDA_VISIBLE_DEVICES=0
    timeout -s TERM "$(left 560)" python -m sglang_tq.bench fidelity --model-path "$M" \
      --configs fp8,k4v4,k3v3 --check-hf --log-dir "$LOGS/fid" --out "$OUT/fidelity_smollm2.json" \
      > "$LOGS/fidelity.log" 2>&1
  ) &
  P0=$!
  (
    export CUDA_VISIBLE_DEVICES=1
    timeout -s TERM "$(left 560)" python -m sglang_tq.bench radix --model-path "$M" \
      --configs k4v4,k4v4-pp,bf16 --budget-s "$(left 540)" --log-dir "$LOGS/radix" \
      --out "$OUT/radix_smollm2.json" > "$LOGS/radix.log" 2>&1
  ) &
  P1=$!
  wait "$P0" "$P1"
  { echo "== fidelity"; tail -40 "$LOGS/fidelity.log"; echo "== radix"; tail -30 "$LOGS/radix.log"
  } > "$OUT/summary.txt" 2>&1
  ;;
prefill)
  export CUDA_VISIBLE_DEVICES=0
  timeout 150 python -m pytest -q -p no:cacheprovider tests/kernels/test_kernels.py tests/serving/test_backend.py \
    -k "fa3 or impl or backend" > "$OUT/pytest.log" 2>&1
  # sglang_tq.bench load's start-up estimate (150 s) is an H100-era guess: bound by timeout instead
  timeout "$(left 585)" python -m sglang_tq.bench load --configs k4v4,bf16,fp8 "${LT[@]}" \
    --out "$OUT/loadtest.json" --log-dir "$LOGS/lt" > "$LOGS/lt.log" 2>&1
  { echo "== pytest"; tail -3 "$OUT/pytest.log"; echo "== loadtest"; tail -14 "$LOGS/lt.log"
    grep -h "prefill attention" "$LOGS"/lt/*.log; } > "$OUT/summary.txt" 2>&1
  ;;
sp1)
  export CUDA_VISIBLE_DEVICES=0
  SPX=(--workloads shared-prefix --mem-fraction-static 0.45 --sp-requests-per-prefix 64
       --extra-server-args=--cuda-graph-max-bs-decode=64)
  timeout "$(left 380)" python -m sglang_tq.bench load --configs k4v4,fp8 "${SPX[@]}" \
    --out "$OUT/loadtest_sp.json" --log-dir "$LOGS/sp" > "$LOGS/sp.log" 2>&1
  timeout "$(left 585)" python -m sglang_tq.bench load --configs k3v3 "${LT[@]}" \
    --out "$OUT/loadtest_k3v3.json" --log-dir "$LOGS/lt" > "$LOGS/lt.log" 2>&1
  { echo "== shared prefix"; tail -12 "$LOGS/sp.log"; echo "== k3v3"; tail -8 "$LOGS/lt.log"
  } > "$OUT/summary.txt" 2>&1
  ;;
roof)
  export CUDA_VISIBLE_DEVICES=0
  timeout 170 python -m pytest -q -p no:cacheprovider tests/kernels/test_kernels.py tests/serving/test_backend.py \
    tests/kernels/test_launch_table.py -k "decode or rotat or store or backend or launch" \
    > "$OUT/pytest.log" 2>&1
  for kv in k4v4 k3v3 k4v2 k2v2; do  # the table's launch against register-capped ones, same run
    timeout 80 python -m sglang_tq.bench ab-decode --kv $kv --shapes 64x16384,128x4096,32x32768,16x8192 \
      --variant table: --variant r168:prefetch=0,num_stages=3,maxnreg=168,programs_per_sm=12 \
      --variant r144:prefetch=0,num_stages=3,maxnreg=144,programs_per_sm=14 \
      --out "$LOGS/ab_$kv.json" > "$LOGS/ab_$kv.log" 2>&1
  done
  python -c "import json,sys; json.dump([json.load(open(f)) for f in sys.argv[1:]], open('$OUT/ab_maxnreg.json','w'), indent=1)" "$LOGS"/ab_k*.json
  timeout "$(left 585)" python -m sglang_tq.bench decode \
    --shapes 1x4096,1x32768,16x8192,32x32768,64x16384,128x4096 --kv k4v4,k3v3,k4v2,k2v2 \
    --flashinfer-head-dims 128 --time-budget-s "$(left 570)" --out "$OUT/bench_decode.json" \
    > "$LOGS/bench.log" 2>&1
  { echo "== pytest"; tail -3 "$OUT/pytest.log"; for kv in k4v4 k3v3 k4v2 k2v2; do
      echo "== ab $kv"; tail -6 "$LOGS/ab_$kv.log"; done
    echo "== bench"; tail -40 "$LOGS/bench.log"; } > "$OUT/summary.txt" 2>&1
  ;;
small)  # nvidia-h200 (one GPU), after a small-batch decode change: decode tests on CUDA, then
  # the same-run A/B of the small-batch switches (fused rotation, PDL)
  export CUDA_VISIBLE_DEVICES=0
  timeout 200 python -m pytest -q -p no:cacheprovider tests/kernels/test_kernels.py tests/serving/test_backend.py \
    tests/kernels/test_launch_table.py -k "decode or rotat or backend or launch" > "$OUT/pytest.log" 2>&1
  for kv in k4v4 k3v3; do
    timeout 150 python -m sglang_tq.bench ab-decode --kv $kv \
      --shapes 1x4096,1x32768,2x16384,4x8192,8x8192,16x8192,64x16384,128x4096 \
      --variant apart:fuse_rotation=0,pdl=0 --variant fuse:fuse_rotation=1,pdl=0 \
      --variant pdl:fuse_rotation=0,pdl=1 --variant default: --out "$LOGS/ab_$kv.json" > "$LOGS/ab_$kv.log" 2>&1
  done
  python -c "import json,sys; json.dump([json.load(open(f)) for f in sys.argv[1:]], open('$OUT/ab_small.json','w'), indent=1)" "$LOGS"/ab_k*.json
  { echo "== pytest"; tail -15 "$OUT/pytest.log"; for kv in k4v4 k3v3; do
      echo "== ab $kv"; tail -12 "$LOGS/ab_$kv.log"; done; } > "$OUT/summary.txt" 2>&1
  ;;
split1)  # nvidia-h200 (one GPU): batch-1 split counts and launches (ab_decode), kernel times
  export CUDA_VISIBLE_DEVICES=0
  timeout 60 python -m sglang_tq.bench profile-decode --shapes 1x4096,1x32768,4x8192 --kv k4v4 \
    --out "$LOGS/profile.json" > "$LOGS/profile.log" 2>&1
  timeout 240 python -m sglang_tq.bench ab-decode --kv k4v4 --shapes 1x4096,1x32768,2x16384,4x8192 \
    --variant default: --variant s32:splits=32 --variant s64:splits=64 \
    --variant s128:max_splits=128,splits=128 --variant s256:max_splits=256,splits=256 \
    --variant s64apart:splits=64,fuse_rotation=0 --variant s128apart:max_splits=128,splits=128,fuse_rotation=0 \
    --variant b64w2s64:block_n=64,num_warps=2,splits=64 --variant b64w4s64:block_n=64,num_warps=4,splits=64 \
    --variant b16s128:block_n=16,max_splits=128,splits=128 \
    --out "$OUT/ab_split1.json" > "$LOGS/ab.log" 2>&1
  cp "$LOGS/profile.json" "$OUT/profile_decode.json"
  { echo "== profile"; tail -8 "$LOGS/profile.log"; echo "== ab"; tail -8 "$LOGS/ab.log"; } > "$OUT/summary.txt" 2>&1
  ;;
lt1)  # nvidia-h200 (one GPU, FA3 staged): sglang_tq.bench load's workloads ($4, default all) for the configs in $3
  export CUDA_VISIBLE_DEVICES=0
  # SM clock and power beside the runs (issue 13: does the gate/up GEMM slow with the clock?)
  nvidia-smi -i 0 --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu \
    --format=csv -lms 250 > "$LOGS/smi.csv" 2>&1 &
  SMI=$!
  timeout "$(left "${LIMIT_S:-590}")" python -m sglang_tq.bench load --configs "${3:?configs}" \
    --out "$OUT/loadtest.json" ${4:+--workloads "$4"} "${@:5}" --log-dir "$LOGS/lt" \
    --budget-s "$(left $(( ${LIMIT_S:-590} - 10 )))" > "$LOGS/lt.log" 2>&1
  kill "$SMI" 2> /dev/null
  { tail -40 "$LOGS/lt.log"; grep -h "prefill attention\|Use .* backend\|max_total_num_tokens=" \
      "$LOGS"/lt/*.log | head; } > "$OUT/summary.txt" 2>&1
  ;;
eval1)
  export CUDA_VISIBLE_DEVICES=0
  EV=/tmp/eval
  mkdir -p "$EV"
  # shellcheck disable=SC2329
  save_eval() { cp "$EV/eval.json" "$EV/eval.generations.jsonl" "$OUT/" 2>/dev/null
                tail -30 "$LOGS/eval.log" > "$OUT/summary.txt" 2>&1; }
  trap 'save_eval; tar czf "$OUT/logs.tgz" -C "$OUT" logs' TERM INT
  M=$(bash dev/gpu_host/unpack_model.sh "${EVAL_MODEL:-qwen2.5-coder-1.5b}" 2>> "$LOGS/unpack.log") \
    || { tail -5 "$LOGS/unpack.log"; exit 1; }
  if [ ! -f "$EV/eval.json" ] && [ -n "${EVAL_PREV:-}" ]; then
    cp "$EVAL_PREV" "$EV/eval.json" && chmod u+w "$EV/eval.json"
  fi
  B=$(( ${LIMIT_S:-590} - SECONDS - 30 ))
  timeout -s TERM $(( B + 15 )) python -m sglang_tq.bench eval --model-path "$M" \
    --configs "${3:?configs}" --tasks "${4:-gsm8k,humaneval}" --data-dir .eval_data \
    --out "$EV/eval.json" --log-dir "$LOGS/eval" --resume --budget-s "$B" > "$LOGS/eval.log" 2>&1
  save_eval
  trap - TERM INT
  ;;
soak1)
  export CUDA_VISIBLE_DEVICES=0
  soak_start
  while kill -0 "$(cat "$SD/pid")" 2> /dev/null && [ "$(left $(( ${LIMIT_S:-590} - 25 )))" -gt 0 ]; do
    sleep 10
  done
  if kill -0 "$(cat "$SD/pid")" 2> /dev/null; then
    echo "soak still running: call soak1 again" > "$OUT/summary.txt"
  else
    cp "$SD"/soak*.json "$SD"/*.log "$OUT/" 2> /dev/null
  fi
  tail -40 "$SD/soak.log" >> "$OUT/summary.txt" 2>&1
  ;;
arch1)  # nvidia-h200: sglang_tq.bench smoke on one dummy model config, one server per KV label
  export CUDA_VISIBLE_DEVICES=0
  MC="benchmarks/model_configs/${3:?model config}"
  for kv in $(echo "${4:-bf16,fp8,k4v4}" | tr , ' '); do
    # shellcheck disable=SC2046
    timeout "$(left $(( ${LIMIT_S:-590} - 20 )))" python -m sglang_tq.bench smoke --model-path "$MC" \
      --log "$LOGS/smoke_$kv.log" --out "$OUT/smoke_${3}_$kv.json" -- \
      $(python -c "from sglang_tq.bench.configs import kv_server_flags; print(' '.join(kv_server_flags('$kv')))") \
      > "$LOGS/smoke_${kv}_driver.log" 2>&1
    echo "$kv rc $?: $(grep -h 'max_total_num_tokens=' "$LOGS/smoke_$kv.log" | tail -1)" >> "$OUT/summary.txt"
    grep -h "Error\|error:" "$LOGS/smoke_$kv.log" | tail -3 >> "$OUT/summary.txt"
  done
  tar czf "$OUT/logs.tgz" -C "$OUT" logs
  ;;
stock1)  # nvidia-h200: --kv-quant none (plugin loaded) against stock SGLang (plugin not loaded)
  export CUDA_VISIBLE_DEVICES=0
  for run in stock plugin; do
    # the plugin run names --kv-quant none: only a server that loaded the plugin accepts it
    pre=SGLANG_PLUGINS=; flag=(-- --kv-quant none)
    [ "$run" = stock ] && pre=SGLANG_PLUGINS=no-such-plugin && flag=()
    env "$pre" timeout "$(left $(( ${LIMIT_S:-590} - 30 )))" python -m sglang_tq.bench smoke \
      --model-path benchmarks/model_configs/llama-3.1-8b --max-new-tokens 256 --log "$LOGS/$run.log" \
      --out "$OUT/smoke_$run.json" "${flag[@]}" > "$LOGS/${run}_driver.log" 2>&1
  done
  # the stock run's parser without the plugin must refuse the flag (no server start)
  SGLANG_PLUGINS=no-such-plugin timeout 120 python -m sglang.launch_server --model-path \
    benchmarks/model_configs/llama-3.1-8b --kv-quant none > "$LOGS/stock_refuses.log" 2>&1
  python - "$OUT" "$LOGS" > "$OUT/summary.txt" 2>&1 <<'PY'
import json, sys
out, logs = sys.argv[1:3]
a, b = (json.load(open(f"{out}/smoke_{r}.json")) for r in ("stock", "plugin"))
ids = [[r.get("output_ids") for r in d.get("reply") or []] for d in (a, b)]
# SGLang logs plugin discovery before its logging is set up, so the evidence of loading is
# the flag: the plugin run started with --kv-quant none, stock SGLang's parser refuses it
refused = "unrecognized arguments: --kv-quant" in open(f"{logs}/stock_refuses.log", errors="replace").read()
loaded = {"stock": not refused, "plugin": bool(b.get("ok")) and "--kv-quant" in (b.get("command") or [])}
doc = {"plugin_loaded": loaded, "stock_ok": a.get("ok"), "plugin_ok": b.get("ok"),
       "identical": bool(a.get("ok") and ids[0] == ids[1] and loaded["plugin"] and not loaded["stock"]),
       "prompts": len(ids[0]), "tokens_each": [len(x or []) for x in ids[0]],
       "stock_cmd": a.get("command"), "plugin_cmd": b.get("command"), "commit": b.get("commit"), "gpu": b.get("gpu")}
json.dump(doc, open(f"{out}/stock_identity.json", "w"), indent=1)
print(json.dumps(doc))
PY
  grep -h "sglang-tq\|Skipping plugin" "$LOGS"/stock.log "$LOGS"/plugin.log | head -5 >> "$OUT/summary.txt"
  ;;
store1)  # nvidia-h200: the store rotation A/B (dense | fwht) x warps (4 | 8) at N = 1 and 64
  export CUDA_VISIBLE_DEVICES=0
  for n in 1 64; do for rot in dense fwht; do for w in ${STORE_WARPS:-4 8}; do
    flag=--store-rotation=$rot
    # shellcheck disable=SC2086
    timeout "$(left $(( ${LIMIT_S:-590} - 20 )))" python -m sglang_tq.bench decode --shapes 1x4096 \
      --kv k4v4,k3v3 --store-batch "$n" --impls sglang-tq --store-num-warps "$w" $flag \
      --out "$LOGS/store_n${n}_${rot}_w$w.json" > "$LOGS/store_n${n}_${rot}_w$w.log" 2>&1
    echo "N=$n $rot w=$w: $(grep -h 'tq_store_kv\|store + decode chain' "$LOGS/store_n${n}_${rot}_w$w.log" | tr '\n' ' ')" \
      >> "$OUT/summary.txt"
  done; done; done
  for rot in dense fwht; do  # the fused query rotation of small-batch decode, the same two ways
    args='{"fwht": true}'; [ "$rot" = dense ] && args='{"fwht": false}'
    timeout "$(left $(( ${LIMIT_S:-590} - 20 )))" python -m sglang_tq.bench decode \
      --shapes 1x4096,1x32768,2x16384,4x8192 --kv k4v4,k3v3 --impls sglang-tq,fa3 --no-write-path \
      --tq-kernel-args "$args" --out "$LOGS/decode_$rot.json" > "$LOGS/decode_$rot.log" 2>&1
    { echo "decode, fused rotation $rot:"; grep -h "^sglang-tq\|^fa3" "$LOGS/decode_$rot.log"; } >> "$OUT/summary.txt"
  done
  tar czf "$OUT/logs.tgz" -C "$OUT" logs
  ;;
tp)  # nvidia-h100-x2/-x4 or nvidia-h200-x2/-x4 (FA3 staged; Qwen2.5-Coder-0.5B staged for the
  # identity check): issue 18 at TP = $TP (default: every visible GPU)
  TP=${TP:-$(nvidia-smi -L | wc -l)}
  TPM=${TP_MODEL:-$([ "$TP" -ge 4 ] && echo llama-3.1-70b || echo llama-3.1-8b)}
  TPF=${TP_MEM:-$([ "$TPM" = llama-3.1-70b ] && echo 0.85 || echo 0.45)}  # 70B: 35 GB weights a rank at TP 4
  # 1. a dummy model's server at TP: starts under CUDA graphs, answers, its pool tokens
  for kv in k4v4 bf16; do
    # shellcheck disable=SC2046
    timeout "$(left 200)" python -m sglang_tq.bench smoke --model-path "benchmarks/model_configs/$TPM" \
      --log "$LOGS/smoke_tp_$kv.log" --out "$OUT/smoke_${TPM}_tp${TP}_$kv.json" -- --tp-size "$TP" \
      $(python -c "from sglang_tq.bench.configs import kv_server_flags; print(' '.join(kv_server_flags('$kv')))") \
      > "$LOGS/smoke_tp_${kv}_driver.log" 2>&1
    echo "smoke $TPM TP $TP $kv rc $?: $(grep -h 'max_total_num_tokens=' "$LOGS/smoke_tp_$kv.log" | tail -1)" \
      >> "$OUT/summary.txt"
  done
  # 2. identity: teacher-forced KL / top-1 against bf16 at TP 1 of k4v4 at TP 1 and at TP (a
  #    real model: the dummy weights of a TP server are drawn per shard)
  M=$(bash dev/gpu_host/unpack_model.sh qwen2.5-coder-0.5b 2>> "$LOGS/unpack.log") || M=""
  if [ -n "$M" ]; then
    timeout -s TERM "$(left 380)" python -m sglang_tq.bench fidelity --model-path "$M" \
      --configs "k4v4,k4v4-tp$TP,bf16-tp$TP" \
      --config "k4v4-tp$TP=--kv-quant turboquant --kv-quant-bits k4v4 --tp-size $TP" \
      --config "bf16-tp$TP=--tp-size $TP" --log-dir "$LOGS/fid" --work-dir /tmp/fidelity_tp \
      --out "$OUT/fidelity_qwen_tp$TP.json" > "$LOGS/fid.log" 2>&1
    { echo "== fidelity TP 1 vs TP $TP"; tail -20 "$LOGS/fid.log"; } >> "$OUT/summary.txt"
  fi
  # 3. the reference and long-generation load tests at TP, fresh server per config (fa3 baselines)
  timeout "$(left "${LIMIT_S:-590}")" python -m sglang_tq.bench load --configs k4v4,bf16,fp8 \
    --model-path "benchmarks/model_configs/$TPM" --workloads reference,long-gen \
    --mem-fraction-static "$TPF" --extra-server-args="--tp-size $TP" \
    --out "$OUT/loadtest_tp$TP.json" --log-dir "$LOGS/lt" \
    --budget-s "$(left $(( ${LIMIT_S:-590} - 10 )))" > "$LOGS/lt.log" 2>&1
  tail -30 "$LOGS/lt.log" >> "$OUT/summary.txt"
  tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
  ;;
swa1)  # nvidia-h200 (one GPU, FA3 staged): decode attention per step of issue 16's model shapes,
  # sglang-tq (k4v4, k3v3) against SGLang's default Hopper backend (fa3, bf16 and fp8): Gemma-3-27B's
  # global and local (1024-token window) layers, gpt-oss-20b's full and 128-token-window layers
  # with sinks, Qwen3-Next's full-attention layers (head_dim 256)
  export CUDA_VISIBLE_DEVICES=0
  swa() {  # name, decode arguments
    local name=$1; shift
    timeout "$(left $(( ${LIMIT_S:-590} - 20 )))" python -m sglang_tq.bench decode --kv k4v4,k3v3 \
      --impls sglang-tq,fa3 --no-write-path --shapes "${SWA_SHAPES:-1x32768,16x8192,64x4096}" \
      --time-budget-s "$(left $(( ${LIMIT_S:-590} - 30 )))" "$@" --out "$OUT/decode_$name.json" \
      > "$LOGS/$name.log" 2>&1
    { echo "== $name"; tail -12 "$LOGS/$name.log"; } >> "$OUT/summary.txt"
  }
  swa gemma3-27b-global --num-q-heads 32 --num-kv-heads 16
  swa gemma3-27b-local --num-q-heads 32 --num-kv-heads 16 --window 1023
  swa gpt-oss-20b-full --num-q-heads 64 --num-kv-heads 8 --head-dim 64 --sinks
  swa gpt-oss-20b-window --num-q-heads 64 --num-kv-heads 8 --head-dim 64 --sinks --window 127
  swa qwen3-next --num-q-heads 16 --num-kv-heads 2 --head-dim 256
  tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
  ;;
mla1)  # nvidia-h200 (one GPU, FA3 staged): MLA decode per step, sglang-tq's packed latent against
  # SGLang's default Hopper MLA path (fa3, bf16 and fp8), DeepSeek-V2-Lite (16 heads) and -V3 (128)
  export CUDA_VISIBLE_DEVICES=0
  timeout "$(left 150)" python -m pytest -q tests/bench/test_decode_mla.py tests/kernels/test_mla_kernels.py \
    > "$OUT/pytest.log" 2>&1
  for h in 16 128; do
    timeout "$(left $(( ${LIMIT_S:-590} - 20 )))" python -m sglang_tq.bench decode-mla --num-heads "$h" \
      ${MLA_POOL:+--pool-tokens "$MLA_POOL"} --out "$OUT/decode_mla_h$h.json" > "$LOGS/mla_h$h.log" 2>&1
    tail -25 "$LOGS/mla_h$h.log" >> "$OUT/summary.txt"
  done
  tail -3 "$OUT/pytest.log" >> "$OUT/summary.txt"
  tar czf "$OUT/logs.tgz" -C "$OUT" logs
  ;;
mma1)  # nvidia-h200 (one GPU): the CUDA decode stage 1 (tq_decode_mma.py): its tests on CUDA, then the
  # same-run A/B against the Triton stage 1 (k4v4, CUDA-graph replay) at the decode benchmark's shapes;
  # the mma variants size their split counts for their one-warp programs (programs_per_sm)
  export CUDA_VISIBLE_DEVICES=0
  timeout "$(left $(( ${LIMIT_S:-590} / 3 )))" python -m pytest -v -rs tests/kernels/test_decode_mma.py \
    tests/kernels/test_lut.py > "$OUT/pytest.log" 2>&1
  echo "pytest rc $?" >> "$OUT/pytest.log"
  timeout "$(left $(( ${LIMIT_S:-590} - 15 )))" python -m sglang_tq.bench ab-decode --kv k4v4 \
    --shapes "${MMA_SHAPES:-1x4096,1x32768,4x8192,16x8192,64x16384,128x4096}" \
    --variant triton: --variant mma:impl=mma,programs_per_sm=12 \
    --variant mma-r128:impl=mma,maxnreg=128,programs_per_sm=16 \
    --variant mma-pf:impl=mma,prefetch=1,maxnreg=255,programs_per_sm=8 \
    --out "$OUT/ab_mma.json" > "$LOGS/ab_mma.log" 2>&1
  { tail -12 "$OUT/pytest.log"; tail -12 "$LOGS/ab_mma.log"; } > "$OUT/summary.txt"
  tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
  ;;
ncu1)  # nvidia-h200 (one GPU, FA3 staged for its row): Nsight Compute of one decode step, the
  # k4v4 stage-1 kernel and FA3 bf16's, full section set (stall reasons, pipe use, per-SASS samples)
  export CUDA_VISIBLE_DEVICES=0
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | head -1)
  if [ -z "$NCU" ]; then echo "ncu1: no ncu on this host" | tee "$OUT/summary.txt"; exit 0; fi
  ncu_one() {  # name, kernel regex, impl
    timeout "$(left $(( ${LIMIT_S:-590} - 40 )))" "$NCU" --kernel-name-base demangled --kernel-name "regex:$2" --launch-skip 3 \
      --launch-count 1 --set full --import-source yes -f -o "$LOGS/$1" \
      python -m sglang_tq.bench decode --shapes "${NCU_SHAPES:-64x16384}" --kv k4v4 --impls "$3" \
      --baseline-dtypes bf16 --no-write-path --no-cuda-graph --warmup 1 --rep 3 --repeat 1 \
      --check none --out "$LOGS/$1_bench.json" > "$LOGS/$1.log" 2>&1
    echo "$1 rc $?" >> "$OUT/summary.txt"
    "$NCU" --import "$LOGS/$1.ncu-rep" --page details --csv > "$OUT/ncu_$1_details.csv" 2>> "$LOGS/$1.log"
    "$NCU" --import "$LOGS/$1.ncu-rep" --page source --csv --print-source sass 2>> "$LOGS/$1.log" \
      | gzip > "$OUT/ncu_$1_sass.csv.gz"
  }
  ncu_one tq_stage1 _tq_decode_stage1 sglang-tq
  ncu_one fa3_bf16 FlashAttnFwdSm90 fa3
  tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
  ;;
rows1)  # nvidia-h200: the store's one-token programs (row_tokens 64) against 16-token tiles at N = 1, 8, 64
  export CUDA_VISIBLE_DEVICES=0
  for n in 1 8 64; do for v in tiles:0: rows:64: rows2:64:2; do
    IFS=: read -r name rt w <<< "$v"
    # shellcheck disable=SC2086
    timeout "$(left $(( ${LIMIT_S:-590} - 20 )))" python -m sglang_tq.bench decode --shapes 1x4096 \
      --kv k4v4,k3v3 --store-batch "$n" --impls sglang-tq,fa3 --store-row-tokens "$rt" \
      ${w:+--store-num-warps "$w"} --out "$LOGS/rows_n${n}_$name.json" > "$LOGS/rows_n${n}_$name.log" 2>&1
    echo "N=$n $name: $(grep -h 'tq_store_kv\|store + decode chain\|store_cache' "$LOGS/rows_n${n}_$name.log" | tr '\n' ' ')" \
      >> "$OUT/summary.txt"
  done; done
  tar czf "$OUT/logs.tgz" -C "$OUT" logs
  ;;
suite)  # nvidia-h200: the whole test suite on CUDA (beside a running soak, if one was started)
  export CUDA_VISIBLE_DEVICES=0
  if [ -n "${UNPACK:-}" ]; then  # staged pieces of model $UNPACK: convert them meanwhile, for a later call
    setsid nohup bash dev/gpu_host/unpack_model.sh "$UNPACK" > /tmp/unpack_bg.log 2>&1 < /dev/null &
  fi
  [ -n "${SOAK:-}" ] && soak_start  # SOAK=1: the soak starts first and runs on beside everything
  # -v: a run cut by the call's limit still names every test it ran; SUITE: a shard (files, -k)
  # shellcheck disable=SC2086
  timeout "$(left $(( ${LIMIT_S:-590} - 15 )))" python -m pytest -v -rs ${SUITE:-tests} > "$OUT/pytest.log" 2>&1
  echo "pytest rc $?" >> "$OUT/pytest.log"
  tail -30 "$OUT/pytest.log" > "$OUT/summary.txt"
  tail -3 /tmp/soak/soak.log >> "$OUT/summary.txt" 2>&1
  ;;
all)
  M=$(model) || M=""
  SMALL=(--server-args "--mem-fraction-static 0.3")
  (
    export CUDA_VISIBLE_DEVICES=0
    timeout 150 python -m pytest -q -p no:cacheprovider tests/kernels/test_kernels.py tests/serving/test_backend.py \
      -k "extend or dequant or backend" > "$OUT/pytest.log" 2>&1
    python -m sglang_tq.bench load --configs bf16,k4v4 "${LT[@]}" --out "$LOGS/lt_a.json" \
      --log-dir "$LOGS/lt_a" --budget-s "$(left 545)" > "$LOGS/lt_a.log" 2>&1
  ) &
  P0=$!
  (
    export CUDA_VISIBLE_DEVICES=1
    if [ -n "$M" ]; then
      timeout -s TERM 330 python -m sglang_tq.bench fidelity --model-path "$M" --configs fp8,k4v4,k3v3 \
        --check-hf "${SMALL[@]}" --log-dir "$LOGS/fid" --out "$OUT/fidelity_smollm2.json" \
        > "$LOGS/fidelity.log" 2>&1 &
      timeout -s TERM 330 python -m sglang_tq.bench radix --model-path "$M" \
        --configs bf16,k4v4,k4v4-pp --budget-s 310 "${SMALL[@]}" --log-dir "$LOGS/radix" \
        --out "$OUT/radix_smollm2.json" > "$LOGS/radix.log" 2>&1 &
      wait
    fi
    python -m sglang_tq.bench load --configs fp8 "${LT[@]}" --out "$LOGS/lt_b.json" \
      --log-dir "$LOGS/lt_b" --budget-s "$(left 545)" > "$LOGS/lt_b.log" 2>&1
  ) &
  P1=$!
  wait "$P0" "$P1"
  python -m sglang_tq.bench load --merge "$LOGS/lt_a.json" "$LOGS/lt_b.json" \
    --out "$OUT/loadtest_h100eq.json" > "$OUT/summary.txt" 2>&1
  { echo "== pytest"; tail -3 "$OUT/pytest.log"; echo "== fidelity"; tail -40 "$LOGS/fidelity.log"
    echo "== radix"; tail -30 "$LOGS/radix.log"; } >> "$OUT/summary.txt" 2>&1
  ;;
*)
  echo "unknown mode '$MODE': use perf, tune, check, final, mixed, lut3, prefill, ref1, sp1, roof, small, split1, lt1, eval1, soak1, suite, arch1, stock1, store1, accuracy, qwen, qwen+serving or all." >&2
  exit 2
  ;;
esac
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
cat "$OUT/summary.txt"
