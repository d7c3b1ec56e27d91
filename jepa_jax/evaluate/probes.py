"""Classifiers on frozen features, on device: a linear probe (optax) and weighted k-NN.

Linear probe: features standardised with the training features' mean and std, a softmax linear
layer trained with Adam (cosine-decayed learning rate, L2 penalty on the weights), every
(learning rate, weight decay) of a small grid at once (vmapped). The grid point is chosen by
accuracy on a held-out part of the TRAINING features, then refitted on all of them; val is only
ever predicted. k-NN: features centred on the training mean and L2-normalised, cosine
similarity, the k nearest vote with weights exp(similarity / T).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

LEARNING_RATES = (1e-3, 1e-2, 1e-1)
WEIGHT_DECAYS = (0.0, 1e-5, 1e-4, 1e-3)
HOLDOUT_FRACTION = 0.2
KNN_K, KNN_TEMPERATURE = 20, 0.07


@dataclasses.dataclass
class ProbeResult:
    top1: float  # percent on val
    top5: float | None  # percent on val, where there are at least 5 classes
    lr: float  # the chosen grid point
    weight_decay: float
    holdout_top1: float  # its accuracy on the held-out training features


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Percent of rows whose label is among the k highest scores (ties broken by order)."""
    top = np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :k]
    return float(100.0 * np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "batch"))
def _fit(x, y, rows, mean, std, lrs, wds, key, *, num_classes: int, steps: int, batch: int):
    """Softmax regression on x[rows] standardised: weights [S, D, C] and biases [S, C], one
    per (lrs[s], wds[s]). Rows are standardised per batch: no copy of x is made."""
    n, d = rows.shape[0], x.shape[1]
    sweep = lrs.shape[0]
    params = {"w": jnp.zeros((sweep, d, num_classes)), "b": jnp.zeros((sweep, num_classes))}
    adam = optax.scale_by_adam()
    opt_state = jax.vmap(adam.init)(params)
    decay = optax.cosine_decay_schedule(1.0, steps)
    full = ((x[rows] - mean) / std, y[rows]) if batch >= n else None

    def loss(p, wd, xb, yb):
        logits = xb @ p["w"] + p["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return ce + 0.5 * wd * jnp.sum(p["w"] ** 2)

    def step(carry, i):
        params, opt_state = carry
        if full is not None:
            xb, yb = full
        else:  # with replacement: cheap, and unbiased
            r = rows[jax.random.randint(jax.random.fold_in(key, i), (batch,), 0, n)]
            xb, yb = (x[r] - mean) / std, y[r]
        grads = jax.vmap(jax.grad(loss), in_axes=(0, 0, None, None))(params, wds, xb, yb)
        updates, opt_state = jax.vmap(adam.update)(grads, opt_state)
        scale = -lrs * decay(i)
        params = jax.tree.map(
            lambda p, u: p + scale.reshape((-1,) + (1,) * (u.ndim - 1)) * u, params, updates
        )
        return (params, opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, opt_state), jnp.arange(steps))
    return params


@functools.partial(jax.jit, static_argnames=("chunk",))
def _holdout_scores(params, x, y, rows, mean, std, *, chunk: int = 1024):
    """Per grid point: (correct count, summed cross-entropy) over x[rows], a chunk at a time
    (all grid points' logits of a large held-out set at once would not fit)."""
    n = rows.shape[0]
    pad = -n % chunk
    rows_p = jnp.pad(rows, (0, pad)).reshape(-1, chunk)
    real = (jnp.arange(n + pad) < n).reshape(-1, chunk)

    def one(args):
        r, m = args
        logits = jnp.einsum("nd,sdc->snc", (x[r] - mean) / std, params["w"]) + params["b"][:, None]
        correct = ((logits.argmax(-1) == y[r]) & m).sum(-1)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[r][None])
        return correct, jnp.where(m, ce, 0.0).sum(-1)

    correct, loss = jax.lax.map(one, (rows_p, real))
    return correct.sum(0), loss.sum(0)


@jax.jit
def _logits(params, x, mean, std):
    return ((x - mean) / std) @ params["w"][0] + params["b"][0]


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    num_classes: int,
    *,
    lrs=LEARNING_RATES,
    weight_decays=WEIGHT_DECAYS,
    steps: int = 2000,
    batch: int = 4096,
    holdout: float = HOLDOUT_FRACTION,
    seed: int = 0,
) -> ProbeResult:
    """Top-1/5 on val of the grid point that did best on a held-out part of train.

    Features are standardised with the mean and std of all training features (no labels)."""
    n = len(train_y)
    if n < 2:
        raise ValueError(f"the linear probe needs at least 2 training images, got {n}")
    order = np.random.default_rng(seed).permutation(n).astype(np.int32)
    n_hold = min(n - 1, max(1, int(round(holdout * n))))
    hold, fit = jnp.asarray(order[:n_hold]), jnp.asarray(order[n_hold:])
    grid = [(lr, wd) for lr in lrs for wd in weight_decays]
    lr_arr = jnp.asarray([g[0] for g in grid], jnp.float32)
    wd_arr = jnp.asarray([g[1] for g in grid], jnp.float32)
    key = jax.random.key(seed)
    x, y = jnp.asarray(train_x, jnp.float32), jnp.asarray(train_y, jnp.int32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    common = dict(num_classes=num_classes, steps=steps, batch=batch)

    params = _fit(x, y, fit, mean, std, lr_arr, wd_arr, key, **common)
    correct, loss = _holdout_scores(params, x, y, hold, mean, std)
    hold_acc = 100.0 * np.asarray(correct) / n_hold
    best = int(np.lexsort((np.asarray(loss), -hold_acc))[0])  # best accuracy, then lowest loss

    everything = jnp.arange(n, dtype=jnp.int32)
    pick = slice(best, best + 1)
    params = _fit(x, y, everything, mean, std, lr_arr[pick], wd_arr[pick], key, **common)
    scores = np.asarray(_logits(params, jnp.asarray(val_x, jnp.float32), mean, std))
    return ProbeResult(
        top1=topk_accuracy(scores, val_y, 1),
        top5=topk_accuracy(scores, val_y, 5) if num_classes >= 5 else None,
        lr=grid[best][0],
        weight_decay=grid[best][1],
        holdout_top1=float(hold_acc[best]),
    )


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def _knn_votes(bank, bank_labels, queries, *, num_classes: int, k: int, temperature: float):
    sims = queries @ bank.T  # [Q, N] cosine similarities (rows are unit vectors)
    top_sims, top_idx = jax.lax.top_k(sims, k)
    # Shifting by the row maximum leaves each row's ranking unchanged and exp() finite.
    weights = jnp.exp((top_sims - top_sims[:, :1]) / temperature)
    one_hot = jax.nn.one_hot(bank_labels[top_idx], num_classes)  # [Q, k, C]
    return jnp.einsum("qk,qkc->qc", weights, one_hot)


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_scores(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    num_classes: int,
    *,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> np.ndarray:
    """[N_val, C] class votes of the k nearest training features (cosine, centred)."""
    train_x = jnp.asarray(train_x, jnp.float32)
    mean = train_x.mean(0)  # centring: uncentred cosine puts every feature in one narrow cone
    bank, bank_y = _unit(train_x - mean), jnp.asarray(train_y, jnp.int32)
    queries = _unit(jnp.asarray(val_x, jnp.float32) - mean)
    k = min(k, bank.shape[0])
    n = queries.shape[0]
    chunk = min(chunk, n)
    padded = jnp.pad(queries, ((0, -n % chunk), (0, 0)))  # one shape: one compile
    votes = [
        _knn_votes(
            bank,
            bank_y,
            padded[i : i + chunk],
            num_classes=num_classes,
            k=k,
            temperature=temperature,
        )
        for i in range(0, padded.shape[0], chunk)
    ]
    return np.asarray(jnp.concatenate(votes)[:n])


def knn(train_x, train_y, val_x, val_y, num_classes: int, **kw) -> tuple[float, float | None]:
    """(top-1, top-5 or None) percent of weighted k-NN on val."""
    scores = knn_scores(train_x, train_y, val_x, num_classes, **kw)
    top5 = topk_accuracy(scores, val_y, 5) if num_classes >= 5 else None
    return topk_accuracy(scores, val_y, 1), top5
