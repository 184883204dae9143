# eqicl recipes. `just --list` shows them; CI runs `just test`.

# (`just train --run-dir X ...` trains into X and analyses X.)
# Train the default model (DIAG, 3 layers, sigma ~ U(0, 3)) into runs/default, evaluate it, analyse it.
train *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    dir=runs/default; prev=""
    for a in {{ARGS}}; do
        if [[ $prev == --run-dir ]]; then dir=$a; fi
        if [[ $a == --run-dir=* ]]; then dir=${a#--run-dir=}; fi
        prev=$a
    done
    python -m eqicl.train --preset default --run-dir runs/default {{ARGS}}
    python -m analysis.extract "$dir"

# The default test suite (fast on 2 CPU cores; jaxtyping + beartype active).
test *ARGS:
    python -m pytest {{ARGS}}

# The training command in PROCS processes on this machine with DEVICES forced CPU devices each,
# as tests/test_multiprocess.py runs it (README: Scale-out): `just processes 2 2 --preset tiny --run-dir runs/two`.
# Process 0's output is shown; the others' stderr only.
processes PROCS DEVICES *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    pids=()
    for ((i = 0; i < {{PROCS}}; i++)); do
        out=/dev/stdout; if (( i > 0 )); then out=/dev/null; fi
        XLA_FLAGS=--xla_force_host_platform_device_count={{DEVICES}} JAX_COORDINATOR_ADDRESS=127.0.0.1:$port \
            JAX_NUM_PROCESSES={{PROCS}} JAX_PROCESS_ID=$i python -m eqicl.train {{ARGS}} > $out &
        pids+=($!)
    done
    status=0
    for p in "${pids[@]}"; do wait "$p" || status=$?; done
    exit $status

# Longer checks (the baseline rows of Table 1 on 100,000 sequences, ...).
test-slow *ARGS:
    python -m pytest -m slow {{ARGS}}

# Lint, format check and type check (pyright: [tool.pyright] in pyproject.toml).
lint:
    ruff check .
    ruff format --check .
    pyright

# Reproduce Table 1: every stage of the recipe (cold, warm, polish) for the asked cells, each
# skipping what it has recorded, then runs/paper/table1.csv as each cell's best candidate by
# validation loss (README: Reproducing the paper). A part: `just sweep --noise 5,{1;3}`;
# `just sweep --list` shows each stage's candidates and the table's pick, writing nothing.
# Across machines: `just sweep --shard K/N --wait 36000` on each of N, then `just sweep`.
sweep *ARGS:
    python -m eqicl.sweep {{ARGS}}

# The sweep as two processes of disjoint noise settings, then the four settings whose warm stage
# needs the other half's cold candidates, then the score on test seed 2027 (1,000,000 sequences
# per estimate), the table and the figures; the same result as `just sweep` (one process).
# Resumable: run it again. Table 1 from scratch on both cores, timed part by part; each part's
# end is appended to PAPER/reproduce-times.log (with each start and its machine), so a run
# resumed across sessions keeps the times of every invocation.
reproduce PAPER="runs/paper" RUNS="runs/sweep":
    #!/usr/bin/env bash
    set -euo pipefail
    s() { python -m eqicl.sweep --paper-dir "{{PAPER}}" --run-root "{{RUNS}}" --no-progress "$@"; }
    mkdir -p "{{PAPER}}"
    log() { echo "$(date -u +%FT%TZ) $*" >> "{{PAPER}}/reproduce-times.log"; }
    log "start ($(python -c 'from eqicl._limits import machine_line; print(machine_line())'))"
    t0=$(date +%s)
    s --noise '0,1,2,3,{1;3}' --test-sequences 0 & a=$!
    s --noise '4,5,6,7,{1;3;5}' --test-sequences 0 & b=$!
    wait $a; wait $b; t1=$(date +%s); log "halves $((t1-t0)) s"
    s --noise '3,4' --test-sequences 0 & a=$!
    s --noise '{1;3},{1;3;5}' --test-sequences 0 & b=$!
    wait $a; wait $b; t2=$(date +%s); log "the four joining settings $((t2-t1)) s"
    s --noise '0,1,2,3,4' & a=$!
    s --noise '5,6,7,{1;3},{1;3;5}' & b=$!
    wait $a; wait $b; t3=$(date +%s); log "score $((t3-t2)) s"
    python -m analysis.table --paper-dir "{{PAPER}}" > /dev/null
    python -m analysis.figures --paper-dir "{{PAPER}}" > /dev/null
    t4=$(date +%s)
    line="reproduce: halves $((t1-t0)) s, the four joining settings $((t2-t1)) s, score $((t3-t2)) s, table and figures $((t4-t3)) s, total $((t4-t0)) s"
    log "$line"
    echo "$line"

# The mechanism ablation trained by Table 1's recipe (README "Mechanism ablations"): two
# processes of disjoint noise settings, then one over all of them (the cells whose warm starts
# need the other half's, then the score into runs/paper/ablation/recipe.{csv,png}). Resumable.
ablation-recipe SWEEP="runs/ablation-recipe" RUNS="runs/sweep-ablation":
    #!/usr/bin/env bash
    set -euo pipefail
    a() { python -m analysis.ablation --recipe --sweep-dir "{{SWEEP}}" --run-root "{{RUNS}}" --no-progress "$@"; }
    t0=$(date +%s)
    a --train-only --noise '0,1,2,3,{1;3}' & p=$!
    a --train-only --noise '4,5,6,7,{1;3;5}' & q=$!
    wait $p; wait $q; t1=$(date +%s)
    a
    t2=$(date +%s)
    echo "ablation-recipe: halves $((t1-t0)) s, the joining cells and the score $((t2-t1)) s, total $((t2-t0)) s"

# Our Table 1 beside the paper's (runs/paper/table1_vs_paper.md).
table:
    python -m analysis.table

# The paper's Figures 1-3 and 5-7 from the committed sweep results (runs/paper/figures/).
figures:
    python -m analysis.figures

# Training-step benchmark: eqicl vs a plain reference, FLOPs, n = 20/200/2000; writes runs/bench/results.json.
bench *ARGS:
    python -m bench.bench {{ARGS}}
