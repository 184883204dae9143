"""analysis: which algorithm did a trained linear transformer learn? (SPEC §6)

On a model and a batch (no run directory needed): the Theorem 4.1 terms by the exact
recursion (`theorem41_terms`, `reconstruct_tokens`), the Lemma 4.4 momentum view
(`momentum_view`), and JSON-ready summaries (`analyse`, `per_sigma`). On a run directory:
`analyse_run`, or `python -m analysis.extract RUN_DIR`.
"""

from ._extract import (
    analyse as analyse,
)
from ._extract import (
    batch_momentum as batch_momentum,
)
from ._extract import (
    batch_terms as batch_terms,
)
from ._extract import (
    block_statistics as block_statistics,
)
from ._extract import (
    coefficients as coefficients,
)
from ._extract import (
    default_sigmas as default_sigmas,
)
from ._extract import (
    full_structure as full_structure,
)
from ._extract import (
    matrix_structure as matrix_structure,
)
from ._extract import (
    momentum_summary as momentum_summary,
)
from ._extract import (
    noise_adaptation as noise_adaptation,
)
from ._extract import (
    per_sigma as per_sigma,
)
from ._extract import (
    reconstruction_error as reconstruction_error,
)
from ._extract import (
    weight_distances as weight_distances,
)
from ._figures import (
    plot_coefficients as plot_coefficients,
)
from ._figures import (
    plot_loss_after_layers as plot_loss_after_layers,
)
from ._figures import (
    plot_noise as plot_noise,
)
from ._figures import (
    plot_pq as plot_pq,
)
from ._figures import (
    write_figures as write_figures,
)
from ._run import analyse_run as analyse_run
from ._run import load_finished as load_finished
from ._run import summary as summary
from ._terms import (
    Momentum as Momentum,
)
from ._terms import (
    Terms as Terms,
)
from ._terms import (
    momentum_view as momentum_view,
)
from ._terms import (
    reconstruct_tokens as reconstruct_tokens,
)
from ._terms import (
    rss as rss,
)
from ._terms import (
    theorem41_terms as theorem41_terms,
)
from ._terms import (
    token_statistics as token_statistics,
)
