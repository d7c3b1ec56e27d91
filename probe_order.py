"""Probe (device): the short-attention backward kernel alone, at H/14's step shapes: program
order (batch fastest, as on main, or heads fastest), input sets that fit L2 or not."""
import functools, json, os, time
import numpy as np, jax, jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jepa_jax.kernels import short_attention as sa

def timeit(f, sets, calls=40, reps=7):
    for s in sets[:2]: jax.block_until_ready(f(*s))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(calls): out = f(*sets[i % len(sets)])
        jax.block_until_ready(out); ts.append((time.perf_counter() - t) / calls)
    return round(float(np.median(ts)) * 1e3, 4), round(float(np.max(ts) - np.min(ts)) * 1e3, 4)

def heads_first(q, k, v, do, n, *, warps):
    batch, tokens, heads, head_dim = q.shape
    flat = [a.reshape(batch * tokens, heads * head_dim) for a in (q, k, v, do)]
    orig = pl.program_id
    pl.program_id = lambda i: orig(1 - i)  # trace-time swap: axis 0 is heads, 1 is batch
    try:
        anywhere = pl.BlockSpec(memory_space=pl.ANY)
        grads = pl.pallas_call(
            functools.partial(sa._kernel, tokens=tokens, head_dim=head_dim, scale=head_dim ** -0.5),
            out_shape=[jax.ShapeDtypeStruct(flat[0].shape, q.dtype)] * 3, grid=(heads, batch),
            in_specs=[anywhere] * 5, out_specs=[anywhere] * 3,
            compiler_params=plgpu.CompilerParams(num_warps=warps), name="sab_hf",
        )(*flat, n.astype(jnp.int32))
    finally:
        pl.program_id = orig
    return tuple(g.reshape(q.shape) for g in grads)

rows = []
for name, b, t, h, d, lo, hi in [("context", 128, 72, 16, 80, 68, 68), ("predictor", 512, 128, 16, 24, 95, 122)]:
    sets = []
    for _ in range(12):
        ks = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 5)
        sets.append(tuple(jax.random.normal(kk, (b, t, h, d), jnp.bfloat16) for kk in ks[:4])
                    + (jax.random.randint(ks[4], (b,), lo, hi + 1),))
    ref = jax.jit(functools.partial(sa.attention_backward, scale=d ** -0.5))(*sets[0])
    for label, f in [("main w8", jax.jit(functools.partial(sa.attention_backward, scale=d ** -0.5, warps=8))),
                     ("main w4", jax.jit(functools.partial(sa.attention_backward, scale=d ** -0.5, warps=4))),
                     ("heads-first w8", jax.jit(functools.partial(heads_first, warps=8))),
                     ("heads-first w4", jax.jit(functools.partial(heads_first, warps=4)))]:
        try:
            got = f(*sets[0])
            same = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in zip(got, ref))
            for nsets in (3, 12):
                ms, spread = timeit(f, sets[:nsets])
                rows.append(dict(case=name, variant=label, sets=nsets, ms=ms, spread=spread, max_diff_vs_main=same))
                print(rows[-1], flush=True)
        except Exception as ex:
            print(name, label, "failed", type(ex).__name__, str(ex)[:300], flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "probe_order.json"), "w"), indent=1)
print("\n| case | variant | input sets | ms | spread | max diff vs main |\n|---|---|---|---|---|---|")
for r in rows: print(f"| {r['case']} | {r['variant']} | {r['sets']} | {r['ms']} | {r['spread']} | {r['max_diff_vs_main']:.3g} |")
