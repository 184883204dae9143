# eqicl recipes. `just --list` shows them; CI runs `just test`.

# Train the default model (DIAG, 3 layers, sigma ~ U(0, 3)) into runs/default, evaluate it, analyse it.
train *ARGS:
    python -m eqicl.train --preset default --run-dir runs/default {{ARGS}}

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

# Reproduce Table 1: train, evaluate and record every cell not yet in runs/paper/table1.csv
# (e.g. `just sweep --models diag --layers 1-3`; `just sweep --list` shows what is done).
sweep *ARGS:
    python -m eqicl.sweep {{ARGS}}

# Our Table 1 beside the paper's (runs/paper/table1_vs_paper.md).
table:
    python -m analysis.table

# The paper's Figures 1-3 and 5-7 from the committed sweep results (runs/paper/figures/).
figures:
    python -m analysis.figures
