#!/usr/bin/env bash
# The benchmark run of issue 5, in parts that each fit one device call (10 minutes at most),
# most important first. Every part writes under $OUT/<part>/ and stops each script with a
# timeout, so a cut run keeps what it measured. On the device, after MLX is installed
# (README of ../shared/device), from the repo root:
#
#     export PYTHONPATH=/tmp/site:$PWD && bash bench/gpu_session.sh PART
#
# PART:
#   blockwise  checkpointed rows on the block-by-block step (4-bit at depths 1-3), bf16 rows   ~7 min
#   peers   diffusers (pets, people) and mflux 4-bit (pets, people, style)              ~8 min
#   check   pets' LoRA gradients agree between the fused and our attention backward; style trains
#           to finite losses with the trainer's routes (bf16 and 4-bit, checkpointing off and on;
#           the run-10 NaN and the run-9 crash), each in its own process              ~6 min
#   bf16    our bf16 rows (pets, people; style's come from check), then diffusers + peft   ~5 min
#   q4      our 4-bit rows (pets, people, style), then mflux 0.15.5 per template          ~9 min
#   ttfs_cold  time to first step, every kernel cache emptied first (a user's first run)   ~5-8 min
#   ttfs_warm  the same, kernels cached, five steps (whole-run peak); twice more with the driver's
#              JIT cache at its 4 GiB maximum                                            ~3 min
#   s15     run 15: MLX's CUDA graph settings against people 4-bit ckpt at depth 1 and 0     ~8 min
#   s15b    run 15: bf16 references alone, two dense copies, combinations, a run with a preview ~8 min
#   s15c    run 15: a fresh machine's first run with the kernel warm-up, then without    ~9 min
#   s16     the warm-up with its two helpers (cold, then without), the backward split at depth 1 ~9 min
#   s17     the warm-up shared over processes (cold), the backward split at depth 1 (A/B/A)       ~7 min
#   s17b    the cold run again, warm runs (driver cache on/off), the first-call probe          ~5 min
#   s17c    a first run with CLIP dequantizing, the first step's slowest stages; a warm run    ~4 min
#   s17d    the shape-generic dequantize kernel: checked, a first and a warm run, people rows  ~5 min
#   s17e    the people first run again; pets' first run (4-bit, one-graph step)               ~5 min
#   s17f    pets' first run with the block-by-block shares beside the one-graph warm-up        ~3 min
#   s18     run 17: the host's run-ahead in kernels (graph size x MLX's 10 graphs in flight), depths 1/1000/0 ~8 min
#   s18b    run 17: depth -1 (unbounded, 5 a graph) for every template; whole runs at depth 1 and -1   ~7 min
#   s18c    run 18: people without our kernels (a user's short run) at depth 1 and bf16; their compile time ~4 min
#   s18d    run 18: CUDA's new default (-1): first and next whole people runs; its step against bf16, A/B/A/B ~5 min
#   s18e    s18d's first run and one A/B only                                                          ~2 min
#   s20     run 20: the host's share (this commit against OLD_ROOT's, A/B/A/B), graphs cut by bytes, without graphs, RoPE's kernel ~4 min
#   s21     run 21: the default (10 kernels or 40 MB a graph; also with LoRA's compute copies, and on 4 cores) against 5 kernels, and bf16, ROUNDS rounds (4) ~6 min
#   s21r    run 21: results.json's 4-bit rows (every template, checkpointed and not) and mflux's 4-bit step, same call ~7 min
#   s22     run 22: the CUDA tests of the changed routes, then this session's fewer kernels against OLD_ROOT's
#           commit (people 4-bit ckpt and bf16) and our RoPE kernel against the fused route, rounds
#           FIRST_ROUND..ROUNDS (1..3)                                           ~4 min + ~1.5 min a round
#   s22p    run 22: CUPTI profiles of both rows of the 1.5x with where the GPU waited (idle gaps)   ~2 min
#   s23     run 23: adapter gradients queued first at each backward stage against the default (4-bit ckpt,
#           bf16 beside), rounds FIRST_ROUND..ROUNDS, then both profiled with the host's ranges (PROFILES=0: not) ~3 min + 1 a round
#   s24     run 24: the optimizer's update inside each backward stage against the whole update at the step's
#           end, with GRADS_FIRST, bf16 beside; rounds, CUDA tests, PROFILES=1: profile      ~4 min + ~0.5 a round
#   s25     run 25: GRADS_FIRST and forward stages in threes on the split update, rounds, PROFILES=1|2:
#           profiles with the host's time                                                 ~2 min + 0.6 a round
#   s26     run 26: 20 and 30 kernels a CUDA graph against 10, rounds, PROFILES=1: host time  ~2 min + 0.6 a round
#   s27     run 27: a first run with the update kernels early in the join's share, then OLD_ROOT's; rounds
#           of people 4-bit checkpointed against bf16                                ~4 min + 0.3 a round
#   s28     one 4-bit product for a single block's q, k, v and MLP input against four: the probe, then the
#           step with FUSED_SINGLE_INPUTS against the default, bf16 beside, rounds            ~5 min + 0.4 a round
#   s29     a first run training uncompiled while the warm-up compiles (the default), the same waiting for it,
#           OLD_ROOT's first run, the next run, pets' first run                        ~6-7 min (+ the model's write)
#   s14     run 14's rows: depth 1 and 0, one or two dense copies, 8-bit ckpt, bf16     ~6 min
#   ttfs    time to first step with MLX's kernel cache emptied first (a user's first run) ~5-10 min
#   q8      our 8-bit rows                                                               ~4 min
#   style   fused attention backward with contiguous inputs (bisect); style's rows     ~8 min
#   verify  style's rows with the contiguous fused backward (CONTIGUOUS_JOINT_ATTENTION)   ~5 min
#   verify2 full-size style checkpointed with every kernel; are our kernels cached?    ~5 min
# Then, here: the flat ours_*/peer_*/ttfs*.json files and a run.json (card, date) in bench/raw/runN/, and
# python bench/make_results.py --run runN --fallback-runs run12 run11 run9 run2 run1
# Rounds (s21 and the like): python bench/read_rounds.py bench/raw/runN/PART --against bf16 (medians and floors)
set -u
part=${1:?"which part: check, bf16, q4, ttfs, ttfs2, q8, verify, verify2, style8 or style"}
out=${OUT:-/tmp/bench_out}/$part
mkdir -p "$out"
export OUT=$out
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# style's four rows (bf16 and 4-bit, checkpointing off and on), each in its own process, with
# bench_train.py's extra arguments "$@"; prints the numbers and the losses
style_rows() {
    local limit=${FIRST_ROW_TIMEOUT:-140}  # a fresh machine's first process compiles MLX's kernels (>75 s)
    for q in none 4; do
        for c in off on; do
            OUT=$out timeout $limit python bench/bench_train.py --templates style --quantize $q --checkpointing $c \
                --steps 6 "$@" >"$out/style_q${q}_ckpt_$c.log" 2>&1
            echo "style quantize=$q checkpointing=$c rc=$?"; limit=140
            mv -f "$out/ours.json" "$out/ours_style_q${q}_ckpt_$c.json" 2>/dev/null &&
                python -c "import json,sys; r=json.load(open(sys.argv[1]))[0]; print({k: r.get(k) for k in
                ('s_per_step_median', 'peak_gib', 'estimate_gib', 'losses_finite', 'losses', 'switched_off')})" \
                "$out/ours_style_q${q}_ckpt_$c.json" || tail -c 600 "$out/style_q${q}_ckpt_$c.log"
        done
    done
}

# bench_train.py with "$@" after a name and a timeout: ours_NAME.json, one summary line per row
bench_rows() {
    local name=$1 limit=$2; shift 2
    OUT=$out timeout $limit python bench/bench_train.py "$@" >"$out/$name.log" 2>&1
    echo "$name rc=$?"
    mv -f "$out/ours.json" "$out/ours_$name.json" 2>/dev/null && python - "$out/ours_$name.json" <<'PY' || tail -c 600 "$out/$name.log"
import json, sys
for r in json.load(open(sys.argv[1])):
    print(r["template"], r["quantize"], "ckpt" if r["checkpointing"] else "no-ckpt",
          {k: r.get(k) for k in ("s_per_step_median", "s_per_step_mean", "peak_gib", "estimate_gib",
                                 "memory_limit_gib", "losses_finite", "switches_set", "error")})
PY
}

# bench_rows with environment variables for MLX first: env_rows NAME LIMIT "VAR=VALUE ..." ARGS...
# (MLX reads its MLX_* variables once per process, so each setting is a process of its own)
env_rows() {
    local name=$1 limit=$2 vars=$3; shift 3
    local started=$SECONDS
    # ROW_ROOT: another checkout's bench and engine (an A/B of two commits in one call); ROW_PREFIX: a
    # command the row runs under (taskset -c 0-3)
    (cd "${ROW_ROOT:-$root}" && OUT=$out env $vars ${ROW_PREFIX:-} timeout $limit python bench/bench_train.py "$@" \
        >"$out/$name.log" 2>&1)
    echo "$name [$vars] rc=$? $((SECONDS - started)) s"
    grep -h -i "thrash" "$out/$name.log" | sort | uniq -c | head -3
    mv -f "$out/ours.json" "$out/ours_$name.json" 2>/dev/null && python - "$out/ours_$name.json" <<'PY' || tail -c 600 "$out/$name.log"
import json, sys
for r in json.load(open(sys.argv[1])):
    print("   ", r["template"], r["quantize"], "ckpt" if r["checkpointing"] else "no-ckpt",
          {k: r.get(k) for k in ("s_per_step_median", "s_per_step_min", "peak_gib", "estimate_gib", "losses_finite",
                                 "switches_set", "error")})
PY
}

# the two rows of people's 1.5x target, and the switches a 750-step run takes (MLX's routes)
PEOPLE4="--templates people --quantize 4 --checkpointing on --steps 10"
PEOPLE_BF16="--templates people --quantize none --checkpointing off --steps 10"
ROUTES_750="--switch LORA_KERNELS=0 --switch ROPE_KERNEL=0"

# where one variant's step time goes (CUPTI): profile_rows NAME "VAR=VALUE ..." VARIANT (bench/profile_step.py
# sets no CUDA-graph settings: give the trainer's by hand)
profile_rows() {
    local name=$1 vars=$2 variant=$3
    OUT=$out env $vars timeout ${PROFILE_TIMEOUT:-100} python bench/profile_step.py --steps 4 --variants "$variant" >"$out/profile_$name.log" 2>&1
    echo "profile $name rc=$?"; grep -E '^\{"template|wall_s|gpu_busy|kernels_per_step|idle_ms' "$out/profile_$name.log" | cut -c1-300
    mv -f "$out/profile.json" "$out/profile_$name.json" 2>/dev/null
}

# a machine's first run (every kernel cache emptied first): cold_run NAME "VAR=VALUE ..." [time_to_first_step.py's
# arguments] (timeout COLD_TIMEOUT)
cold_run() {
    local name=$1 vars=$2
    shift 2
    rm -rf /tmp/mlx /tmp/ttfs-mlx-kernels ~/.nv/ComputeCache
    mkdir -p "$out/$name"
    OUT=$out/$name env $vars timeout ${COLD_TIMEOUT:-330} python bench/time_to_first_step.py --template people \
        --quantize 4 --checkpointing "$@" >"$out/$name/stdout.log" 2>&1
    echo "$name [$vars] rc=$?"; tail -c 1200 "$out/$name/stdout.log"; echo
    echo "marker: $(cat /tmp/ttfs-mlx-kernels/dreambooth-wizard-warm-* 2>/dev/null)"
    grep -h "warm-up\|first block-by-block step" "$out/$name/train_stderr.log" | cut -c1-400
    tail -qn 4 /tmp/ttfs-run/home/logs/kernel-warmup*.log 2>/dev/null | cut -c1-250
    mkdir -p "$out/$name/warmup_logs"; cp /tmp/ttfs-run/home/logs/kernel-warmup* "$out/$name/warmup_logs/" 2>/dev/null
    # which kernels compiled when (MLX writes each one's .ptx when it is compiled)
    find /tmp/ttfs-mlx-kernels -name "*.ptx" -printf "%TT %s %f\n" 2>/dev/null | sort | cut -c1-160 \
        >"$out/$name/kernels_by_time.txt"
}

case $part in
blockwise)
    # gradient checkpointing as the block-by-block step (engine/blockwise_step.py, uncapped): 4-bit
    # (people's 8-GiB target) at depths 2 (the default), 1 and 3; bf16 with and without checkpointing
    # (the 1.5x reference, same card); people 4-bit on the whole-graph checkpoint, capped at the estimate
    bench_rows q4_ckpt ${FIRST_ROW_TIMEOUT:-300} --templates people pets style --quantize 4 --checkpointing on --steps 6
    bench_rows q4_ckpt_depth1 120 --templates people --quantize 4 --checkpointing on --steps 6 --switch BLOCKWISE_DEPTH=1
    bench_rows q4_ckpt_depth3 120 --templates people --quantize 4 --checkpointing on --steps 6 --switch BLOCKWISE_DEPTH=3
    bench_rows bf16 200 --templates people pets style --quantize none --checkpointing off on --steps 6
    bench_rows q4_ckpt_whole_graph 120 --templates people --quantize 4 --checkpointing on --steps 6 \
        --switch BLOCKWISE_CHECKPOINTING=0 --memory-limit estimate ;;
blockwise2)
    # the block-by-block step, 4-bit, checkpointed: one dense copy per layer in its backward (the
    # default) or two; where its peak is (forward or backward); depth 1; MLX's cap on top of it
    bench_rows q4_ckpt ${FIRST_ROW_TIMEOUT:-300} --templates people pets style --quantize 4 --checkpointing on --steps 6
    bench_rows q4_ckpt_dense_twice 100 --templates people --quantize 4 --checkpointing on --steps 6 \
        --switch BLOCKWISE_KEEPS_DENSE=0
    bench_rows q4_ckpt_phases 100 --templates people --quantize 4 --checkpointing on --steps 6 --phase-peaks
    bench_rows q4_ckpt_depth1 100 --templates people --quantize 4 --checkpointing on --steps 6 --switch BLOCKWISE_DEPTH=1
    bench_rows q4_ckpt_cap7.6 100 --templates people --quantize 4 --checkpointing on --steps 6 --memory-limit-gib 7.6
    bench_rows q4_ckpt_cap7.6_depth3 100 --templates people --quantize 4 --checkpointing on --steps 6 \
        --memory-limit-gib 7.6 --switch BLOCKWISE_DEPTH=3
    bench_rows bf16_people 100 --templates people --quantize none --checkpointing off --steps 6 ;;
peers)
    # the peers on this card: diffusers + peft (bf16), mflux 0.15.5 (4-bit) per template (120 s each:
    # its first process compiles MLX's kernels into MLX's default cache; run 14 cut it at 95 s)
    (cd .peers && timeout 200 python peer_diffusers_lora.py pets_r4 people_r8 2>&1 | tail -4)
    for template in pets_r4 people_r8 style_r16; do  # the peer script's names
        (cd .peers && QUANTS=4 timeout 120 python peer_mflux_step.py $template 2>&1 | tail -2)
    done ;;
check)
    # does the fused attention backward give pets' single-block LoRA the same gradients as ours?
    timeout 200 python bench/bisect_joint_ckpt.py --timeout 120 --variants "all:nockpt:randomB:pets" \
        "~FUSED_ATTENTION_BACKWARD:nockpt:randomB:pets" >/dev/null 2>&1
    python - "$out/bisect.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
if len(rows) == 2 and all(r.get("ok") for r in rows):
    a, b = (r["eager_grad_norms"] for r in rows)
    worst = max(abs(a[k] - b[k]) / (abs(b[k]) + 1e-12) for k in b)
    print(f"pets LoRA gradients, fused vs recomputed attention backward: worst relative difference {worst:.4f}")
else:
    print("pets gradient comparison did not finish:", [r.get("stderr_tail", "")[-200:] for r in rows])
PY
    style_rows ;;
bf16)
    # style's bf16 rows come from 'check' (same steps, same script)
    timeout 260 python bench/bench_train.py --templates ${TEMPLATES:-pets people} --quantize none --steps 7 | cut -c1-400
    (cd .peers && timeout 200 python peer_diffusers_lora.py pets_r4 people_r8 2>&1 | tail -4) ;;
q4)
    timeout 260 python bench/bench_train.py --templates ${TEMPLATES:-pets people style} --quantize 4 --steps 5 | cut -c1-400
    for template in pets_r4 people_r8 style_r16; do  # the peer script's names
        (cd .peers && QUANTS=4 timeout 120 python peer_mflux_step.py $template 2>&1 | tail -2)
    done ;;
ttfs_cold)
    # a user's first run on a fresh machine: MLX's kernel caches and the driver's emptied, every
    # kernel compiles (the random model is written first if missing: not timed, inside the timeout)
    rm -rf /tmp/mlx /tmp/ttfs-mlx-kernels ~/.nv/ComputeCache
    mkdir -p "$out/cold"
    OUT=$out/cold timeout ${COLD_TIMEOUT:-500} python bench/time_to_first_step.py --template people --quantize 4 \
        --checkpointing >"$out/cold/stdout.log" 2>&1
    echo "cold rc=$?"; tail -c 1500 "$out/cold/stdout.log"; echo
    grep -h "first block-by-block step" "$out/cold/train_stderr.log" ;;
ttfs_warm)
    # after ttfs_cold: the same run again (every kernel cached), five steps (the whole run's peak);
    # then twice with the driver's JIT cache raised to its 4 GiB maximum (the first fills it)
    for run in warm big_fill big_warm; do
        mkdir -p "$out/$run"
        [[ $run == big* ]] && export CUDA_CACHE_MAXSIZE=4294967296
        OUT=$out/$run timeout 130 python bench/time_to_first_step.py --template people --quantize 4 --checkpointing \
            --steps 5 >"$out/$run/stdout.log" 2>&1
        echo "$run rc=$?"; grep -o '"time_to_first_step_s": [0-9.]*\|"whole_run_peak_gib": [0-9.]*\|"kernel_cache_files": [0-9]*' \
            "$out/$run/ttfs.json" 2>/dev/null || tail -c 600 "$out/$run/stdout.log"
        grep -h "first block-by-block step\|first step" "$out/$run/train_stderr.log" | cut -c1-200
    done
    # the whole run's peak with a preview (the template's 25 steps at 512, then the VAE decode)
    # made after step 2: step 3's peak holds it
    mkdir -p "$out/preview"
    OUT=$out/preview timeout 150 python bench/time_to_first_step.py --template people --quantize 4 --checkpointing \
        --steps 3 --preview-every 2 >"$out/preview/stdout.log" 2>&1
    echo "preview rc=$?"; tail -c 700 "$out/preview/stdout.log" ;;
s15)
    # run 15: how MLX's CUDA backend groups kernels into CUDA graphs, against the people 4-bit
    # checkpointed step at depth 1 and 0 (NOTES item 33). MLX commits a graph every
    # MLX_MAX_OPS_PER_BUFFER ops (20), keeps MLX_CUDA_GRAPH_CACHE_SIZE instantiated graphs (100,
    # all dropped when full) and can launch without graphs (MLX_USE_CUDA_GRAPHS=0).
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    q4="--templates people --quantize 4 --checkpointing on --steps 6"
    env_rows d1 ${FIRST_ROW_TIMEOUT:-300} "" $q4
    env_rows d0 90 "" $q4 --switch BLOCKWISE_DEPTH=0
    env_rows d1_thrash 90 "MLX_ENABLE_CACHE_THRASHING_CHECK=1" $q4
    env_rows d0_ops5 90 "MLX_MAX_OPS_PER_BUFFER=5" $q4 --switch BLOCKWISE_DEPTH=0
    env_rows d0_ops10 90 "MLX_MAX_OPS_PER_BUFFER=10" $q4 --switch BLOCKWISE_DEPTH=0
    env_rows d0_cache 90 "MLX_CUDA_GRAPH_CACHE_SIZE=100000" $q4 --switch BLOCKWISE_DEPTH=0
    env_rows d0_nographs 90 "MLX_USE_CUDA_GRAPHS=0" $q4 --switch BLOCKWISE_DEPTH=0
    env_rows d1_cache 90 "MLX_CUDA_GRAPH_CACHE_SIZE=100000" $q4
    env_rows d1_nographs 90 "MLX_USE_CUDA_GRAPHS=0" $q4
    env_rows d1_ops60 90 "MLX_MAX_OPS_PER_BUFFER=60 MLX_CUDA_GRAPH_CACHE_SIZE=100000" $q4
    env_rows d0_bfs1 90 "MLX_BFS_MAX_WIDTH=1" $q4 --switch BLOCKWISE_DEPTH=0
    env_rows d1_bfs1 90 "MLX_BFS_MAX_WIDTH=1" $q4 ;;
s15b)
    # run 15, second part: bf16 references alone (pets, then people), the same with a large graph
    # cache; two dense copies on the current queue order; combinations; the whole run with a preview
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    q4="--templates people --quantize 4 --checkpointing on --steps 6"
    env_rows bf16_pets 150 "" --templates pets --quantize none --checkpointing off --steps 6
    env_rows bf16_people 90 "" --templates people --quantize none --checkpointing off --steps 6
    env_rows bf16_pets_cache 90 "MLX_CUDA_GRAPH_CACHE_SIZE=100000" --templates pets --quantize none --checkpointing off --steps 6
    env_rows bf16_people_cache 90 "MLX_CUDA_GRAPH_CACHE_SIZE=100000" --templates people --quantize none --checkpointing off --steps 6
    env_rows d1_dense_twice 90 "" $q4 --switch BLOCKWISE_KEEPS_DENSE=0
    env_rows d0_ops5_cache 90 "MLX_MAX_OPS_PER_BUFFER=5 MLX_CUDA_GRAPH_CACHE_SIZE=100000" $q4 --switch BLOCKWISE_DEPTH=0
    env_rows d1_ops10_cache 90 "MLX_MAX_OPS_PER_BUFFER=10 MLX_CUDA_GRAPH_CACHE_SIZE=100000" $q4
    env_rows d1_again 90 "" $q4
    mkdir -p "$out/preview"
    OUT=$out/preview timeout 170 python bench/time_to_first_step.py --template people --quantize 4 --checkpointing \
        --steps 3 --preview-every 2 >"$out/preview/stdout.log" 2>&1
    echo "preview rc=$?"; tail -c 700 "$out/preview/stdout.log" ;;
s15c)
    # run 15, third part, on a fresh machine: time to first step with the kernel warm-up
    # (engine/kernel_warmup.py); rows at the new CUDA-graph defaults; then the same first run without
    # the warm-up, every cache emptied again (the baseline, on the same machine)
    cold_run cold_warmup ""
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    env_rows d0_default 90 "" --templates people --quantize 4 --checkpointing on --steps 6 --switch BLOCKWISE_DEPTH=0
    env_rows bf16_people_default 90 "MLX_ENABLE_CACHE_THRASHING_CHECK=1" --templates people --quantize none \
        --checkpointing off --steps 6
    unset MLX_PTX_CACHE_DIR
    COLD_TIMEOUT=${BASELINE_TIMEOUT:-240} cold_run cold_baseline "DREAMBOOTH_WIZARD_KERNEL_WARMUP=0" ;;
s16)
    # the next session, on a fresh machine: a first run with the warm-up and its two helpers (the
    # backward's kernels, the encoders'), the backward split at depth 1 against the default (A/B/A),
    # then a first run without any warm-up (the baseline, same machine)
    cold_run cold_warmup ""
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    q4="--templates people --quantize 4 --checkpointing on --steps 6"
    env_rows d1 90 "" $q4
    env_rows d1_split 90 "" $q4 --switch BLOCKWISE_SPLIT_BACKWARD=1
    env_rows d1_again 90 "" $q4
    env_rows d1_split_again 90 "" $q4 --switch BLOCKWISE_SPLIT_BACKWARD=1
    unset MLX_PTX_CACHE_DIR
    COLD_TIMEOUT=${BASELINE_TIMEOUT:-240} cold_run cold_baseline "DREAMBOOTH_WIZARD_KERNEL_WARMUP=0" ;;
s17)
    # run 16: a machine's first run with the warm-up shared over processes (each its share of the
    # step's stage functions, one per encoder, started before the model loads); the backward split at
    # depth 1 against the default, A/B/A (single rows vary ~10% between processes)
    nproc; cold_run cold_shared ""
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    q4="--templates people --quantize 4 --checkpointing on --steps 6"
    env_rows d1 90 "" $q4
    env_rows d1_split 90 "" $q4 --switch BLOCKWISE_SPLIT_BACKWARD=1
    env_rows d1_again 90 "" $q4
    env_rows d1_split_again 90 "" $q4 --switch BLOCKWISE_SPLIT_BACKWARD=1 ;;
s17b)
    # run 16, after s17: the shared warm-up's first run again (caches emptied), the next run (every
    # kernel cached; then with the driver's PTX cache off: is the warm first step's 9-13 s forward the
    # driver compiling MLX's cached PTX again?), the first-call probe; with BASELINE=1 a first run
    # without any warm-up
    cold_run cold_shared_again ""
    du -sh ~/.nv/ComputeCache 2>&1; env | grep "^CUDA_CACHE" || echo "no CUDA_CACHE_* set"
    for run in warm warm_no_driver_cache; do
        mkdir -p "$out/$run"
        OUT=$out/$run env $([[ $run == warm ]] || echo CUDA_CACHE_DISABLE=1) timeout 150 \
            python bench/time_to_first_step.py --template people --quantize 4 --checkpointing >"$out/$run/stdout.log" 2>&1
        echo "$run rc=$?"; grep -o '"time_to_first_step_s": [0-9.]*' "$out/$run/ttfs.json"
        grep -h "first block-by-block step" "$out/$run/train_stderr.log" | cut -c1-250
    done
    # what a process pays the first time it runs an op at a shape, kernels cached: with cuDNN's
    # attention, then without
    OUT=$out timeout 120 python bench/probe_first_calls.py
    OUT=$out MLX_CUDA_USE_CUDNN_SDPA=0 timeout 120 python bench/probe_first_calls.py
    [[ -n ${BASELINE:-} ]] && COLD_TIMEOUT=${BASELINE_TIMEOUT:-240} cold_run cold_baseline "DREAMBOOTH_WIZARD_KERNEL_WARMUP=0" ;;
s17c)
    # run 16, third part: a first run with CLIP's quantized linears dequantizing (no MLX qmm kernel,
    # ~40 s of NVRTC) and the first step's slowest stages logged; then the next (warm) run
    cold_run cold_min_rows ""
    mkdir -p "$out/warm"
    OUT=$out/warm timeout 150 python bench/time_to_first_step.py --template people --quantize 4 --checkpointing \
        >"$out/warm/stdout.log" 2>&1
    echo "warm rc=$?"; grep -o '"time_to_first_step_s": [0-9.]*' "$out/warm/ttfs.json"
    grep -h "first block-by-block step" "$out/warm/train_stderr.log" | cut -c1-400 ;;
s17d)
    # run 16, fourth part: the dequantize kernel with the shape at run time (one compile per dtype, bits
    # and group size) against MLX's dequantize; a first run, the next run; the people rows (4-bit
    # checkpointed, bf16) for its speed
    python - <<'PY'
import mlx.core as mx
from engine.flux.quantized import dequantize
for rows, columns in ((3072, 64), (3072, 3072), (12288, 3072), (3072, 15360), (64, 4096), (5, 320)):
    weight = (mx.random.normal((rows, columns)) * 0.05).astype(mx.bfloat16)
    for bits in (4, 8):
        wq, scales, biases = mx.quantize(weight, 64 if columns % 64 == 0 else 32, bits)
        group = 64 if columns % 64 == 0 else 32
        same = mx.array_equal(dequantize(wq, scales, biases, group, bits, "affine"), mx.dequantize(wq, scales, biases, group, bits))
        print("dequantize", rows, columns, bits, "equal" if same.item() else "DIFFERENT")
PY
    cold_run cold_generic_dequantize ""
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    mkdir -p "$out/warm"
    OUT=$out/warm timeout 150 python bench/time_to_first_step.py --template people --quantize 4 --checkpointing \
        >"$out/warm/stdout.log" 2>&1
    echo "warm rc=$?"; grep -o '"time_to_first_step_s": [0-9.]*' "$out/warm/ttfs.json"
    grep -h "first block-by-block step" "$out/warm/train_stderr.log" | cut -c1-400
    q4="--templates people --quantize 4 --checkpointing on --steps 6"
    env_rows d1 90 "" $q4
    env_rows bf16_people 90 "" --templates people --quantize none --checkpointing off --steps 6 ;;
s17e)
    # run 16, fifth part: the people first run again; pets' first run at its template's own setting
    # (4-bit, no checkpointing: the one-graph step, whose kernels one warm-up process compiles)
    cold_run cold_people_again ""
    rm -rf /tmp/mlx /tmp/ttfs-mlx-kernels ~/.nv/ComputeCache
    mkdir -p "$out/cold_pets"
    OUT=$out/cold_pets timeout 330 python bench/time_to_first_step.py --template pets --quantize 4 \
        >"$out/cold_pets/stdout.log" 2>&1
    echo "cold_pets rc=$?"; tail -c 900 "$out/cold_pets/stdout.log"; echo
    tail -qn 3 /tmp/ttfs-run/home/logs/kernel-warmup*.log 2>/dev/null | cut -c1-300 ;;
s17f)
    # run 16, sixth part: pets' first run with the block-by-block step's shares compiled beside its
    # one-graph warm-up process
    rm -rf /tmp/mlx /tmp/ttfs-mlx-kernels ~/.nv/ComputeCache
    mkdir -p "$out/cold_pets_shares"
    OUT=$out/cold_pets_shares timeout ${COLD_TIMEOUT:-170} python bench/time_to_first_step.py --template pets --quantize 4 \
        >"$out/cold_pets_shares/stdout.log" 2>&1
    echo "cold_pets_shares rc=$?"; tail -c 1200 "$out/cold_pets_shares/stdout.log"; echo
    tail -qn 2 /tmp/ttfs-run/home/logs/kernel-warmup*.log 2>/dev/null | cut -c1-300
    mkdir -p "$out/cold_pets_shares/warmup_logs"; cp /tmp/ttfs-run/home/logs/kernel-warmup* "$out/cold_pets_shares/warmup_logs/" ;;
s18)
    # run 17: how far the host runs ahead, counted in kernels rather than stages. MLX lets at most 10
    # counted CUDA graphs (one every MLX_MAX_OPS_PER_BUFFER kernels) be in flight before the host
    # waits, and keeps every buffer a graph reads until that graph has run. So with small graphs and
    # no wait between stages (depth 1000) the host stays ~10 graphs ahead of the GPU: the buffers of
    # ~50 kernels held, not of one or two whole stages. The first run fills the kernel cache. First,
    # the LoRA and RoPE kernels that now read their shapes at run time, against MLX's routes (pytest
    # from .pytestpkgs, carried: the device has no package index)
    PYTHONPATH=$PYTHONPATH:$root/.pytestpkgs timeout 240 python -m pytest -q -p no:cacheprovider tests/test_lora_kernels.py \
        2>&1 | tail -5
    cold_run cold ""
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    q4="--templates people --quantize 4 --checkpointing on --steps 6"
    env_rows k_default 150 "" $q4 --depths 1 1000 0
    env_rows k5 110 "MLX_MAX_OPS_PER_BUFFER=5 MLX_CUDA_GRAPH_CACHE_SIZE=4096" $q4 --depths 1000 1 0
    # a LoRA layer as autodiff of its base and LoRA apart (before: one input-sized tensor more per layer)
    env_rows unfused 80 "" $q4 --depths 1 --switch LORA_FUSED_LINEAR=0
    env_rows bf16_people 90 "" --templates people --quantize none --checkpointing off --steps 6
    env_rows k10 100 "MLX_MAX_OPS_PER_BUFFER=10 MLX_CUDA_GRAPH_CACHE_SIZE=4096" $q4 --depths 1000 1
    # is the step held by the host or by the GPU? kernels seen by CUPTI: GPU busy time against wall time
    OUT=$out timeout 150 python bench/profile_step.py --steps 4 --variants people-q4-ckpt@none \
        people-q4-ckpt+BLOCKWISE_DEPTH=1000@none people-bf16-profiled >"$out/profile.log" 2>&1
    echo "profile rc=$?"; grep -E '^\{"template|wall_s|gpu_busy|kernels_per_step|idle_ms' "$out/profile.log" | cut -c1-300 ;;
s18b)
    # run 17, second call: the step without a bound by stages (depth -1) now keeps no stage's outputs
    # but the last; 5 kernels a graph (the bench sets MLX's graph cache to 4096 with it, as the
    # trainer does). Most important first (a cut call keeps what it measured): people's whole run at
    # depth -1 through the trainer, every template at -1, depth 1 and bf16 rows, the whole run at 1
    PYTHONPATH=$PYTHONPATH:$root/.pytestpkgs timeout 60 python -m pytest -q -p no:cacheprovider --tb=line \
        tests/test_lora_kernels.py -k "fused_lora_layer or joint_attention_trains" 2>&1 | tail -4
    cold_run cold ""
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    warm_run() {
        local depth=$1
        mkdir -p "$out/warm_$depth"
        OUT=$out/warm_$depth DREAMBOOTH_WIZARD_BLOCKWISE_DEPTH=$depth timeout 100 python bench/time_to_first_step.py \
            --template people --quantize 4 --checkpointing --steps 5 >"$out/warm_$depth/stdout.log" 2>&1
        echo "warm depth $depth rc=$?"; grep -o '"time_to_first_step_s": [0-9.]*\|"whole_run_peak_gib": [0-9.]*' "$out/warm_$depth/ttfs.json"
        grep -h "CUDA graph settings\|first block-by-block" "$out/warm_$depth/train_stderr.log" | cut -c1-200
    }
    warm_run -1
    q4="--quantize 4 --checkpointing on --steps 6"
    env_rows unbounded_k5 90 "" --templates people $q4 --depths -1
    env_rows bf16_people 90 "" --templates people --quantize none --checkpointing off --steps 6
    env_rows d1 90 "" --templates people $q4 --depths 1
    # the route a user's people run takes (750 steps: too few to win back our kernels' compile)
    env_rows fallback_unbounded 90 "" --templates people $q4 --depths -1 --switch LORA_KERNELS=0 --switch ROPE_KERNEL=0
    env_rows unbounded_k5_pets_style 90 "" --templates pets style $q4 --depths -1
    warm_run 1 ;;
s18c)
    # run 18, a second call on the warm machine after s18b: the kernel-less route at depth 1 and for
    # bf16 (a user's 750-step run either way), then what our CUDA kernels cost a process to compile
    # (speed.KERNEL_COMPILE_S: measured before they read their shapes at run time)
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    off="--switch LORA_KERNELS=0 --switch ROPE_KERNEL=0"
    env_rows fallback_d1 90 "" --templates people --quantize 4 --checkpointing on --steps 6 --depths 1 $off
    env_rows fallback_bf16 90 "" --templates people --quantize none --checkpointing off --steps 6 $off
    OUT=$out timeout 300 python bench/probe_first_step.py --variants all all ~LORA_KERNELS ~ROPE_KERNEL \
        --checkpointing --timeout 70 2>&1 | cut -c1-400 ;;
s18d)
    # run 18, after CUDA's default became -1 (nothing set): a machine's first people run through the
    # trainer (time to first step, whole-run peak, the graph settings it chose), people's step at the
    # default against bf16, both on MLX's routes (a 750-step run), A/B/A/B; each of our kernels on and
    # off (speed.KERNEL_SAVING_S_PER_STEP; s18c timed their compile); the next run last
    cold_run cold ""
    grep -h "CUDA graph settings" "$out/cold/train_stderr.log" | cut -c1-200
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    off="--switch LORA_KERNELS=0 --switch ROPE_KERNEL=0"
    for round in 1 2; do
        env_rows default_people_$round 90 "" --templates people --quantize 4 --checkpointing on --steps 8 $off
        env_rows bf16_people_$round 90 "" --templates people --quantize none --checkpointing off --steps 8 $off
    done
    bf16="--templates people --quantize none --checkpointing off --steps 8"
    env_rows bf16_kernels 90 "" $bf16
    env_rows bf16_no_lora_kernels 90 "" $bf16 --switch LORA_KERNELS=0
    env_rows bf16_no_rope_kernel 90 "" $bf16 --switch ROPE_KERNEL=0
    env_rows default_people_kernels 90 "" --templates people --quantize 4 --checkpointing on --steps 8
    mkdir -p "$out/warm"
    OUT=$out/warm timeout 100 python bench/time_to_first_step.py --template people --quantize 4 --checkpointing \
        --steps 5 >"$out/warm/stdout.log" 2>&1
    echo "warm rc=$?"; grep -o '"time_to_first_step_s": [0-9.]*\|"whole_run_peak_gib": [0-9.]*' "$out/warm/ttfs.json" ;;
s18e)
    # s18d's first part alone, for a call with little device time left: a machine's first people run at
    # CUDA's default with nothing set (the depth and graph settings the trainer chose, the whole-run
    # peak), then people's step at the default against bf16, both on MLX's routes
    cold_run cold ""
    grep -h "CUDA graph settings" "$out/cold/train_stderr.log" | cut -c1-200
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    off="--switch LORA_KERNELS=0 --switch ROPE_KERNEL=0"
    env_rows default_people 60 "" --templates people --quantize 4 --checkpointing on --steps 8 $off
    env_rows bf16_people 60 "" --templates people --quantize none --checkpointing off --steps 8 $off ;;
s19)
    # run 19: LoRA's compute copies (speed.LORA_COMPUTE_COPIES, NOTES item 42) on and off, people 4-bit
    # checkpointed at CUDA's default and people bf16 without checkpointing, both on MLX's routes (what a
    # 750-step run takes), alternating; then where each step's time goes (CUPTI: GPU busy against wall)
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    off="--switch LORA_KERNELS=0 --switch ROPE_KERNEL=0"
    people4="--templates people --quantize 4 --checkpointing on --steps 10"
    bf16="--templates people --quantize none --checkpointing off --steps 10"
    env_rows q4_copies_0 ${FIRST_ROW_TIMEOUT:-200} "" $people4 $off
    for round in 1 2; do
        env_rows q4_nocopies_$round 80 "" $people4 $off --switch LORA_COMPUTE_COPIES=0
        env_rows q4_copies_$round 80 "" $people4 $off
        env_rows bf16_nocopies_$round 80 "" $bf16 $off --switch LORA_COMPUTE_COPIES=0
        env_rows bf16_copies_$round 80 "" $bf16 $off
    done
    # the graph settings the trainer sets at depth -1 (speed.configure_cuda_graphs), by hand: profile_step
    # does not set them
    profile_rows q4 "MLX_MAX_OPS_PER_BUFFER=5 MLX_CUDA_GRAPH_CACHE_SIZE=4096" "people-q4-ckpt+LORA_KERNELS=0,ROPE_KERNEL=0@none"
    profile_rows bf16 "" "people-bf16-profiled+LORA_KERNELS=0,ROPE_KERNEL=0" ;;
s20)
    # run 20: the host's share of people's checkpointed 4-bit step (NOTES item 44). This commit (stage
    # parameters gathered by parameter_tree, the update fed a flat list) against OLD_ROOT's commit, A/B/A/B;
    # MLX's graph cut by bytes (MLX_MAX_MB_PER_BUFFER) and launching without graphs at depth -1; RoPE's
    # kernel alone (its policy); bf16 references between. MLX's routes, as a 750-step run takes them
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    people4=$PEOPLE4 bf16=$PEOPLE_BF16 off=$ROUTES_750
    env_rows q4_new_1 ${FIRST_ROW_TIMEOUT:-200} "" $people4 $off
    env_rows bf16_1 80 "" $bf16 $off
    for round in 1 2; do
        [ -n "${OLD_ROOT:-}" ] && ROW_ROOT=$OLD_ROOT env_rows q4_old_$round 80 "" $people4 $off
        env_rows q4_new_$((round + 1)) 80 "" $people4 $off
    done
    for ops in 30 10; do
        for mb in 50 100 200; do
            env_rows q4_ops${ops}_mb$mb 80 "MLX_MAX_OPS_PER_BUFFER=$ops MLX_MAX_MB_PER_BUFFER=$mb" $people4 $off
        done
    done
    env_rows q4_ops5_mb50 80 "MLX_MAX_MB_PER_BUFFER=50" $people4 $off
    env_rows bf16_2 80 "" $bf16 $off
    env_rows q4_nographs_ops5 80 "MLX_USE_CUDA_GRAPHS=0" $people4 $off
    env_rows q4_nographs_ops20 80 "MLX_USE_CUDA_GRAPHS=0 MLX_MAX_OPS_PER_BUFFER=20" $people4 $off
    env_rows q4_rope_kernel 80 "" $people4 --switch LORA_KERNELS=0
    env_rows bf16_rope_kernel 80 "" $bf16 --switch LORA_KERNELS=0
    env_rows q4_new_4 80 "" $people4 $off
    env_rows bf16_3 80 "" $bf16 $off
    profile_rows q4 "MLX_MAX_OPS_PER_BUFFER=5 MLX_CUDA_GRAPH_CACHE_SIZE=4096" "people-q4-ckpt+LORA_KERNELS=0,ROPE_KERNEL=0@none" ;;
s21)
    # run 21: CUDA's graphs at depth -1 cut at 10 kernels or 40 MB (the default since run 20, NOTES item 45)
    # against run 19's 5 kernels, also with LoRA's compute copies, and bf16, in four rounds: on run 20's
    # machine the processes spread 40%, so rounds, not rows
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    five="MLX_MAX_OPS_PER_BUFFER=5 MLX_MAX_MB_PER_BUFFER=400"
    env_rows d_0 ${FIRST_ROW_TIMEOUT:-200} "" $PEOPLE4 $ROUTES_750
    for round in $(seq 1 ${ROUNDS:-4}); do
        env_rows d_$round 80 "" $PEOPLE4 $ROUTES_750
        env_rows k5_$round 80 "$five" $PEOPLE4 $ROUTES_750
        # LoRA's compute copies (1260 operations fewer, item 42) where the graphs are cut by bytes, which
        # may keep the run-ahead's memory from growing as it did with 5-kernel graphs (+0.19 GiB)
        env_rows d_copies_$round 80 "" $PEOPLE4 $ROUTES_750 --switch LORA_COMPUTE_COPIES=1
        # the process on four cores: is run 20's spread between processes where the host's threads land?
        ROW_PREFIX="taskset -c 0-3" env_rows d_pinned_$round 80 "" $PEOPLE4 $ROUTES_750
        env_rows bf16_$round 80 "" $PEOPLE_BF16 $ROUTES_750
    done ;;
s22)
    # run 22: this session's kernels fewer (RoPE as one fused kernel each way, LoRA's scale inside its
    # casts: NOTES item 49) against OLD_ROOT's commit (the engine before them, 2ebcdf0), people 4-bit
    # checkpointed and bf16, rounds FIRST_ROUND..ROUNDS (1..3), MLX's routes as a 750-step run takes
    # them, and our RoPE kernel against the fused route (is it still worth compiling?
    # speed.KERNEL_SAVING_S_PER_STEP). Round 1 starts with the CUDA tests of the changed routes and a
    # warm-up row of each tree. Read with python bench/read_rounds.py bench/raw/run22/s22 --against bf16
    # (and --against q4_old, --against bf16_old)
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    if [ "${FIRST_ROUND:-1}" = 1 ]; then
        PYTHONPATH=$PYTHONPATH:$root/.pytestpkgs timeout 150 python -m pytest -q -p no:cacheprovider --tb=short \
            tests/test_rope.py tests/test_lora_kernels.py 2>&1 | tail -6
        env_rows q4_0 ${FIRST_ROW_TIMEOUT:-200} "" $PEOPLE4 $ROUTES_750
        [ -n "${OLD_ROOT:-}" ] && ROW_ROOT=$OLD_ROOT env_rows q4_old_0 ${FIRST_ROW_TIMEOUT:-200} "" $PEOPLE4 $ROUTES_750
    fi
    for round in $(seq ${FIRST_ROUND:-1} ${ROUNDS:-3}); do
        env_rows q4_$round 80 "" $PEOPLE4 $ROUTES_750
        [ -n "${OLD_ROOT:-}" ] && ROW_ROOT=$OLD_ROOT env_rows q4_old_$round 80 "" $PEOPLE4 $ROUTES_750
        env_rows bf16_$round 80 "" $PEOPLE_BF16 $ROUTES_750
        [ -n "${OLD_ROOT:-}" ] && ROW_ROOT=$OLD_ROOT env_rows bf16_old_$round 80 "" $PEOPLE_BF16 $ROUTES_750
        env_rows q4_ropek_$round 80 "" $PEOPLE4 --switch LORA_KERNELS=0
        env_rows bf16_ropek_$round 80 "" $PEOPLE_BF16 --switch LORA_KERNELS=0
    done ;;
s22p)
    # run 22, after s22: where each row of the ratio waits for the host (CUPTI idle gaps, profile_step.py),
    # this commit, MLX's routes; the trainer's CUDA-graph settings for the 4-bit step given by hand
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    graphs="MLX_MAX_OPS_PER_BUFFER=10 MLX_MAX_MB_PER_BUFFER=40 MLX_CUDA_GRAPH_CACHE_SIZE=4096"
    profile_rows q4 "$graphs" "people-q4-ckpt+LORA_KERNELS=0,ROPE_KERNEL=0@none"
    profile_rows bf16 "" "people-bf16-profiled+LORA_KERNELS=0,ROPE_KERNEL=0" ;;
s23)
    # run 23: each backward stage's adapter gradients queued first (speed.BLOCKWISE_GRADS_FIRST, NOTES item 51)
    # against the default, people 4-bit checkpointed on MLX's routes, with bf16 beside, rounds
    # FIRST_ROUND..ROUNDS (1..3); then both 4-bit variants profiled with the host's ranges (which host work
    # the GPU waited on). Read with python bench/read_rounds.py bench/raw/run23/s23 --against bf16
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    [ "${FIRST_ROUND:-1}" = 1 ] && env_rows q4_0 ${FIRST_ROW_TIMEOUT:-200} "" $PEOPLE4 $ROUTES_750
    for round in $(seq ${FIRST_ROUND:-1} ${ROUNDS:-3}); do
        env_rows q4_$round 80 "" $PEOPLE4 $ROUTES_750
        env_rows q4_gf_$round 80 "" $PEOPLE4 $ROUTES_750 --switch BLOCKWISE_GRADS_FIRST=1
        env_rows bf16_$round 80 "" $PEOPLE_BF16 $ROUTES_750
    done
    graphs="MLX_MAX_OPS_PER_BUFFER=10 MLX_MAX_MB_PER_BUFFER=40 MLX_CUDA_GRAPH_CACHE_SIZE=4096"  # the trainer's, by hand
    [ -n "${PROFILES:-1}" ] && [ "${PROFILES:-1}" != 0 ] && {
        profile_rows q4 "$graphs" "people-q4-ckpt+LORA_KERNELS=0,ROPE_KERNEL=0@none"
        profile_rows q4_gf "$graphs" "people-q4-ckpt+LORA_KERNELS=0,ROPE_KERNEL=0,BLOCKWISE_GRADS_FIRST=1@none"
    } ;;
s24)
    # run 24: each backward stage updating its own adapters (speed.BLOCKWISE_UPDATE_IN_BACKWARD, NOTES item 53)
    # against the one update at the step's end (=0), and with BLOCKWISE_GRADS_FIRST on top, people 4-bit
    # checkpointed on MLX's routes, bf16 beside, rounds FIRST_ROUND..ROUNDS (1..3). Round 1 starts with the
    # CUDA tests of the block-by-block step (the split update to the bit there too) and a warm-up row. Then,
    # PROFILES=1, the new step profiled with the host's ranges. Read with
    # python bench/read_rounds.py bench/raw/run24/s24 --against bf16
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    if [ "${FIRST_ROUND:-1}" = 1 ]; then
        PYTHONPATH=$PYTHONPATH:$root/.pytestpkgs timeout ${TEST_TIMEOUT:-150} python -m pytest -q -p no:cacheprovider \
            --tb=short tests/test_blockwise_step.py -k "updates_inside or resumed or trains_as_the_whole" 2>&1 | tail -6
        env_rows q4_0 ${FIRST_ROW_TIMEOUT:-200} "" $PEOPLE4 $ROUTES_750
    fi
    for round in $(seq ${FIRST_ROUND:-1} ${ROUNDS:-3}); do
        env_rows q4_$round 80 "" $PEOPLE4 $ROUTES_750
        env_rows q4_whole_$round 80 "" $PEOPLE4 $ROUTES_750 --switch BLOCKWISE_UPDATE_IN_BACKWARD=0
        env_rows q4_gf_$round 80 "" $PEOPLE4 $ROUTES_750 --switch BLOCKWISE_GRADS_FIRST=1
        env_rows bf16_$round 80 "" $PEOPLE_BF16 $ROUTES_750
    done
    graphs="MLX_MAX_OPS_PER_BUFFER=10 MLX_MAX_MB_PER_BUFFER=40 MLX_CUDA_GRAPH_CACHE_SIZE=4096"  # the trainer's, by hand
    [ "${PROFILES:-0}" != 0 ] && profile_rows q4 "$graphs" "people-q4-ckpt+LORA_KERNELS=0,ROPE_KERNEL=0@none"
    true ;;
s25)
    # run 25: BLOCKWISE_GRADS_FIRST on top of the updates inside the backward stages (item 53), and forward
    # stages three to a compiled call (BLOCKWISE_FORWARD_GROUP=3, commit cc78f85; removed after this run,
    # which found it no faster: NOTES item 54; its rows are comments below). Since run 25 GRADS_FIRST is the
    # default, so q4_N and q4_gf_N are the same setting (a check of the machine's spread): people 4-bit checkpointed on
    # MLX's routes, bf16 beside, rounds FIRST_ROUND..ROUNDS (1..4), a warm-up row first. Then (PROFILES=1)
    # both together and the default profiled with the host's time (profile_step.py: host_time: the step's
    # ranges, the CUDA API calls, a queueing's time to its first graph launch); PROFILES=2 bf16 too.
    # Read with python bench/read_rounds.py bench/raw/run25/s25 --against bf16
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    [ "${FIRST_ROUND:-1}" = 1 ] && env_rows q4_0 ${FIRST_ROW_TIMEOUT:-200} "" $PEOPLE4 $ROUTES_750
    for round in $(seq ${FIRST_ROUND:-1} ${ROUNDS:-4}); do
        env_rows q4_$round 80 "" $PEOPLE4 $ROUTES_750
        env_rows q4_gf_$round 80 "" $PEOPLE4 $ROUTES_750 --switch BLOCKWISE_GRADS_FIRST=1
        # run 25 also ran q4_g3_N and q4_g3gf_N here (--switch BLOCKWISE_FORWARD_GROUP=3, alone and with the
        # gradients first), at commit cc78f85
        env_rows bf16_$round 80 "" $PEOPLE_BF16 $ROUTES_750
    done
    graphs="MLX_MAX_OPS_PER_BUFFER=10 MLX_MAX_MB_PER_BUFFER=40 MLX_CUDA_GRAPH_CACHE_SIZE=4096"  # the trainer's, by hand
    [ "${PROFILES:-0}" != 0 ] && {
        profile_rows q4_gf "$graphs" "people-q4-ckpt+LORA_KERNELS=0,ROPE_KERNEL=0,BLOCKWISE_GRADS_FIRST=1@none"  # run 25: q4_g3gf, with BLOCKWISE_FORWARD_GROUP=3
        profile_rows q4 "$graphs" "people-q4-ckpt+LORA_KERNELS=0,ROPE_KERNEL=0@none"
        [ "${PROFILES}" = 2 ] && profile_rows bf16 "" "people-bf16-profiled+LORA_KERNELS=0,ROPE_KERNEL=0"
    }
    true ;;
s26)
    # (for the next session) the host's cost per CUDA graph: people 4-bit checkpointed with 20 and 30 kernels
    # a graph (MLX_MAX_OPS_PER_BUFFER; 40 MB kept) against the default 10, bf16 beside, rounds
    # FIRST_ROUND..ROUNDS (1..3), a warm-up row first; PROFILES=1: the default and 20 profiled with the host's
    # time (NOTES item 54: 955 graph launches a step, ~36 us each under the profiler). Read with
    # python bench/read_rounds.py bench/raw/runNN/s26 --against bf16
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    [ "${FIRST_ROUND:-1}" = 1 ] && env_rows q4_0 ${FIRST_ROW_TIMEOUT:-200} "" $PEOPLE4 $ROUTES_750
    for round in $(seq ${FIRST_ROUND:-1} ${ROUNDS:-3}); do
        env_rows q4_$round 80 "" $PEOPLE4 $ROUTES_750
        env_rows q4_o20_$round 80 "MLX_MAX_OPS_PER_BUFFER=20" $PEOPLE4 $ROUTES_750
        env_rows q4_o30_$round 80 "MLX_MAX_OPS_PER_BUFFER=30" $PEOPLE4 $ROUTES_750
        env_rows bf16_$round 80 "" $PEOPLE_BF16 $ROUTES_750
    done
    [ "${PROFILES:-0}" != 0 ] && {
        profile_rows q4 "MLX_MAX_OPS_PER_BUFFER=10 MLX_MAX_MB_PER_BUFFER=40 MLX_CUDA_GRAPH_CACHE_SIZE=4096" \
            "people-q4-ckpt+LORA_KERNELS=0,ROPE_KERNEL=0@none"
        profile_rows q4_o20 "MLX_MAX_OPS_PER_BUFFER=20 MLX_MAX_MB_PER_BUFFER=40 MLX_CUDA_GRAPH_CACHE_SIZE=4096" \
            "people-q4-ckpt+LORA_KERNELS=0,ROPE_KERNEL=0@none"
    }
    true ;;
s27)
    # run 27: a machine's first run (cold_run: every kernel cache emptied) with the stages' update kernels
    # compiled first in the join's share of the warm-up, then (OLD_ROOT: a checkout of 2f64be3) without,
    # each with its warm-up's logs and kernels by time. Run 26 (an H100): 70.3 and 71.8 s, the two trained
    # single-block backward parts 64-68 s against 30-38 s for every other part. Then people 4-bit checkpointed
    # against bf16 on MLX's routes, rounds FIRST_ROUND..ROUNDS (1..4). Read the rounds with
    # python bench/read_rounds.py bench/raw/run27/s27 --against bf16
    cold_run cold ""
    [ -n "${OLD_ROOT:-}" ] && (cd "$OLD_ROOT" && export PYTHONPATH=/tmp/site:$OLD_ROOT && cold_run cold_old "")
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    for round in $(seq ${FIRST_ROUND:-1} ${ROUNDS:-4}); do
        env_rows q4_$round $([ $round = 1 ] && echo 200 || echo 80) "" $PEOPLE4 $ROUTES_750
        env_rows bf16_$round $([ $round = 1 ] && echo 200 || echo 80) "" $PEOPLE_BF16 $ROUTES_750
    done ;;
s29)
    # run 29: a machine's first run training uncompiled while the warm-up compiles (speed.TRAIN_WHILE_COMPILING,
    # NOTES item 56): the first step once the transformer has loaded, the compiled step from the step after the
    # warm-up ends (phases' kernels_ready), whole-run peak over both (--compiled-steps); then the same commit
    # waiting for the warm-up (the update kernels in the join's share, item 55's fix, alone), then its next run
    # with every cache kept, then OLD_ROOT's first run (a checkout of 2f64be3: neither), then pets' first run.
    # Run 26 (an H100): 70.3 s
    cold_run cold "" --epochs 200 --compiled-steps 5
    cold_run cold_wait "DREAMBOOTH_WIZARD_TRAIN_WHILE_COMPILING=0" --epochs 200 --compiled-steps 5
    mkdir -p "$out/next"  # this commit's next run: its caches as cold_wait left them
    OUT=$out/next timeout 150 python bench/time_to_first_step.py --template people --quantize 4 --checkpointing \
        --epochs 200 --steps 5 >"$out/next/stdout.log" 2>&1
    echo "next rc=$?"; tail -c 600 "$out/next/stdout.log"; echo
    [ -n "${OLD_ROOT:-}" ] && (cd "$OLD_ROOT" && export PYTHONPATH=/tmp/site:$OLD_ROOT && cold_run cold_old "")
    # pets at its own setting (4-bit, no checkpointing: its uncompiled steps are the block-by-block step's)
    rm -rf /tmp/mlx /tmp/ttfs-mlx-kernels ~/.nv/ComputeCache
    mkdir -p "$out/cold_pets"
    OUT=$out/cold_pets timeout ${COLD_TIMEOUT:-330} python bench/time_to_first_step.py --template pets --quantize 4 \
        --epochs 200 --compiled-steps 5 >"$out/cold_pets/stdout.log" 2>&1
    echo "cold_pets rc=$?"; tail -c 800 "$out/cold_pets/stdout.log"; echo
    # an uncompiled step in steady state, people 4-bit checkpointed (its speed and peak), then pets'
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    env_rows q4_uncompiled 120 "" $PEOPLE4 $ROUTES_750 --uncompiled
    env_rows pets_q4_uncompiled 120 "" --templates pets --quantize 4 --checkpointing off --steps 10 $ROUTES_750 --uncompiled ;;
s28)
    # NOTES items 55 and 57: a single block's q, k, v and MLP input as one 4-bit product against four, each
    # with its LoRA, the adapters' first products as one too. First the probe (bench/probe_fused_inputs.py: forward and backward as a checkpointed
    # backward stage runs them, seconds a call with the host's share, rank 8 and 4), then the step itself
    # (speed.FUSED_SINGLE_INPUTS) against the default, bf16 beside (the switch leaves bf16's dense layers
    # alone), rounds FIRST_ROUND..ROUNDS (1..3), a first row to compile. Read the rounds with
    # python bench/read_rounds.py bench/raw/runNN/s28 --against bf16
    for rank in 8 4; do
        timeout 150 python bench/probe_fused_inputs.py --rank $rank >"$out/probe_r$rank.log" 2>&1
        echo "rank $rank rc=$?"; grep '^{' "$out/probe_r$rank.log" | cut -c1-200
        mv -f "$out/fused_inputs.json" "$out/fused_inputs_r$rank.json" 2>/dev/null
    done
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    [ "${FIRST_ROUND:-1}" = 1 ] && env_rows q4_fused_0 ${FIRST_ROW_TIMEOUT:-200} "" $PEOPLE4 $ROUTES_750 \
        --switch FUSED_SINGLE_INPUTS=1
    for round in $(seq ${FIRST_ROUND:-1} ${ROUNDS:-3}); do
        env_rows q4_$round 120 "" $PEOPLE4 $ROUTES_750
        env_rows q4_fused_$round 80 "" $PEOPLE4 $ROUTES_750 --switch FUSED_SINGLE_INPUTS=1
        env_rows bf16_$round 120 "" $PEOPLE_BF16 $ROUTES_750
    done ;;
s21r)
    # run 21, after s21: results.json's 4-bit rows on the code as it is (CUDA's default depth and graphs),
    # every template checkpointed and not, each in its own process, and mflux's 4-bit step in the same
    # call (the 8x and 1/3-peak targets, same run). Needs the peer scripts in .peers (../shared/bench)
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    limit=${FIRST_ROW_TIMEOUT:-200}
    for template in people pets style; do
        for c in on off; do
            env_rows q4_${template}_ckpt_$c $limit "" --templates $template --quantize 4 --checkpointing $c --steps 8
            limit=90
        done
    done
    for template in people_r8 pets_r4 style_r16; do  # the peer script's names
        (cd .peers && OUT=$out QUANTS=4 timeout 120 python peer_mflux_step.py $template 2>&1 | tail -2 | cut -c1-400)
    done ;;
s19c)
    # run 19, after s19: with the copies, how far the host may run ahead at depth -1 (kernels a graph:
    # speed.CUDA_OPS_PER_GRAPH_UNBOUNDED), and depth 1, against bf16 in the same call
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    off="--switch LORA_KERNELS=0 --switch ROPE_KERNEL=0"
    people4="--templates people --quantize 4 --checkpointing on --steps 10"
    env_rows q4_k6 80 "MLX_MAX_OPS_PER_BUFFER=6 MLX_CUDA_GRAPH_CACHE_SIZE=4096" $people4 $off
    env_rows q4_k8 80 "MLX_MAX_OPS_PER_BUFFER=8 MLX_CUDA_GRAPH_CACHE_SIZE=4096" $people4 $off
    env_rows q4_k5 80 "" $people4 $off
    env_rows q4_depth1 80 "" $people4 $off --switch BLOCKWISE_DEPTH=1
    env_rows bf16_3 80 "" --templates people --quantize none --checkpointing off --steps 10 $off ;;
s19d)
    # run 19: our kernels one at a time against neither (speed.KERNEL_SAVING_S_PER_STEP), A/B/A; the
    # CUDA tests of our kernels and the copies
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    people4="--templates people --quantize 4 --checkpointing on --steps 10"
    bf16="--templates people --quantize none --checkpointing off --steps 10"
    env_rows q4_off_1 ${FIRST_ROW_TIMEOUT:-200} "" $people4 --switch LORA_KERNELS=0 --switch ROPE_KERNEL=0
    env_rows q4_rope_kernel 80 "" $people4 --switch LORA_KERNELS=0
    env_rows q4_off_2 80 "" $people4 --switch LORA_KERNELS=0 --switch ROPE_KERNEL=0
    env_rows bf16_off_1 80 "" $bf16 --switch LORA_KERNELS=0 --switch ROPE_KERNEL=0
    env_rows bf16_rope_kernel 80 "" $bf16 --switch LORA_KERNELS=0
    env_rows bf16_off_2 80 "" $bf16 --switch LORA_KERNELS=0 --switch ROPE_KERNEL=0
    env_rows bf16_lora_kernels 80 "" $bf16 --switch ROPE_KERNEL=0
    PYTHONPATH=$PYTHONPATH:$root/.pytestpkgs timeout 120 python -m pytest -q -p no:cacheprovider --tb=line \
        tests/test_lora_kernels.py tests/test_compute_copies.py 2>&1 | tail -4 ;;
s19b)
    # run 19: a machine's first people run through the trainer at the defaults (nothing set), the next
    # run; pets and style at CUDA's default; our kernels one at a time (speed.KERNEL_SAVING_S_PER_STEP);
    # the CUDA tests of our kernels and the copies
    cold_run cold ""
    grep -h "CUDA graph settings" "$out/cold/train_stderr.log" | cut -c1-200
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    mkdir -p "$out/warm"
    OUT=$out/warm timeout 100 python bench/time_to_first_step.py --template people --quantize 4 --checkpointing \
        --steps 5 >"$out/warm/stdout.log" 2>&1
    echo "warm rc=$?"; grep -o '"time_to_first_step_s": [0-9.]*\|"whole_run_peak_gib": [0-9.]*' "$out/warm/ttfs.json"
    off="--switch LORA_KERNELS=0 --switch ROPE_KERNEL=0"
    env_rows pets_style 120 "" --templates pets style --quantize 4 --checkpointing on --steps 10 $off
    people4="--templates people --quantize 4 --checkpointing on --steps 10"
    bf16="--templates people --quantize none --checkpointing off --steps 10"
    env_rows q4_off 80 "" $people4 $off
    env_rows bf16_off 80 "" $bf16 $off
    env_rows bf16_rope_kernel 80 "" $bf16 --switch LORA_KERNELS=0
    env_rows bf16_lora_kernels 80 "" $bf16 --switch ROPE_KERNEL=0
    env_rows q4_rope_kernel 80 "" $people4 --switch LORA_KERNELS=0
    env_rows q4_kernels 80 "" $people4
    PYTHONPATH=$PYTHONPATH:$root/.pytestpkgs timeout 120 python -m pytest -q -p no:cacheprovider --tb=line \
        tests/test_lora_kernels.py tests/test_compute_copies.py 2>&1 | tail -4 ;;
s14)
    # run 14: the defaults (depth 1) for every template; people at depth 0 (one stage at a time),
    # each with one dense copy per layer or two; 8-bit checkpointed; bf16 without checkpointing
    # (the 1.5x reference and the diffusers comparison). Kernels from the ttfs parts' cache.
    export MLX_PTX_CACHE_DIR=/tmp/ttfs-mlx-kernels
    bench_rows q4_ckpt ${FIRST_ROW_TIMEOUT:-200} --templates people pets style --quantize 4 --checkpointing on --steps 6
    bench_rows q4_ckpt_depth0 150 --templates people pets style --quantize 4 --checkpointing on --steps 6 \
        --switch BLOCKWISE_DEPTH=0
    bench_rows q4_ckpt_depth0_dense_twice 70 --templates people --quantize 4 --checkpointing on --steps 6 \
        --switch BLOCKWISE_DEPTH=0 --switch BLOCKWISE_KEEPS_DENSE=0
    bench_rows q4_ckpt_dense_twice 70 --templates people --quantize 4 --checkpointing on --steps 6 \
        --switch BLOCKWISE_KEEPS_DENSE=0
    bench_rows bf16 120 --templates people pets --quantize none --checkpointing off --steps 6
    bench_rows q8_ckpt 150 --templates people pets style --quantize 8 --checkpointing on --steps 6 ;;
ttfs)
    # a user's first run (MLX's CUDA kernel cache, /tmp/mlx, emptied: every kernel compiles), then a
    # second one (cache warm); each from an empty run folder and encodings cache
    rm -rf /tmp/mlx /tmp/ttfs-mlx-kernels  # MLX's default cache and the one time_to_first_step.py sets
    for run in cold warm; do
        mkdir -p "$out/$run"
        # run 13's cold run (the block-by-block step) had not reached its first step at 250 s
        OUT=$out/$run timeout $([[ $run == cold ]] && echo 420 || echo 150) python bench/time_to_first_step.py \
            --template people --quantize 4 --checkpointing \
            >"$out/$run/stdout.log" 2>&1
        echo "$run rc=$?"; tail -c 900 "$out/$run/stdout.log"; echo
    done ;;
ttfs2)
    # three more warm runs: the driver's JIT cache as it is, then raised to its 4 GiB maximum twice
    # (the first fills it); a drop in the third says the driver's PTX compiles were the warm 15 s
    du -sh ~/.nv/ComputeCache 2>/dev/null; echo "CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-unset}"
    for run in default big_fill big_warm; do
        mkdir -p "$out/$run"
        [[ $run == big* ]] && export CUDA_CACHE_MAXSIZE=4294967296
        OUT=$out/$run timeout 150 python bench/time_to_first_step.py --template people --quantize 4 --checkpointing \
            >"$out/$run/stdout.log" 2>&1
        echo "$run rc=$?"; grep -o '"time_to_first_step_s": [0-9.]*' "$out/$run/ttfs.json" 2>/dev/null
        grep -h "first step" "$out/$run/train_stderr.log" 2>/dev/null
        du -sh ~/.nv/ComputeCache 2>/dev/null
    done ;;
verify)
    # joint blocks' fused attention backward on contiguous arrays: style's rows (losses finite? faster?)
    style_rows --switch CONTIGUOUS_JOINT_ATTENTION=1 ;;
verify2)
    # the run-9 crash: full-size style, checkpointed, every kernel on (bisect ':full')
    timeout 200 python bench/bisect_joint_ckpt.py --timeout 180 --variants "all:full" >/dev/null 2>&1
    python -c "import json,sys; [print(r['variant'], r.get('ok'), r.get('losses'), r.get('nonfinite'),
        r.get('eager_nonfinite_grads'), r.get('stderr_tail', '')[-300:]) for r in json.load(open(sys.argv[1]))]" \
        "$out/bisect.json"
    # are our CUDA kernels (mx.fast.cuda_kernel) compiled again in every process? (the probe builds
    # its model without load_model, so MLX keeps its default cache folder)
    kernels=$(ls -d /tmp/mlx/*/ptx | head -1)
    ls "$kernels" | wc -l; ls "$kernels" | grep -c custom_kernel
    timeout 200 python bench/probe_first_step.py --checkpointing --timeout 90 --variants all ~LORA_KERNELS all | cut -c1-300
    ls "$kernels" | wc -l; ls -la --time-style=+%T "$kernels" | grep custom_kernel | head -30 ;;
style)
    # joint blocks recompute attention's backward, single blocks keep the fused one: style's losses
    # and speed. First: does the fused backward train joint blocks when handed contiguous inputs?
    timeout 330 python bench/bisect_joint_ckpt.py --timeout 100 --variants "all:nockpt:randomB:rawfused" \
        "all:nockpt:randomB:contig" "~FUSED_ATTENTION_BACKWARD:nockpt:randomB" >/dev/null 2>&1
    python - "$out/bisect.json" <<'PY'
import json, math, sys
rows = {r["variant"]: r for r in json.load(open(sys.argv[1]))}
reference = rows.get("~FUSED_ATTENTION_BACKWARD:nockpt:randomB", {}).get("eager_grad_norms")
for name, row in rows.items():
    norms = row.get("eager_grad_norms") or {}
    worst = max((abs(norms[k] - reference[k]) / (abs(reference[k]) + 1e-12) for k in reference if k in norms),
                default=None) if reference and norms else None
    print(name, "ok" if row.get("ok") else row.get("stderr_tail", "")[-200:], "losses", row.get("losses"),
          "nonfinite grads", row.get("eager_nonfinite_grads"), "worst grad difference vs recomputed", worst)
PY
    style_rows ;;
q8)
    timeout 400 python bench/bench_train.py --quantize 8 --steps 5 | cut -c1-400 ;;
style8)
    timeout 200 python bench/bench_train.py --templates style --quantize 8 --steps 5 | cut -c1-400 ;;
*)
    echo "unknown part: $part" >&2; exit 2 ;;
esac
