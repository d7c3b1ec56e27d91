"""Probe (device): the add + LayerNorm kernel against XLA's two fusions at the step's shapes.
Checks each variant against float64 on fresh inputs, times medians over rotating input sets."""
import json, os, sys, time
import numpy as np, jax, jax.numpy as jnp
from flax import nnx
from jepa_jax.kernels import add_norm as K
from jepa_jax.models import layers, vit

SHAPES = {"tiny": (64, 384)} if __import__("os").environ.get("TINY") else {"h14_target": (32768, 1280), "h14_context": (8704, 1280),
          "h14_pred": (62464, 384), "b16_target": (25088, 768)}
VARIANTS = [(br, w) for br in (1, 2, 4, 8) for w in (4, 8)]

def timeit(f, sets, calls=20, reps=7):
    jax.block_until_ready(f(*sets[0])); jax.block_until_ready(f(*sets[1]))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(calls):
            out = f(*sets[i % len(sets)])
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) / calls)
    return float(np.median(ts)) * 1e3, float(np.max(ts) - np.min(ts)) * 1e3

rows_out, res = [], {}
big = jnp.ones((256 * 1024 * 1024,), jnp.float32) * 1.5
cp, _ = timeit(jax.jit(lambda a: a * 1.0001), [(big,), (big,)])
print(f"copy ceiling: {2 * big.nbytes / cp / 1e6:.0f} GB/s"); res["copy_GBps"] = 2 * big.nbytes / cp / 1e6
del big
for name, (m, w) in SHAPES.items():
    sets = []
    for s in range(3):
        k = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 4)
        sets.append((jax.random.normal(k[0], (m, w)) * 2 + .5, jax.random.normal(k[1], (m, w), jnp.bfloat16),
                     1 + .2 * jax.random.normal(k[2], (w,)), .2 * jax.random.normal(k[3], (w,))))
    def xla(x, h, sc, b):
        norm = nnx.LayerNorm(w, epsilon=1e-6, dtype=jnp.float32, rngs=nnx.Rngs(0))
        norm.scale = nnx.Param(sc); norm.bias = nnx.Param(b)
        return layers.add_norm(norm, x, h, jnp.bfloat16, False)
    xla = jax.jit(xla)
    nbytes = m * w * 12
    x, h, sc, b = sets[0]
    s64 = np.asarray(x, np.float64) + np.asarray(h.astype(jnp.float32), np.float64)
    y64 = (s64 - s64.mean(1, keepdims=True)) / np.sqrt(s64.var(1, keepdims=True) + 1e-6) * np.asarray(sc) + np.asarray(b)
    def err(y): y = np.asarray(y.astype(jnp.float32), np.float64); assert not np.isnan(y).any(); return float(np.linalg.norm(y - y64) / np.linalg.norm(y64))
    t, spread = timeit(xla, sets)
    r = dict(shape=name, variant="xla", ms=t, spread=spread, GBps=nbytes / t / 1e6, err=err(xla(*sets[0])[1]))
    rows_out.append(r); print(r, flush=True)
    base = t
    for br, warps in VARIANTS:
        f = jax.jit(lambda x, h, sc, b, br=br, warps=warps: K.add_norm(x, h, sc, b, eps=1e-6, out_dtype=jnp.bfloat16, block_rows=br, warps=warps))
        try:
            out = f(*sets[0]); e = err(out[1]); exact = bool(jnp.array_equal(out[0], x + h.astype(jnp.float32)))
            t, spread = timeit(f, sets)
        except Exception as ex:
            print(name, br, warps, "failed", type(ex).__name__, str(ex)[:300]); continue
        r = dict(shape=name, variant=f"rows{br}_warps{warps}", ms=t, spread=spread, GBps=nbytes / t / 1e6, err=e, exact_add=exact, vs_xla=base / t)
        rows_out.append(r)
json.dump(dict(res, rows=rows_out), open(os.path.join(os.environ.get("OUT", "."), "probe_add_norm.json"), "w"), indent=1)
print("\n| shape | best variant | ms | GB/s | err | vs xla |")
for name in SHAPES:
    rs = [r for r in rows_out if r["shape"] == name]
    x = rs[0]; best = min(rs[1:], key=lambda r: r["ms"], default=None)
    print(f"| {name} | xla | {x['ms']:.4f} (±{x['spread']:.4f}) | {x['GBps']:.0f} | {x['err']:.1e} | 1 |")
    if best: print(f"| {name} | {best['variant']} | {best['ms']:.4f} (±{best['spread']:.4f}) | {best['GBps']:.0f} | {best['err']:.1e} | {best['vs_xla']:.3f} exact={best['exact_add']} |")
