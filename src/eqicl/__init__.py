# ruff: noqa: E402 (the imports follow _early.start(), which must come first)
"""eqicl: linear transformers as versatile in-context learners, in JAX + Equinox.

An exact implementation of Vladymyrov, von Oswald, Sandler, Ge, "Linear Transformers are
Versatile In-Context Learners" (NeurIPS 2024): the noisy regression task, FULL / DIAG / GD++
linear transformers, the ridge baselines, the paper's evaluation metric, and training.
"""

from . import _early

_early.start()  # a signal while jax is imported is delivered after the import, never lost

from ._baselines import (
    Spectral as Spectral,
)
from ._baselines import (
    TunedBaselines as TunedBaselines,
)
from ._baselines import (
    exact_loss as exact_loss,
)
from ._baselines import (
    gd_coords as gd_coords,
)
from ._baselines import (
    ridge_coords as ridge_coords,
)
from ._baselines import (
    sampled_loss as sampled_loss,
)
from ._baselines import (
    spectral as spectral,
)
from ._baselines import (
    tune_baselines as tune_baselines,
)
from ._config import (
    PRESETS as PRESETS,
)
from ._config import (
    Config as Config,
)
from ._config import (
    ConfigError as ConfigError,
)
from ._config import (
    EvalConfig as EvalConfig,
)
from ._config import (
    ModelConfig as ModelConfig,
)
from ._config import (
    TaskConfig as TaskConfig,
)
from ._config import (
    TrainConfig as TrainConfig,
)
from ._config import (
    override as override,
)
from ._config import (
    preset as preset,
)
from ._evaluate import (
    estimate as estimate,
)
from ._evaluate import (
    estimate_all as estimate_all,
)
from ._evaluate import (
    evaluate as evaluate,
)
from ._evaluate import (
    model_exact_losses as model_exact_losses,
)
from ._evaluate import (
    model_weights_and_predictions as model_weights_and_predictions,
)
from ._evaluate import (
    profile as profile,
)
from ._model import (
    AbstractDiagAttention as AbstractDiagAttention,
)
from ._model import (
    AbstractLinearAttention as AbstractLinearAttention,
)
from ._model import (
    DiagAttention as DiagAttention,
)
from ._model import (
    FullAttention as FullAttention,
)
from ._model import (
    GDPPAttention as GDPPAttention,
)
from ._model import (
    LinearTransformer as LinearTransformer,
)
from ._model import WeightsError as WeightsError
from ._model import (
    context_statistics as context_statistics,
)
from ._model import (
    init_transformer as init_transformer,
)
from ._model import load_weights as load_weights
from ._model import save_weights as save_weights
from ._model import warm_transformer as warm_transformer
from ._paper import paper_table as paper_table
from ._paper import paper_value as paper_value
from ._polish import perturb as perturb
from ._polish import polish as polish
from ._run import (
    RunDirError as RunDirError,
)
from ._run import (
    evaluated_step as evaluated_step,
)
from ._run import (
    load_model as load_model,
)
from ._run import (
    read_run_config as read_run_config,
)
from ._run import (
    run as run,
)
from ._tail import DEFAULT as DEFAULT
from ._tail import PLAIN as PLAIN
from ._tail import Proposal as Proposal
from ._tail import summarize as summarize
from ._task import (
    Batch as Batch,
)
from ._task import (
    oracle_weights as oracle_weights,
)
from ._task import (
    ridge as ridge,
)
from ._task import (
    sample_batch as sample_batch,
)
from ._task import (
    statistics as statistics,
)
from ._theory import Preconditioned as Preconditioned
from ._theory import TwoLevel as TwoLevel
from ._theory import diag_transformer as diag_transformer
from ._theory import gdpp_transformer as gdpp_transformer
from ._theory import residual_moments as residual_moments
from ._theory import theorem51 as theorem51
from ._theory import theorem51_map as theorem51_map
from ._theory import theorem51_shrinkage as theorem51_shrinkage
from ._theory import theorem51_transformer as theorem51_transformer
from ._theory import theorem51_weights as theorem51_weights
from ._theory import theorem52 as theorem52
from ._theory import theorem52_transformer as theorem52_transformer
from ._theory import theorem52_weights as theorem52_weights
from ._theory import wishart_trace_moments as wishart_trace_moments
from ._train import (
    TrainState as TrainState,
)
from ._train import (
    init_ensemble as init_ensemble,
)
from ._train import (
    loss_fn as loss_fn,
)
from ._train import (
    make_optimizer as make_optimizer,
)
from ._train import (
    train_loop as train_loop,
)
from ._train import (
    train_step as train_step,
)

__version__ = "0.1.0"

_early.finish()
