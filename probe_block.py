"""Probe (issue 18): a stack of ViT-H/14 blocks, forward + backward, in several matmul variants.

bf16      the repo's block: f32 residual stream and LayerNorm, bf16 GEMMs, qkv one GEMM + unstack
split     the same, q, k, v as three GEMMs on slices of the one kernel (no unstack copies)
fp8       delayed per-tensor scaling, all three GEMMs of each Linear on FP8 operands (e4m3
          activations and weights, e5m2 output gradient); scales are inputs, amaxes come back as
          the scales' cotangents (the overwrite-with-gradient trick)
fp8_nowg  fp8 forward and input-gradient GEMMs, weight gradient in bf16

Checks each against a float32 run of the same block (relative error of the output and the
gradients), then times fwd+bwd (median of event-free wall time around block_until_ready).
"""

import collections
import functools
import glob
import gzip
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jepa_jax.bench.profile import device_kernels, fusion_bytes, kernel_table

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
F8MAX = {E4M3: 448.0, E5M2: 57344.0}
IMPL = "cudnn" if jax.default_backend() == "gpu" else "xla"


def quantize(x, scale, f8):
    return jnp.clip(x.astype(jnp.float32) / scale, -F8MAX[f8], F8MAX[f8]).astype(f8)


def amax(x):
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def _dot(a, b, contract, out):
    if os.environ.get("BF16OUT") and out == jnp.float32 and a.dtype.itemsize == 1:
        out = jnp.bfloat16
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=out)


def make_fp8_dense(wgrad_fp8: bool):
    @jax.custom_vjp
    def dense(x, w, scales):
        return _fwd(x, w, scales)[0]

    def _fwd(x, w, scales):
        sx, sw = scales[0], scales[1]
        xq, wq = quantize(x, sx, E4M3), quantize(w, sw, E4M3)
        y = _dot(xq, wq, ((x.ndim - 1,), (0,)), jnp.float32) * (sx * sw)
        saved = (xq if wgrad_fp8 else x.astype(jnp.bfloat16), wq, scales, amax(x), amax(w))
        return y.astype(jnp.bfloat16), saved

    def _bwd(saved, g):
        xs, wq, scales, ax, aw = saved
        sx, sw, sg = scales[0], scales[1], scales[2]
        gq = quantize(g, sg, E5M2)
        nd = g.ndim
        dx = (_dot(gq, wq, ((nd - 1,), (1,)), jnp.float32) * (sg * sw)).astype(jnp.bfloat16)
        lead = tuple(range(nd - 1))
        if wgrad_fp8:
            dw = _dot(xs, gq, (lead, lead), jnp.float32) * (sx * sg)
        else:
            dw = _dot(xs, g.astype(jnp.bfloat16), (lead, lead), jnp.float32)
        return dx, dw, jnp.stack([ax, aw, amax(g)])

    dense.defvjp(_fwd, _bwd)
    return dense


def layer_norm(x, g, b):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) * jax.lax.rsqrt(v + 1e-6) * g + b


@jax.custom_vjp
def gelu(x):
    xf = x.astype(jnp.float32)
    return (xf * 0.5 * (1 + jax.lax.erf(xf * math.sqrt(0.5)))).astype(x.dtype)


def _gelu_bwd(x, grad):
    xf = x.astype(jnp.float32)
    cdf = 0.5 * (1 + jax.lax.erf(xf * math.sqrt(0.5)))
    pdf = jnp.exp(-0.5 * xf * xf) / math.sqrt(2 * math.pi)
    return ((grad.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype),)


gelu.defvjp(lambda x: (gelu(x), x), _gelu_bwd)


def block(x, p, variant, heads, cdt):
    b, t, d = x.shape
    hd = d // heads

    def lin(h, name, s=None):
        w, bias = p[name + "_w"], p[name + "_b"]
        if variant.startswith("fp8"):
            dense = make_fp8_dense(variant == "fp8")
            return dense(h.astype(jnp.bfloat16), w, p[name + "_s"]) + bias.astype(jnp.bfloat16)
        return (h.astype(cdt) @ w.astype(cdt)) + bias.astype(cdt)

    h = layer_norm(x, p["n1_g"], p["n1_b"])
    if variant == "split":
        hc, wc, bc = h.astype(cdt), p["qkv_w"].astype(cdt), p["qkv_b"].astype(cdt)
        q, k, v = (
            (hc @ wc[:, i * d : (i + 1) * d] + bc[i * d : (i + 1) * d]).reshape(b, t, heads, hd)
            for i in range(3)
        )
    else:
        q, k, v = jnp.unstack(lin(h, "qkv").reshape(b, t, 3, heads, hd), axis=2)
    a = jax.nn.dot_product_attention(q, k, v, implementation=IMPL if cdt != jnp.float32 else "xla")
    x = x + lin(a.reshape(b, t, d), "proj")
    h = layer_norm(x, p["n2_g"], p["n2_b"])
    return x + lin(gelu(lin(h, "fc1")), "fc2")


def init(key, depth, d, hidden):
    shapes = {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, hidden), "fc2": (hidden, d)}
    p = {}
    keys = jax.random.split(key, 2 * len(shapes))
    for i, (n, s) in enumerate(shapes.items()):
        p[n + "_w"] = 0.02 * jax.random.normal(keys[2 * i], (depth, *s))
        p[n + "_b"] = 0.02 * jax.random.normal(keys[2 * i + 1], (depth, s[1]))
        p[n + "_s"] = jnp.ones((depth, 3), jnp.float32)
    for n in ("n1", "n2"):
        p[n + "_g"] = jnp.ones((depth, d)) + 0.1 * jax.random.normal(keys[0], (depth, d))
        p[n + "_b"] = 0.1 * jax.random.normal(keys[1], (depth, d))
    return p


def make_loss(variant, heads, cdt, depth):
    def loss(p, x):
        def step(x, layer):
            return block(x, layer, variant, heads, cdt), None

        y = jax.lax.scan(step, x, p, unroll=depth)[0]
        return jnp.mean(jnp.square(y.astype(jnp.float32))), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def scales_from_amax(p, amaxes, margin=1.0):
    """Delayed scaling: next scale = amax / f8max * 2^margin (x, w in e4m3; g in e5m2)."""
    f8max = jnp.array([F8MAX[E4M3], F8MAX[E4M3], F8MAX[E5M2]])
    out = dict(p)
    for n, a in amaxes.items():
        out[n] = jnp.maximum(a, 1e-12) / f8max * 2.0**margin
    return out


def profile(f, pv, x, variant, nbytes):
    if jax.default_backend() != "gpu":
        return {}, []
    d = f"/tmp/probe_trace/{variant}"
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(3):
            out = f(pv, x)
        jax.block_until_ready(out)
    path = max(glob.glob(d + "/**/perfetto_trace.json.gz", recursive=True), key=os.path.getmtime)
    with gzip.open(path) as fh:
        table = kernel_table(device_kernels(json.load(fh)), 3, nbytes)
    kinds = collections.Counter()
    for r in table:
        kinds[r["kind"]] += r["ms_per_step"]
    top = [(r["group"][:60], round(r["ms_per_step"], 2), r["kernels_per_step"], r["gb_per_s"] and round(r["gb_per_s"])) for r in table[:14]]
    return {k: round(v, 2) for k, v in kinds.items()}, top


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    small = jax.default_backend() != "gpu"
    depth = int(os.environ.get("DEPTH", 2 if small else 4))
    d, heads, hidden = (128, 4, 512) if small else (1280, 16, 5120)
    b, t = (4, 64) if small else (128, 256)
    key = jax.random.key(int(time.time()))
    p = init(key, depth, d, hidden)
    x = jax.random.normal(jax.random.fold_in(key, 1), (b, t, d))
    results = {}
    with jax.default_matmul_precision("highest"):
        (ref_l, ref_y), (ref_gp, ref_gx) = make_loss("bf16", heads, jnp.float32, depth)(p, x)
    wnames = [n for n in p if n.endswith("_w")]
    variants = sys.argv[1].split(",") if len(sys.argv) > 1 else ["bf16", "split", "fp8", "fp8_nowg"]
    for variant in variants:
        f = make_loss(variant, heads, jnp.bfloat16, depth)
        pv = p
        if variant.startswith("fp8"):
            # Two calibration steps: amaxes come back as the scales' gradients.
            for _ in range(2):
                _, (gp, _) = f(pv, x)
                pv = scales_from_amax(pv, {n: gp[n] for n in gp if n.endswith("_s")})
        (l, y), (gp, gx) = f(pv, x)
        err = {
            "out": rel(y, ref_y),
            "dx": rel(gx, ref_gx),
            "dw": max(rel(gp[n], ref_gp[n]) for n in wnames),
            "finite": bool(np.isfinite(np.asarray(y)).all() and np.isfinite(np.asarray(gx)).all()),
        }
        jax.block_until_ready(f(pv, x))
        times = []
        for _ in range(9):
            t0 = time.perf_counter()
            for _ in range(5):
                out = f(pv, x)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - t0) / 5 * 1e3)
        compiled = f.lower(pv, x).compile()
        hlo = compiled.as_text()
        err["f8_gemms"] = hlo.count("f8e4m3fn[") and sum(
            1 for line in hlo.splitlines() if "custom-call" in line and "f8" in line and "matmul" in line
        )
        err["kinds"], err["top"] = profile(f, pv, x, variant, fusion_bytes(hlo))
        mem = compiled.memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", 0) / 2**30 if mem else float("nan")
        results[variant] = dict(ms=float(np.median(times)), spread=float(np.ptp(times)), temp_gib=temp, **err)
        r = results[variant]
        print(f"== {variant}: {r['ms']:.2f} ms (spread {r['spread']:.2f}) f8 gemms {r['f8_gemms']} kinds {r['kinds']}", flush=True)
        for row in r["top"]:
            print("   ", row, flush=True)
    out = os.environ.get("OUT", "/tmp")
    with open(os.path.join(out, "probe_block.json"), "w") as fh:
        json.dump(dict(depth=depth, b=b, t=t, d=d, device=str(jax.devices()[0]), jax=jax.__version__, results=results), fh, indent=1)
    base = results.get("bf16", {}).get("ms")
    print(f"\n{'variant':10} {'ms':>8} {'vs bf16':>8} {'out err':>8} {'dx err':>8} {'dw err':>8} temp GiB")
    for v, r in results.items():
        ratio = base / r["ms"] if base else float("nan")
        print(f"{v:10} {r['ms']:8.2f} {ratio:8.3f} {r['out']:8.4f} {r['dx']:8.4f} {r['dw']:8.4f} {r['temp_gib']:.2f}")


if __name__ == "__main__":
    main()
