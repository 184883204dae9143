# eqicl recipes. `just --list` shows them; CI runs `just test`.

# Train the default model (DIAG, 3 layers, sigma ~ U(0, 3)) into runs/default, evaluate it, analyse it.
train *ARGS:
    python -m eqicl.train --preset default --run-dir runs/default {{ARGS}}
    python -m analysis.extract runs/default

# The default test suite (fast on 2 CPU cores; jaxtyping + beartype active).
test *ARGS:
    python -m pytest {{ARGS}}

# Longer checks (the baseline rows of Table 1 on 100,000 sequences, ...).
test-slow *ARGS:
    python -m pytest -m slow {{ARGS}}

# Lint and format check.
lint:
    ruff check .
    ruff format --check .

# Reproduce Table 1: every stage of the recipe (cold, warm, polish) for the asked cells, each
# skipping what it has recorded, then runs/paper/table1.csv as each cell's best candidate by
# validation loss (README: Reproducing the paper). A part: `just sweep --noise 5,{1;3}`;
# `just sweep --list` shows each stage's candidates and the table's pick, writing nothing.
sweep *ARGS:
    python -m eqicl.sweep {{ARGS}}

# Our Table 1 beside the paper's (runs/paper/table1_vs_paper.md).
table:
    python -m analysis.table

# The paper's Figures 1-3 and 5-7 from the committed sweep results (runs/paper/figures/).
figures:
    python -m analysis.figures

# Training-step benchmark: eqicl vs a plain reference, FLOPs, n = 20/200/2000; writes runs/bench/results.json.
bench *ARGS:
    python -m bench.bench {{ARGS}}
