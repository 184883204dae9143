"""`just bench`: eqicl's training step against a plain reference step, in one run.

    python -m bench.bench [--quick] [--out runs/bench/results.json]

For FULL, DIAG and GD++ at the paper's configuration (d = 10, n = 20, batch 2048; 1, 3 and 7
layers) it times eqicl's jitted training chunk (`make_train_chunk` with the statistics
formulation and the Wishart sampler, i.e. eqicl's CPU kernel where it applies) and a plain
reference written here the obvious way (tokens
through the SPEC §2 einsum, Adam, data sampled every step, the same number of steps per jitted
call), both on the paper's sampled objective, plus eqicl on its default exact objective. It
reports step time, sequences/s, the ratio, an analytic FLOP count with the achieved GFLOP/s,
compile time, evaluation throughput and the fast step at n = 20, 200, 2000. Timings are the
best of a few repeats (the machine may be shared: ratios within one run are what count).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import optax

import eqicl
import eqicl.kernel
from eqicl._limits import cpu_model

D_IN, N_CTX, BATCH = 10, 20, 2048


# ------------------------------------------------------------------------------------------
# The plain reference: the paper's token equation, written directly.


def reference_params(kind: str, layers: int, d: int, key):
    """P, Q of every layer as (L, 1, D, D) matrices (DIAG / GD++: diagonal ones built from
    their scalars inside the step, so their gradients are those of the scalars)."""
    big_d = d + 1
    if kind == "full":
        kp, kq = jr.split(key)
        return {
            "p": 1e-2 * jr.normal(kp, (layers, 1, big_d, big_d)),
            "q": 1e-2 * jr.normal(kq, (layers, 1, big_d, big_d)),
        }
    n_scalars = 4 if kind == "diag" else 3
    return {"s": 1e-2 * jr.normal(key, (layers, n_scalars))}


def reference_pq(params, d: int):
    if "p" in params:
        return params["p"], params["q"]
    s = params["s"]
    if s.shape[1] == 3:  # GD++: q_y = 0
        s = jnp.concatenate([s, jnp.zeros_like(s[:, :1])], axis=1)
    px, py, qx, qy = s.T

    def diag(ax, ay):
        v = jnp.concatenate([jnp.broadcast_to(ax[:, None], (ax.shape[0], d)), ay[:, None]], 1)
        return jax.vmap(jnp.diag)(v)[:, None]

    return diag(px, py), diag(qx, qy)


def reference_loss(params, key, d: int, n: int, batch: int, sigma_max: float):
    """SPEC §1 sampling and §2 token equation; ½(ŷ − y_t)² (the paper's objective)."""
    kw, kx, kq, kn, ks = jr.split(key, 5)
    w = jr.normal(kw, (batch, d))
    x = jr.normal(kx, (batch, n, d))
    xq = jr.normal(kq, (batch, d))
    sigma = jr.uniform(ks, (batch,), maxval=sigma_max)
    y = jnp.einsum("bnd,bd->bn", x, w) + sigma[:, None] * jr.normal(kn, (batch, n))
    yq = jnp.einsum("bd,bd->b", xq, w)
    ctx = jnp.concatenate([x, y[..., None]], -1)
    qry = jnp.concatenate([xq, jnp.zeros((batch, 1))], -1)[:, None]
    e = jnp.concatenate([ctx, qry], 1)
    ps, qs = reference_pq(params, d)
    for p, q in zip(ps, qs, strict=True):
        s = jnp.einsum("bni,bnj->bij", e[:, :n], e[:, :n])
        t = jnp.einsum("kij,bjl,klm->bim", p, s, q)
        e = e + jnp.einsum("bij,bnj->bni", t, e)
    return jnp.mean(0.5 * (-e[:, -1, -1] - yq) ** 2)


def make_reference_chunk(kind, layers, d, n, batch, steps, lr=1e-4):
    opt = optax.adam(lr)

    def step(carry, i):
        params, state = carry
        loss, grads = jax.value_and_grad(reference_loss)(
            params, jr.fold_in(jr.key(0), i), d, n, batch, 3.0
        )
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    @jax.jit
    def chunk(params, state, start):
        (params, state), losses = jax.lax.scan(step, (params, state), start + jnp.arange(steps))
        return params, state, losses

    params = reference_params(kind, layers, d, jr.key(1))
    return chunk, (params, opt.init(params))


# ------------------------------------------------------------------------------------------
# Timing.


def time_chunk(call, steps: int, repeats: int) -> dict:
    """Compile + first call, then the best of `repeats` calls; seconds per step."""
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        best = min(best, time.perf_counter() - t0)
    return {"step_s": best / steps, "compile_s": max(first - best, 0.0)}


def time_reference(kind, layers, d, n, batch, steps, repeats):
    chunk, carry = make_reference_chunk(kind, layers, d, n, batch, steps)
    box = {"carry": carry, "start": 0}

    def call():
        params, state = box["carry"]
        params, state, losses = chunk(params, state, jnp.asarray(box["start"]))
        box["carry"], box["start"] = (params, state), box["start"] + steps
        return losses

    return time_chunk(call, steps, repeats)


def eqicl_config(kind, layers, d, n, batch, steps, objective):
    return eqicl.Config(
        task=eqicl.TaskConfig(d=d, n=n, noise="uniform", sigma_max=3.0),
        model=eqicl.ModelConfig(kind=kind, layers=layers),
        train=eqicl.TrainConfig(
            steps=10**9,
            batch=batch,
            lr=1e-4,
            warmup=0,
            seeds=1,
            steps_per_call=steps,
            checkpoint_every=steps,
            objective=objective,
            formulation="stats",
            sampler="wishart",
            devices=1,
        ),
    )


def time_eqicl(kind, layers, d, n, batch, steps, repeats, objective="sampled", **train):
    config = eqicl_config(kind, layers, d, n, batch, steps, objective)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, **train))
    chunk = eqicl.make_train_chunk(config, steps)
    members = jnp.arange(config.train.seeds)
    box = {"state": eqicl.init_ensemble(config)}

    def call():
        box["state"], (losses, _) = chunk(members, box["state"])
        return losses

    return time_chunk(call, steps, repeats)


# ------------------------------------------------------------------------------------------
# Analytic FLOPs (multiply-add = 2 FLOPs; backward counted as 2× forward).


def reference_flops(layers, d, n, batch, heads=1):
    big_d = d + 1
    per_layer = 2 * n * big_d**2 + heads * 2 * 2 * big_d**3 + 2 * (n + 1) * big_d**2
    return 3 * layers * per_layer * batch


def fast_flops(layers, d, batch, heads=1):
    big_d = d + 1
    # T = Σ_k P_k S Q_k (two GEMMs per head), A S Aᵀ (two products), readout row (D²).
    per_layer = heads * 2 * 2 * big_d**3 + 2 * 2 * big_d**3 + 2 * big_d**2
    return 3 * layers * per_layer * batch


def eval_throughput(sequences: int, repeats: int) -> dict:
    """Sequences/s of the exact adjusted loss after every layer (`eqicl.model_exact_losses`,
    the eigen-decomposition included) for a 3-layer DIAG model, float32, on sequences already
    sampled."""
    task = eqicl.TaskConfig(d=D_IN, n=N_CTX, sigma_max=3.0)
    model = eqicl.init_transformer(jr.key(0), eqicl.ModelConfig(kind="diag", layers=3), task)
    batch = eqicl.sample_batch(jr.key(1), task, sequences)

    def call():
        return eqicl.model_exact_losses(model, batch, eqicl.spectral(batch))

    t = time_chunk(call, 1, repeats)
    return {"sequences": sequences, "seconds": t["step_s"], "seq_per_s": sequences / t["step_s"]}


def main(argv=None) -> int:
    assert __doc__ is not None  # the module docstring (None only under python -OO)
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="1 and 7 layers only, fewer repeats")
    parser.add_argument("--out", default="runs/bench/results.json")
    parser.add_argument("--steps", type=int, default=None, help="steps per jitted call")
    args = parser.parse_args(argv)

    steps = args.steps or (10 if args.quick else 20)
    repeats = 2 if args.quick else 3
    layer_list = (1, 7) if args.quick else (1, 3, 7)
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "devices": [str(dv) for dv in jax.devices()],
        "platform": jax.default_backend(),
        "load_avg_at_start": os.getloadavg(),
        "kernel": "used" if eqicl.kernel.usable() else f"not used: {eqicl.kernel.reason()}",
    }
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, jax {machine['jax']}, "
        f"devices {machine['devices']}, load {machine['load_avg_at_start'][0]:.1f}"
    )
    print(f"eqicl CPU kernel: {machine['kernel']}")
    print(f"d={D_IN} n={N_CTX} batch={BATCH}, {steps} steps per jitted call, best of {repeats}")
    rows = []
    header = (
        f"{'model':<6}{'L':>3}{'ref ms':>9}{'eqicl ms':>10}{'ratio':>7}{'exact ms':>10}"
        f"{'seq/s':>10}{'ref GF/s':>9}{'eq GF/s':>9}{'compile s':>11}"
    )
    print(header)
    for kind in ("full", "diag", "gdpp"):
        for layers in layer_list:
            ref = time_reference(kind, layers, D_IN, N_CTX, BATCH, steps, repeats)
            fast = time_eqicl(kind, layers, D_IN, N_CTX, BATCH, steps, repeats, "sampled")
            exact = time_eqicl(kind, layers, D_IN, N_CTX, BATCH, steps, repeats, "exact")
            rf, ff = reference_flops(layers, D_IN, N_CTX, BATCH), fast_flops(layers, D_IN, BATCH)
            row = {
                "model": kind,
                "layers": layers,
                "reference": {
                    **ref,
                    "flops": rf,
                    "gflops": rf / ref["step_s"] / 1e9,
                    "seq_per_s": BATCH / ref["step_s"],
                },
                "eqicl_sampled": {
                    **fast,
                    "flops": ff,
                    "gflops": ff / fast["step_s"] / 1e9,
                    "seq_per_s": BATCH / fast["step_s"],
                },
                "eqicl_exact": {**exact, "seq_per_s": BATCH / exact["step_s"]},
                "ratio": ref["step_s"] / fast["step_s"],
            }
            rows.append(row)
            name = eqicl.MODEL_ROWS[kind]
            print(
                f"{name:<6}{layers:>3}{ref['step_s'] * 1e3:>9.2f}{fast['step_s'] * 1e3:>10.2f}"
                f"{row['ratio']:>6.1f}x{exact['step_s'] * 1e3:>10.2f}"
                f"{BATCH / fast['step_s']:>10.0f}{row['reference']['gflops']:>9.1f}"
                f"{row['eqicl_sampled']['gflops']:>9.1f}"
                f"{fast['compile_s']:>5.1f}/{ref['compile_s']:<5.1f}",
                flush=True,
            )

    print("\nlong contexts (FULL, 7 layers, eqicl default exact objective, batch 2048):")
    long_ctx = []
    for n in (20, 200, 2000):
        t = time_eqicl("full", 7, D_IN, n, BATCH, steps, repeats, "exact")
        long_ctx.append({"n": n, **t})
        print(
            f"  n={n:<5} {t['step_s'] * 1e3:8.2f} ms/step  "
            f"({t['step_s'] / long_ctx[0]['step_s']:.2f}x n=20)",
            flush=True,
        )
    tok = []
    for n in (20, 200):
        t = time_eqicl("full", 7, D_IN, n, BATCH, steps, repeats, "exact", sampler="tokens")
        tok.append({"n": n, **t})
        print(
            f"  n={n:<5} {t['step_s'] * 1e3:8.2f} ms/step with the token sampler "
            "(same formulation, n-dependent sampling)",
            flush=True,
        )

    print("\nseed ensembles (the sweep's setting: batch 512, exact objective, 1 vs 5 seeds):")
    ensembles = []
    for kind, layers in (("diag", 3), ("full", 7)):
        one = time_eqicl(kind, layers, D_IN, N_CTX, 512, steps, repeats, "exact", seeds=1)
        five = time_eqicl(kind, layers, D_IN, N_CTX, 512, steps, repeats, "exact", seeds=5)
        ensembles.append({"model": kind, "layers": layers, "seeds_1": one, "seeds_5": five})
        print(
            f"  {eqicl.MODEL_ROWS[kind]:<5}{layers:>2} layers: {one['step_s'] * 1e3:7.2f} ms/step with 1 seed, "
            f"{five['step_s'] * 1e3:7.2f} with 5 ({five['step_s'] / one['step_s']:.1f}x)",
            flush=True,
        )

    ev = eval_throughput(20_000 if args.quick else 50_000, repeats)
    print(
        f"\nevaluation: exact adjusted loss (every layer), DIAG 3 layers, "
        f"{ev['seq_per_s']:,.0f} sequences/s"
    )

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine,
        "d": D_IN,
        "n": N_CTX,
        "batch": BATCH,
        "steps_per_call": steps,
        "repeats": repeats,
        "quick": args.quick,
        "train_step": rows,
        "long_context": long_ctx,
        "long_context_token_sampler": tok,
        "seed_ensembles": ensembles,
        "evaluation": ev,
        "notes": "times are seconds per training step (best of repeats); FLOPs are analytic "
        "(multiply-add = 2, backward = 2x forward); reference = SPEC §2 token einsum + Adam.",
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
