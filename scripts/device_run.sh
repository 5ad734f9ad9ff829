#!/usr/bin/env bash
# One call on the GPU machine: the stages named on the command line, each under its own
# time limit so that a slow or failing stage still leaves the others' output.
#   scripts/device_run.sh env smoke tune bench tests
#   scripts/device_run.sh suite                                      (the whole suite, -n 14; stopped at 9 min)
#   scripts/device_run.sh wide                                       (about 8 min)
#   REPORT_ARGS=--csv-only scripts/device_run.sh hf decode dropout   (about 4 min)
#   scripts/device_run.sh simulate                                   (about 3-4 min, one GPU)
#   scripts/device_run.sh shim                                       (run() with carry [".cache"])
# Logs and CSVs go to $OUT (the device tool brings them back).
set -u
export OUT=${OUT:-/tmp/ringflash_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# NCCL/NVSHMEM multicast stays off on shared machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
stage() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s)"; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s"; }
# Appends to <stage>.log the count of test reports in <stage>_tests.tsv and its failures.
test_log_summary() { local tsv="$OUT/$1_tests.tsv"; [ -f "$tsv" ] || return 0
  { echo "--- $1_tests.tsv: $(grep -cE '^(passed|failed|skipped)' "$tsv") reports"
    grep -A25 -E '^failed' "$tsv" | head -150; } >> "$OUT/$1.log"; }
for s in "$@"; do
  case $s in
    env) stage env 60 bash -c 'nvidia-smi -L; python3 -c "import torch, triton, numpy; print(torch.__version__, triton.__version__, numpy.__version__, torch.cuda.get_device_name(0))"' ;;
    smoke) stage smoke 120 python3 -m ringflash demo ;;
    tune) stage tune "${TUNE_LIMIT:-300}" python3 -m ringflash bench tune ${TUNE_ARGS:-} ;;
    bench) stage bench "${BENCH_LIMIT:-300}" python3 -m ringflash bench kernels --csv "$OUT/kernels.csv" ${BENCH_ARGS:-} ;;
    # The README's test command on the GPU machine (issue 14): the CP batches and the
    # memory-heavy GPU tests each keep to one xdist worker (conftest). Each test's outcome
    # and duration also go to suite_tests.tsv as it finishes, so a run cut by the limit
    # still names its failures and the tests it never reached. The whole suite takes more
    # than one call (run 42): SUITE_ARGS="tests --ignore=tests/test_properties.py", then
    # SUITE_ARGS=tests/test_properties.py. RINGFLASH_TEST_RESUME=<a suite_tests.tsv brought
    # back and committed> leaves out the tests it records as passed (tests/conftest.py).
    # SUITE_ARGS is split into words; a -k expression with spaces goes in SUITE_K (run 50).
    suite) stage suite "${SUITE_LIMIT:-540}" env RINGFLASH_TEST_LOG="$OUT/suite_tests.tsv" python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n "${SUITE_WORKERS:-14}" --tb=line -rfE --durations=15 ${SUITE_K:+-k "$SUITE_K"} ${SUITE_ARGS:-tests}
      test_log_summary suite ;;
    # Issue 14: the CP training example on one GPU (world size 1, NCCL): loss and tokens/s.
    train1) stage train1 "${TRAIN_LIMIT:-240}" torchrun --standalone --nproc-per-node 1 examples/train_cp.py --device cuda --steps "${TRAIN_STEPS:-30}" ${TRAIN_ARGS:-} ;;
    # Issue 17: the same on every GPU of the machine (TRAIN_ARGS=--check compares its losses and
    # gradient norms with one process's).
    trainall) stage trainall "${TRAIN_LIMIT:-240}" torchrun --standalone --nproc-per-node "$(nvidia-smi -L | wc -l)" \
                examples/train_cp.py --device cuda --steps "${TRAIN_STEPS:-30}" ${TRAIN_ARGS:-} ;;
    # TESTS_K: a -k expression (spaces allowed); TESTS_ARGS: more words for pytest.
    tests) stage tests "${TESTS_LIMIT:-300}" env RINGFLASH_TEST_LOG="$OUT/tests_tests.tsv" python3 -m pytest -m "gpu and not big" -q -p no:cacheprovider -n "${TEST_WORKERS:-3}" tests -k "${TESTS_K:-}" ${TESTS_ARGS:-}
      test_log_summary tests ;;
    bigtests) stage bigtests "${BIG_LIMIT:-200}" python3 -m pytest -m big -q -p no:cacheprovider tests ;;
    grouped) stage grouped "${GROUPED_LIMIT:-300}" python3 -m ringflash bench grouped --csv "$OUT/grouped.csv" ;;
    cpbench) stage cpbench "${CPBENCH_LIMIT:-300}" python3 -m ringflash bench cp --csv "$OUT/cp.csv" ${CPBENCH_ARGS:-} ;;
    cptests) stage cptests "${CPTESTS_LIMIT:-300}" env RINGFLASH_CP_BACKEND=nccl python3 -m pytest -q -p no:cacheprovider tests/test_cp.py -k "${CPTESTS_K:-}" ;;
    profile) stage profile "${PROFILE_LIMIT:-400}" python3 scripts/profile_cp.py ${PROFILE_ARGS:-} ;;
    overhead) stage overhead "${OVERHEAD_LIMIT:-120}" python3 -m ringflash bench tune --only-overhead ;;
    # Issue 16: flash-attn's own tests through the import shim, a sample of each function
    # (`scripts/flash_attn_tests.py --prepare` here first; the call carries .cache).
    shim) stage shim "${SHIM_LIMIT:-300}" python3 scripts/flash_attn_tests.py -n "${SHIM_WORKERS:-8}" \
            --sample "${SHIM_SAMPLE:-8}" --time-limit "$(( ${SHIM_LIMIT:-300} - 25 ))" --results "$OUT/shim.jsonl" ;;
    # Registers and spills of every compiled kernel variant (issue 15; ~1-2 min compiling).
    registers) stage registers "${REGISTERS_LIMIT:-240}" python3 -m ringflash bench registers --csv "$OUT/registers.csv" ${REGISTERS_ARGS:-} ;;
    # Issue 15/16 benchmarks: each writes its CSV (and, unless REPORT_ARGS=--csv-only, its
    # markdown and PNG) into $OUT/<stage>/; the log holds the printed tables either way.
    # $OUT brings back at most 8 files: `wide` alone gives 4, `hf decode dropout` with
    # REPORT_ARGS=--csv-only gives 6 (redraw the rest with --from-csv on any machine).
    wide) stage wide "${WIDE_LIMIT:-560}" python3 -m ringflash bench kernels --grid wide --out "$OUT/wide" ${REPORT_ARGS:-} ${WIDE_ARGS:-} ;;
    # Issue 15: the portable kernels with the head dim in two parts (RINGFLASH_HEAD_PARTS)
    # against one padded tile, on the dense cases it changes (d=192 since run 49); compare
    # the two CSVs (`bench kernels --from-csv`).
    headparts) for hp in 0 1; do stage "headparts$hp" "${HEADPARTS_LIMIT:-200}" env RINGFLASH_HEAD_PARTS=$hp \
                 python3 -m ringflash bench kernels --grid wide --families dense --headdims ${HEADPARTS_DIMS:-192} \
                 --seqlens ${HEADPARTS_SEQLENS:-512 2048 8192} --out "$OUT/headparts$hp" --csv-only; done ;;
    # Issue 15: whether the head-dim splits that configs.head_parts allows (d=192) run clean
    # at real sizes (runs 41 and 49 found other splits wrong), then their GPU tests; both
    # clean is what configs.HEAD_PARTS_DEFAULT = "1" waits for. HEADPROBE_ARGS="--headdims
    # 96 160 --min-part 32" probes the 32-wide splits run 49 turned off.
    headprobe) stage headprobe "${HEADPROBE_LIMIT:-240}" python3 scripts/probe_head_parts.py ${HEADPROBE_ARGS:-}
               stage headtests "${HEADTESTS_LIMIT:-150}" env RINGFLASH_TEST_LOG="$OUT/headtests_tests.tsv" python3 -m pytest \
                 -m gpu -q -p no:cacheprovider -n 3 tests/test_head_parts.py tests/test_properties.py -k head_parts
               test_log_summary headtests ;;
    # Run 42's suite failure: the Gluon atomic backward's dQ error per seed and its spread
    # over repeats (rounding or a race between the consumers' staged dS tiles).
    probeatomic) stage probeatomic "${PROBEATOMIC_LIMIT:-150}" python3 scripts/probe_atomic_dq.py ${PROBEATOMIC_ARGS:-} ;;
    hf) stage hf "${HF_LIMIT:-300}" python3 -m ringflash bench hf --out "$OUT/hf" ${REPORT_ARGS:-} ${HF_ARGS:-} ;;
    decode) stage decode "${DECODE_LIMIT:-150}" python3 -m ringflash bench decode --out "$OUT/decode" ${REPORT_ARGS:-} ${DECODE_ARGS:-} ;;
    # Issue 18: every rank of 2-, 4- and 8-rank plans alone on one GPU (compute balance and
    # the cost model's accuracy). `bench cp --simulate 2 4 8 --estimate` puts it at about
    # 190 s (130 s of timing at H200 rates, compilation and start assumed 75 s); the limit
    # stops it at 240 s, and it measures balanced and auto's candidates first, so a cut run
    # loses ring, zigzag_ring and stripe first (the report then says it was interrupted).
    simulate) stage simulate "${SIMULATE_LIMIT:-240}" python3 -m ringflash bench cp --simulate 2 4 8 --fit --out "$OUT/simulate" ${REPORT_ARGS:-} ${SIMULATE_ARGS:-} ;;
    # Issue 16: where an eager decode call's time goes (wall, do_bench, torch.profiler;
    # four chrome traces in $OUT/profdecode).
    probesplits) stage probesplits "${PROBESPLITS_LIMIT:-150}" python3 scripts/probe_decode_splits.py ${PROBESPLITS_ARGS:-} ;;
    # Issues 15/16: every candidate tile of the training kernels on one case (probe_tiles.py --help).
    # PROBETILES_CASES: several cases' arguments separated by "|", one after the other in one log.
    probetiles) if [ -n "${PROBETILES_CASES:-}" ]; then
                  stage probetiles "${PROBETILES_LIMIT:-300}" bash -c 'IFS="|"; for c in $PROBETILES_CASES; do
                    echo "### probe_tiles.py $c"; IFS=" " eval "python3 scripts/probe_tiles.py $c"; done'
                else stage probetiles "${PROBETILES_LIMIT:-300}" python3 scripts/probe_tiles.py ${PROBETILES_ARGS:-}; fi ;;
    # Issue 15: the Gluon Hopper forward: its error, then its time against the portable
    # forward, FA2 and cuDNN (scripts/probe_sm90.py --help).
    probesm90) stage probesm90 "${PROBESM90_LIMIT:-240}" python3 scripts/probe_sm90.py ${PROBESM90_ARGS:-} ;;
    # Run 47's fault: the GPU varlen property test on the Gluon kernels (RINGFLASH_SM90_VARLEN=1),
    # VARLENLOOP_SEEDS seeds one after the other, each example echoed; at the first failure the
    # last examples are replayed in fresh processes with CUDA_LAUNCH_BLOCKING=1.
    varlenloop) stage varlenloop "${VARLENLOOP_LIMIT:-400}" bash -c 'for seed in ${VARLENLOOP_SEEDS:-1 2 3 4 5 6}; do
                  echo "### seed $seed"; log="$OUT/varlenloop-$seed.log"
                  if ! RINGFLASH_BACKEND=sm90 RINGFLASH_SM90_VARLEN=1 RINGFLASH_HYPOTHESIS_ECHO=1 RINGFLASH_TEST_SEED=$seed \
                       python3 -m pytest -s -q -p no:cacheprovider -p no:xdist tests/test_properties.py -k test_gpu_varlen > "$log" 2>&1; then
                    tail -5 "$log"; python3 scripts/replay_last_example.py "$log" RINGFLASH_BACKEND=sm90,RINGFLASH_SM90_VARLEN=1 \
                      RINGFLASH_BACKEND=portable; exit 1; fi; tail -1 "$log"; done' ;;
    # Issue 15: what softcap (portable kernels only) costs against the same calls without it.
    probesoftcap) stage probesoftcap "${PROBESOFTCAP_LIMIT:-150}" python3 scripts/probe_softcap.py ${PROBESOFTCAP_ARGS:-} ;;
    probefp32) stage probefp32 "${PROBEFP32_LIMIT:-240}" python3 scripts/probe_fp32.py ${PROBEFP32_ARGS:-} ;;
    # Issue 15: where an HF Llama training step's time goes, ringattn against sdpa.
    profhf) stage profhf "${PROFHF_LIMIT:-240}" python3 scripts/profile_hf.py ${PROFHF_ARGS:-} ;;
    profdecode) stage profdecode "${PROFDECODE_LIMIT:-150}" python3 scripts/profile_decode.py --out "$OUT/profdecode" ;;
    # Issue 15, run 51's finding: head dims with d % 16 == 8 now take their strides in units
    # of their alignment (problem.stride_unit). Their CPU tests on the GPU (bf16), then the
    # portable and default kernels at d=72 and 40 (d=48 and 112 beside them: multiples of
    # 16, unchanged), then decode at d=64 and 72.
    units) stage unitstests 120 python3 -m pytest -q -p no:cacheprovider -p no:xdist tests/test_stride_unit.py
           for be in portable default; do
             stage "units-$be" "${UNITS_LIMIT:-150}" env "RINGFLASH_BACKEND=${be%default}" \
               python3 -m ringflash bench kernels --grid wide --families dense --headdims 40 48 72 112 \
               --seqlens 512 4096 --out "$OUT/units-$be" --csv-only; done
           stage unitsdecode "${UNITS_LIMIT:-150}" python3 -m ringflash bench decode --headdims 64 72 \
             --out "$OUT/unitsdecode" --csv-only ;;
    # Issue 15: Nsight Compute's counters of the short cells' kernels, ours beside the
    # baseline's (occupancy, throughput, stall reasons; scripts/ncu_kernels.py --help).
    ncu) stage ncu "${NCU_LIMIT:-300}" python3 scripts/ncu_kernels.py ${NCU_ARGS:-} ;;
    # Issue 15, after run 53: the opt-in TMA K/V loads of the portable forward
    # (RINGFLASH_FWD_KV_TMA=1): their tests on the GPU, then the varlen 64x256 forward's
    # tiles as CUDA-graph replays with and without them, against FA2 varlen.
    kvtma) stage kvtmatests 150 env RINGFLASH_TEST_LOG="$OUT/kvtmatests_tests.tsv" python3 -m pytest -q \
             -p no:cacheprovider -n 4 tests/test_fwd_kv_tma.py
           test_log_summary kvtmatests
           # --one-loop for the pointer loads only: the TMA plans run split phases (fwd._forward_plan).
           for t in 0 1; do stage "kvtma$t" "${KVTMA_LIMIT:-200}" env RINGFLASH_FWD_KV_TMA=$t python3 scripts/probe_tiles.py \
             --dropout 0 --pack 64x256 --heads 32 --kv-heads 8 --full --kinds fwd --cudagraph $([ $t = 0 ] && echo --one-loop); done ;;
    # Issue 15: the two-kernel Gluon backward with dQ a programmatic dependent launch of dK/dV
    # (RINGFLASH_SM90_BWD_OVERLAP) against the serial launches on the d=128 cells run 55
    # left short of 0.90x cuDNN (MHA full, GQA 32/8 causal 16k, batch-1 16/4 causal 8k).
    overlap) stage overlaptests "${OVERLAPTESTS_LIMIT:-200}" env RINGFLASH_TEST_LOG="$OUT/overlaptests_tests.tsv" python3 -m pytest -m gpu -q \
               -p no:cacheprovider -n 3 tests/test_gpu_attention.py -k overlapped_dq_launch
             test_log_summary overlaptests
             tiles="64x128x2/128x128x2 64x128x2/128x128x2+overlap 64x128x2/128x128x2"
             stage overlap_mha "${OVERLAP_LIMIT:-150}" python3 scripts/probe_sm90.py --parts bwd --headdims 128 \
               --seqlens 4096 16384 --bwd-tiles $tiles
             stage overlap_gqa "${OVERLAP_LIMIT:-150}" python3 scripts/probe_sm90.py --parts bwd --headdims 128 \
               --heads 32 --kv-heads 8 --seqlens 16384 --bwd-tiles $tiles
             stage overlap_b1 "${OVERLAP_LIMIT:-150}" python3 scripts/probe_sm90.py --parts bwd --headdims 128 \
               --heads 16 --kv-heads 4 --tokens 8192 --seqlens 4096 8192 --bwd-tiles $tiles ;;
    # Issue 15: the short-document forward tile with K/V through TMA descriptors, the default
    # since run 57 (SHORT_KEYS_TABLE): the descriptors' tests (their d=72 cases take that tile;
    # not marked gpu, they run on whatever device there is) and the GPU varlen tests on the
    # default path, then the wide grid's varlen cells (the 64 x 256 pack's through
    # flash_attn_varlen_func).
    kvtmacheck) stage kvtmachecktests "${KVTMACHECK_LIMIT:-200}" env \
                  RINGFLASH_TEST_LOG="$OUT/kvtmachecktests_tests.tsv" python3 -m pytest -q -p no:cacheprovider \
                  -n 8 tests/test_fwd_kv_tma.py tests/test_gpu_attention.py tests/test_properties.py \
                  -k "kv_tma or (varlen and gpu)"
                test_log_summary kvtmachecktests
                stage kvtmawide "${WIDE_LIMIT:-150}" python3 -m ringflash bench kernels \
                  --grid wide --rounds 2 --families varlen --out "$OUT/kvtmawide" --csv-only ;;
    dropout) stage dropout "${DROPOUT_LIMIT:-120}" python3 -m ringflash bench dropout --out "$OUT/dropout" ${REPORT_ARGS:-} ${DROPOUT_ARGS:-} ;;
    *) echo "unknown stage $s" ;;
  esac
done
# The reply carries the tail of stdout: end with the summaries.
for f in "$OUT"/*.log; do echo; echo "##### $(basename "$f")"; tail -n "${TAIL:-40}" "$f"; done
