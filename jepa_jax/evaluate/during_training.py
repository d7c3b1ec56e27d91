"""k-NN evaluation during training: `config.eval.every` steps, on `config.eval.*_data`.

k-NN needs no training, so it is the cheap signal to log beside the loss:

    evaluator = evaluate.periodic(config, mesh)  # None when config.eval.every == 0
    ...
    if evaluator and step % config.eval.every == 0:
        metrics.update(evaluator(net.encoder, state.target))  # {"knn_top1": ..., ...}
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from jepa_jax.evaluate import datasets, features, probes

Evaluator = Callable[[nnx.GraphDef, dict], dict]


def periodic(config, mesh: jax.sharding.Mesh | None = None) -> Evaluator | None:
    """A function (encoder graphdef, params) -> k-NN metrics, or None when evaluation is off.

    Reads the config and lists the data now, so a bad path stops the run before it trains.
    The params may be sharded any way (the training state's target encoder is).
    """
    e = config.get("eval")  # validated with the rest (configuration.validate)
    if e is None or not e.every:
        return None
    train_set, val_set = datasets.open_pair(
        e.train_data, e.val_data, flags=("config.eval.train_data", "config.eval.val_data")
    )
    mesh = mesh or features.eval_mesh()
    size, kind, classes = int(config.model.image_size), e.features, len(train_set.classes)
    compiled: dict[nnx.GraphDef, Callable] = {}

    def evaluate(graphdef: nnx.GraphDef, params: dict) -> dict[str, float]:
        if graphdef not in compiled:
            compiled[graphdef] = features.make_extract(graphdef, kind, mesh)
        start = time.perf_counter()
        train_x, val_x = (
            features.extract_features(
                compiled[graphdef],
                params,
                labelled,
                image_size=size,
                batch_size=e.batch_size,
                mesh=mesh,
            )[0]
            for labelled in (train_set, val_set)
        )
        top1, top5 = probes.knn(train_x, train_set.labels, val_x, val_set.labels, classes)
        metrics = {"knn_top1": top1}
        if top5 is not None:
            metrics["knn_top5"] = top5
        metrics["eval_s"] = float(np.round(time.perf_counter() - start, 2))
        return metrics

    return evaluate
