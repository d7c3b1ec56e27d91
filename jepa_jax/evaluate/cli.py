"""`python -m jepa_jax.evaluate`: frozen-feature linear probe and k-NN of a workdir's encoder."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

import jax

from jepa_jax import checkpoint, errors, sharding
from jepa_jax.evaluate import datasets, features, probes

USAGE = """python -m jepa_jax.evaluate --workdir=DIR --train_data=PATH --val_data=PATH
    [--which=target|context] [--random_init] [--features=avgpool|last4]
python -m jepa_jax.evaluate --write_builtin=DIR   (the built-in set as DIR/train, DIR/val)"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jepa_jax.evaluate",
        usage=USAGE,
        description="Linear probe and k-NN on frozen encoder features; the last stdout line is "
        "one JSON object, also written to DIR/eval/.",
    )
    parser.add_argument("--workdir", help="training workdir (or one of its step folders)")
    parser.add_argument("--train_data", help="root/<class>/<images>, or builtin")
    parser.add_argument(
        "--val_data", help="root/<class>/<images> with the same classes, or builtin"
    )
    parser.add_argument("--which", default="target", choices=features.ENCODERS)
    parser.add_argument(
        "--random_init",
        action="store_true",
        help="the workdir's architecture at initialisation (the baseline to read results against)",
    )
    parser.add_argument("--features", default="avgpool", choices=features.FEATURES)
    parser.add_argument("--seed", type=int, default=None, help="init seed (default: the run's)")
    parser.add_argument("--batch_size", type=int, default=256, help="global extraction batch")
    parser.add_argument("--attention", default="auto", help="auto | cudnn | xla | reference")
    parser.add_argument("--threads", type=int, default=16, help="image-reading threads")
    parser.add_argument("--probe_steps", type=int, default=2000, help="linear-probe Adam steps")
    parser.add_argument(
        "--write_builtin",
        metavar="DIR",
        help="write the built-in set as DIR/train and DIR/val, then exit",
    )
    parser.add_argument("--coordinator_address", default=None, help="multi-host: host:port")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    args = parser.parse_args(argv)
    if not args.write_builtin:
        missing = [f"--{k}" for k in ("workdir", "train_data", "val_data") if not getattr(args, k)]
        if missing:
            parser.error(f"missing {', '.join(missing)}")
    return args


def evaluate(
    workdir: str,
    train_data: str,
    val_data: str,
    *,
    which: str = "target",
    random_init: bool = False,
    kind: str = "avgpool",
    seed: int | None = None,
    batch_size: int = 256,
    attention: str = "auto",
    threads: int = 16,
    probe_steps: int = 2000,
    log=print,
) -> dict:
    """Everything `python -m jepa_jax.evaluate` does but printing: the result dict (the JSON)."""
    train_set, val_set = datasets.open_pair(train_data, val_data)
    encoder = features.load(workdir, which, random_init=random_init, attention=attention, seed=seed)
    mesh = features.eval_mesh()
    params = jax.device_put(encoder.params, sharding.replicated(mesh))
    extract = features.make_extract(encoder.graphdef, kind, mesh)
    size = int(encoder.config.model.image_size)
    feats, seconds = {}, {}
    for split, labelled in (("train", train_set), ("val", val_set)):
        feats[split], seconds[split] = features.extract_features(
            extract,
            params,
            labelled,
            image_size=size,
            batch_size=batch_size,
            mesh=mesh,
            threads=threads,
        )
        log(
            f"extracted {split}: {len(labelled)} images in {seconds[split]:.1f} s "
            f"({len(labelled) / seconds[split]:.0f} images/s, {mesh.size} devices)"
        )
    n_classes = len(train_set.classes)
    start = time.perf_counter()
    probe = probes.linear_probe(
        feats["train"], train_set.labels, feats["val"], val_set.labels, n_classes,
        steps=probe_steps,
    )  # fmt: skip
    probe_s = time.perf_counter() - start
    start = time.perf_counter()
    knn_top1, knn_top5 = probes.knn(
        feats["train"], train_set.labels, feats["val"], val_set.labels, n_classes
    )
    knn_s = time.perf_counter() - start
    m = encoder.config.model
    result = {
        "linear_top1": round(probe.top1, 2),
        "knn_top1": round(knn_top1, 2),
    }
    if n_classes >= 5:
        result.update(linear_top5=round(probe.top5, 2), knn_top5=round(knn_top5, 2))
    result.update(
        encoder=encoder.name,
        checkpoint_step=encoder.step,
        checkpoint=encoder.step_dir,
        model=f"{m.variant}/{m.patch_size} {m.image_size}px",
        features=kind,
        feature_dim=int(feats["train"].shape[1]),
        train_images=len(train_set),
        val_images=len(val_set),
        classes=n_classes,
        train_data=train_set.name,
        val_data=val_set.name,
        linear_lr=probe.lr,
        linear_weight_decay=probe.weight_decay,
        linear_holdout_top1=round(probe.holdout_top1, 2),
        knn_k=probes.KNN_K,
        knn_temperature=probes.KNN_TEMPERATURE,
        extract_images_per_s=round((len(train_set) + len(val_set)) / sum(seconds.values()), 1),
        probe_seconds=round(probe_s, 2),
        knn_seconds=round(knn_s, 2),
    )
    if random_init:
        result["init_seed"] = encoder.config.seed if seed is None else seed
    return result


def table(result: dict) -> str:
    """The human-readable summary printed above the JSON line."""
    top5 = "linear_top5" in result
    rows = [
        ("encoder", f"{result['encoder']} (step {result['checkpoint_step']}, {result['model']})"),
        ("features", f"{result['features']} ({result['feature_dim']}-d)"),
        (
            "data",
            f"train {result['train_images']} / val {result['val_images']} images, "
            f"{result['classes']} classes",
        ),
        (
            "linear probe",
            f"top-1 {result['linear_top1']:.2f}%"
            + (f"  top-5 {result['linear_top5']:.2f}%" if top5 else "")
            + f"  (lr {result['linear_lr']:g}, wd {result['linear_weight_decay']:g}: "
            f"{result['linear_holdout_top1']:.2f}% on held-out train)",
        ),
        (
            f"k-NN (k={result['knn_k']})",
            f"top-1 {result['knn_top1']:.2f}%"
            + (f"  top-5 {result['knn_top5']:.2f}%" if top5 else ""),
        ),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def output_path(workdir: str, result: dict) -> str:
    """DIR/eval/<encoder>_<features>.json (DIR the workdir, not a step folder)."""
    step_dir = result["checkpoint"]
    root = os.path.dirname(os.path.dirname(step_dir))
    if os.path.basename(os.path.dirname(step_dir)) != checkpoint.CHECKPOINT_DIR:
        root = os.path.abspath(os.path.expanduser(workdir))
    return os.path.join(root, "eval", f"{result['encoder']}_{result['features']}.json")


def write_builtin(root: str) -> None:
    """The built-in set as root/train and root/val folders (to pretrain on, or to look at)."""
    for split in ("train", "val"):
        n = datasets.write_folders(datasets.builtin(split), os.path.join(root, split))
        print(f"wrote {n} images to {os.path.join(root, split)}")


def main(argv: Sequence[str] | None = None) -> int:
    """The command; a user error (bad folder, no checkpoint ...) exits 2 with one line."""
    args = parse_args(argv)
    if args.write_builtin:
        errors.exit_on_user_error(write_builtin, args.write_builtin)
        return 0
    errors.exit_on_user_error(
        sharding.initialize_distributed,
        args.coordinator_address,
        args.num_processes,
        args.process_id,
    )
    result = errors.exit_on_user_error(
        evaluate,
        args.workdir,
        args.train_data,
        args.val_data,
        which=args.which,
        random_init=args.random_init,
        kind=args.features,
        seed=args.seed,
        batch_size=args.batch_size,
        attention=args.attention,
        threads=args.threads,
        probe_steps=args.probe_steps,
        log=print if jax.process_index() == 0 else lambda *_: None,
    )
    if jax.process_index() == 0:
        path = output_path(args.workdir, result)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(table(result))
        print(f"wrote {path}")
        print(json.dumps(result), flush=True)
    return 0
