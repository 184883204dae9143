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

# Training-step benchmark: eqicl vs a plain reference, FLOPs, n = 20/200/2000; writes runs/bench/results.json.
bench *ARGS:
    python -m bench.bench {{ARGS}}
