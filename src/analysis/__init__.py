"""analysis: which algorithm did a trained linear transformer learn? (SPEC §6)

On a model and a batch (no run directory needed): the Theorem 4.1 terms by the exact
recursion (`theorem41_terms`, `reconstruct_tokens`), the Lemma 4.4 momentum view
(`momentum_view`), and JSON-ready summaries (`analyse`, `per_sigma`). On a run directory:
`analyse_run`, or `python -m analysis.extract RUN_DIR`.
"""

from ._extract import (
    analyse as analyse,
    batch_momentum as batch_momentum,
    batch_terms as batch_terms,
    block_statistics as block_statistics,
    coefficients as coefficients,
    default_sigmas as default_sigmas,
    full_structure as full_structure,
    matrix_structure as matrix_structure,
    momentum_summary as momentum_summary,
    noise_adaptation as noise_adaptation,
    per_sigma as per_sigma,
    reconstruction_error as reconstruction_error,
    weight_distances as weight_distances,
)
from ._figures import (
    plot_coefficients as plot_coefficients,
    plot_loss_after_layers as plot_loss_after_layers,
    plot_noise as plot_noise,
    plot_pq as plot_pq,
    write_figures as write_figures,
)
from ._run import analyse_run as analyse_run, load_finished as load_finished, summary as summary
from ._terms import (
    Momentum as Momentum,
    Terms as Terms,
    momentum_view as momentum_view,
    reconstruct_tokens as reconstruct_tokens,
    rss as rss,
    theorem41_terms as theorem41_terms,
    token_statistics as token_statistics,
)
