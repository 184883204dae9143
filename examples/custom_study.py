"""A research script outside the package: a layer class and a noise law of one's own, trained
through eqicl's public API with checkpoints, scored against the baselines, and read out.

    python examples/custom_study.py RUN_DIR [--steps 400]

- `ScaledQuery`: DIAG whose update of the query token is multiplied by a learned g per layer
  (its `__call__` is its own, so eqicl computes it on the tokens);
- `Bimodal`: σ_τ = 4 with probability 0.1, else 0.5 (no built-in noise kind draws it).

Training runs through `eqicl.run` with an `eqicl.Trainer` whose model and sampler are these
(checkpoints, divergence guard and metrics.jsonl in RUN_DIR; rerun to resume). The model is
then scored on the law with `eqicl.evaluate` and `eqicl.score` (the baselines on the same
sequences), checked against the token equation computed here by hand, and read out: the
learned g, and the ridge λ whose solution the final implicit weights are closest to.
Prints one JSON object.
"""

import argparse
import dataclasses
import json
import sys

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
from jaxtyping import Array, Float  # noqa: E402

import eqicl  # noqa: E402


class ScaledQuery(eqicl.AbstractDiagAttention, strict=True):
    """DIAG whose update of the query tokens (not the context) is multiplied by g."""

    kind = "scaled-query"
    label = "DIAG-g"
    fields = ("p", "q", "g")
    embeds = ("scaled-query",)

    p: Float[Array, "heads 2"]
    q: Float[Array, "heads 2"]
    g: Float[Array, ""]
    dim: int = eqx.field(static=True)
    scale_n: float = eqx.field(static=True, default=1.0)
    scale_s: float = eqx.field(static=True, default=1.0)

    def head_scalars(self):
        return jnp.stack([self.p[:, 0], self.p[:, 1], self.q[:, 0], self.q[:, 1]])

    @classmethod
    def init_arrays(cls, key, heads, d, scale, gd, dtype):
        raise NotImplementedError("built from a DIAG start in `init` below")

    def __call__(self, tokens, n):
        t = self.operator(eqicl.context_statistics(tokens, n))
        factor = jnp.where(jnp.arange(tokens.shape[0]) < n, 1.0, self.g).astype(tokens.dtype)
        return tokens + factor[:, None] * (tokens @ t.T)


@dataclasses.dataclass(frozen=True)
class Bimodal(eqicl.NoiseLaw):
    low: float = 0.5
    high: float = 4.0
    p_high: float = 0.1

    def sample(self, key, batch, dtype):
        return jnp.where(jr.uniform(key, (batch,)) < self.p_high, self.high, self.low).astype(dtype)

    @property
    def mean_sigma2(self):
        return (1 - self.p_high) * self.low**2 + self.p_high * self.high**2

    @property
    def sigma_range(self):
        return self.high

    @property
    def label(self):
        return "bimodal"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--sequences", type=int, default=20_000, help="test sequences")
    args = parser.parse_args(argv)

    law = Bimodal()
    # The run directory's config: a built-in task of the same d and n (config.json holds
    # built-in kinds only); the law enters through the sampler and the evaluation's task.
    config = eqicl.preset(
        "default",
        [
            "task.d=5",
            "task.n=10",
            "model.kind=diag",
            "model.layers=3",
            "train.formulation=tokens",
            "train.dtype=float64",
            f"train.steps={args.steps}",
            "train.batch=512",
            "train.seeds=2",
            "train.checkpoint_every=100",
            "train.steps_per_call=50",
            "train.warmup=20",
        ],
    )
    task = dataclasses.replace(config.task, noise=law)

    def init(key):
        diag = eqicl.init_transformer(key, config.model, task, jnp.float64)
        layers = diag.layers
        custom = ScaledQuery(
            p=layers.p,
            q=layers.q,
            g=jnp.ones((diag.num_layers,), jnp.float64),
            dim=layers.dim,
            scale_n=layers.scale_n,
            scale_s=layers.scale_s,
        )
        return eqicl.LinearTransformer(layers=custom, num_layers=diag.num_layers)

    def sampler(key):
        return eqicl.sample_batch(key, task, config.train.batch, jnp.float64), None

    trainer = eqicl.Trainer(config, init=init, sampler=sampler)
    with jax.numpy_dtype_promotion("standard"):
        eqicl.run(
            config,
            args.run_dir,
            progress=False,
            evaluate=False,
            trainer=trainer,
            echo=lambda line: print(line, file=sys.stderr),  # stdout is the JSON
        )
    # The newest checkpoint, restored into the trainer's own state (seed 0).
    restored = eqicl.restore_checkpoint(args.run_dir, config, like=trainer.abstract())
    model = eqicl.ensemble_member(restored.model, 0)

    law_config = dataclasses.replace(
        config,
        task=task,
        eval=dataclasses.replace(
            config.eval,
            sequences=args.sequences,
            chunk=args.sequences,
            tail_sequences=args.sequences,
        ),
    )
    result = eqicl.evaluate(model, law_config, baselines=True)
    batch = eqicl.sample_batch(jr.key(7), task, 2_000, jnp.float64)
    scored = eqicl.score(model, batch)
    # The token equation by hand: wˡ by querying the basis vectors, ½‖wᴸ − μ‖².
    w = jax.vmap(model.implicit_weights)(batch.x, batch.y)[:, -1]
    mu = jax.vmap(eqicl.oracle_weights)(batch.x, batch.y, batch.sigma)
    by_hand = float(jnp.mean(0.5 * jnp.sum((w - mu) ** 2, axis=-1)))
    lambdas = np.geomspace(0.01, 100, 41)
    ridge = jax.vmap(eqicl.ridge, in_axes=(0, 0, None))
    fit = [float(jnp.mean(jnp.sum((w - ridge(batch.x, batch.y, lam)) ** 2, -1))) for lam in lambdas]
    out = {
        "test": {
            "sequences": args.sequences,
            "model": result["model"]["adjusted_exact"],
            "tail": {k: result["model"]["tail"][k] for k in ("mean", "se", "top_share", "max")},
            "baselines": {k: v["adjusted_exact"] for k, v in result["baselines"].items()},
        },
        "score_on_2000": scored["model"][-1]["mean"],
        "token_equation_on_2000": by_hand,
        "learned_g": [float(v) for v in np.asarray(model.layers.g)],
        "closest_ridge_lambda": float(lambdas[int(np.argmin(fit))]),
        "oracle_mean_sigma2": task.mean_sigma2,
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
