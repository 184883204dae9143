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

# A cold pass (the cells of 1-4 layers and FULL at every depth, each from the GD start), then
# a warm pass (every cell from the best, by validation loss, of its smaller trained cells of
# either pass and of the cold cells next to it in noise), each skipping the cells it has
# recorded, then the merge (cell by cell the pass with the lower validation loss) into
# runs/paper/table1.csv, then a polish pass (the cells of at most 3 layers: GD++ and DIAG
# refined by L-BFGS from their merged weights and 3 perturbed copies, every cell also from
# its polished narrower cells) and the merge again. A part:
# `just sweep --noise 5,{1;3}` (the warm pass starts from the cold cells recorded so far,
# neighbouring noise settings included: for the recipe's starts, finish every part of the
# cold pass first). `just sweep --list` shows what each pass has done and what each merge
# would take, and writes nothing.
# Reproduce Table 1: cold pass, warm pass, merge, polish pass, merge (README: Reproducing the paper).
sweep *ARGS:
    python -m eqicl.sweep --cold --max-layers 4,full:7 --paper-dir runs/paper/cold --run-root runs/sweep/cold --baselines-dir runs/paper {{ARGS}}
    python -m eqicl.sweep --starts-from runs/paper/cold --across-noise --paper-dir runs/paper/warm --run-root runs/sweep/warm --baselines-dir runs/paper {{ARGS}}
    python -m eqicl.sweep --merge runs/paper/cold,runs/paper/warm --paper-dir runs/paper {{ if ARGS =~ '(^| )--list( |$)' { '--list' } else { '' } }}
    python -m eqicl.sweep --polish runs/paper --max-layers 3 --paper-dir runs/paper/polish {{ARGS}}
    python -m eqicl.sweep --merge runs/paper/cold,runs/paper/warm,runs/paper/polish --paper-dir runs/paper {{ if ARGS =~ '(^| )--list( |$)' { '--list' } else { '' } }}

# Our Table 1 beside the paper's (runs/paper/table1_vs_paper.md).
table:
    python -m analysis.table

# The paper's Figures 1-3 and 5-7 from the committed sweep results (runs/paper/figures/).
figures:
    python -m analysis.figures

# Training-step benchmark: eqicl vs a plain reference, FLOPs, n = 20/200/2000; writes runs/bench/results.json.
bench *ARGS:
    python -m bench.bench {{ARGS}}
