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
    TunedBaselines as TunedBaselines,
    exact_loss as exact_loss,
    gd_coords as gd_coords,
    ridge_coords as ridge_coords,
    sampled_loss as sampled_loss,
    spectral as spectral,
    tune_baselines as tune_baselines,
)
from ._checkpoint import restore_checkpoint as restore_checkpoint
from ._cli import setup_jax as setup_jax
from ._config import (
    PRESETS as PRESETS,
    Config as Config,
    ConfigError as ConfigError,
    EvalConfig as EvalConfig,
    ModelConfig as ModelConfig,
    NoiseLaw as NoiseLaw,
    TaskConfig as TaskConfig,
    TrainConfig as TrainConfig,
    override as override,
    preset as preset,
)
from ._evaluate import (
    SequenceCache as SequenceCache,
    cast as cast,
    ensemble_member as ensemble_member,
    estimate as estimate,
    estimate_all as estimate_all,
    evaluate as evaluate,
    mean_se as mean_se,
    model_exact_losses as model_exact_losses,
    model_weights_and_predictions as model_weights_and_predictions,
    profile as profile,
    profile_sigmas as profile_sigmas,
)
from ._limits import machine_memory as machine_memory
from ._model import (
    VARIANTS as VARIANTS,
    AbstractDiagAttention as AbstractDiagAttention,
    AbstractLinearAttention as AbstractLinearAttention,
    DiagAttention as DiagAttention,
    FullAttention as FullAttention,
    GDPPAttention as GDPPAttention,
    LinearTransformer as LinearTransformer,
    UnknownLayer as UnknownLayer,
    WeightsError as WeightsError,
    context_statistics as context_statistics,
    init_transformer as init_transformer,
    layer_class as layer_class,
    layer_classes as layer_classes,
    load_weights as load_weights,
    register_layer as register_layer,
    require_statistics as require_statistics,
    save_weights as save_weights,
    warm_transformer as warm_transformer,
)
from ._paper import (
    BASELINE_NAMES as BASELINE_NAMES,
    BASELINE_ROWS as BASELINE_ROWS,
    MODEL_ROWS as MODEL_ROWS,
    paper_table as paper_table,
    paper_value as paper_value,
)
from ._polish import perturb as perturb, polish as polish
from ._run import (
    RunDirError as RunDirError,
    evaluated_step as evaluated_step,
    load_model as load_model,
    read_run_config as read_run_config,
    run as run,
)
from ._score import score as score, score_models as score_models
from ._tail import (
    DEFAULT as DEFAULT,
    PLAIN as PLAIN,
    SELECT as SELECT,
    Proposal as Proposal,
    summarize as summarize,
)
from ._task import (
    Batch as Batch,
    noise_draws as noise_draws,
    oracle_weights as oracle_weights,
    ridge as ridge,
    sample_batch as sample_batch,
    statistics as statistics,
)
from ._theory import (
    Preconditioned as Preconditioned,
    TwoLevel as TwoLevel,
    diag_transformer as diag_transformer,
    gdpp_transformer as gdpp_transformer,
    residual_moments as residual_moments,
    theorem51 as theorem51,
    theorem51_map as theorem51_map,
    theorem51_shrinkage as theorem51_shrinkage,
    theorem51_transformer as theorem51_transformer,
    theorem51_weights as theorem51_weights,
    theorem52 as theorem52,
    theorem52_transformer as theorem52_transformer,
    theorem52_weights as theorem52_weights,
    wishart_trace_moments as wishart_trace_moments,
)
from ._train import (
    Trainer as Trainer,
    TrainState as TrainState,
    init_ensemble as init_ensemble,
    loss_fn as loss_fn,
    make_optimizer as make_optimizer,
    make_train_chunk as make_train_chunk,
    train_loop as train_loop,
    train_step as train_step,
)
from ._version import __version__ as __version__

_early.finish()
