"""Probe (device): the one-tile short-sequence attention kernels (kernels/short_attention.py)
against cuDNN at the step's context and predictor shapes. Fresh inputs, float32 reference."""
import functools, json, os, time
import numpy as np, jax, jax.numpy as jnp
from jepa_jax.attention import reference_attention
from jepa_jax.kernels import short_attention as sa

def timeit(f, sets, calls=30, reps=7):
    for s in sets[:2]: jax.block_until_ready(f(*s))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(calls): out = f(*sets[i % len(sets)])
        jax.block_until_ready(out); ts.append((time.perf_counter() - t) / calls)
    return float(np.median(ts)) * 1e3, float(np.max(ts) - np.min(ts)) * 1e3

def cudnn(q, k, v, n):
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=n, implementation="cudnn")

def make(fwd_impl, bwd_warps):
    @jax.custom_vjp
    def f(q, k, v, n):
        return fwd(q, k, v, n)
    def fwd(q, k, v, n):
        if fwd_impl == "cudnn": return cudnn(q, k, v, n)
        return sa.attention_forward(q, k, v, n, scale=q.shape[-1] ** -0.5, warps=fwd_impl)
    def f_fwd(q, k, v, n): return fwd(q, k, v, n), (q, k, v, n)
    def f_bwd(res, do):
        q, k, v, n = res
        return (*sa.attention_backward(q, k, v, do, n, scale=q.shape[-1] ** -0.5, warps=bwd_warps), None)
    f.defvjp(f_fwd, f_bwd)
    return f

CASES = [("context", 128, 72, 16, 80, 68, 68), ("predictor", 512, 128, 16, 24, 95, 122)]
rows = []
for name, b, t, h, d, lo, hi in CASES:
    sets = []
    for _ in range(3):
        ks = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 5)
        q, k, v, g = (jax.random.normal(kk, (b, t, h, d), jnp.bfloat16) for kk in ks[:4])
        sets.append((q, k, v, g, jax.random.randint(ks[4], (b,), lo, hi + 1)))
    q, k, v, g, n = sets[0]
    f32 = lambda a: a.astype(jnp.float32)
    _, vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, kv_lengths=n), f32(q), f32(k), f32(v))
    want = [reference_attention(f32(q), f32(k), f32(v), kv_lengths=n), *vjp(f32(g))]
    # queries past the real length: their outputs are sliced off in the model; compare real rows
    rowmask = (jnp.arange(t)[None, :] < n[:, None])[:, :, None, None] if name == "predictor" else None
    def err(x, w, masked):
        x, w = np.asarray(f32(x), np.float64), np.asarray(w, np.float64)
        if masked is not None: x, w = x * np.asarray(masked), w * np.asarray(masked)
        assert not np.isnan(x).any(); return float(np.linalg.norm(x - w) / np.linalg.norm(w))
    variants = {"cudnn": cudnn}
    for w in (4, 8):
        variants[f"short fwd w{w}"] = w
        variants[f"cudnn fwd + short bwd w{w}"] = make("cudnn", w)
        variants[f"short fwd+bwd w{w}"] = make(w, w)
    for label, f in variants.items():
        if isinstance(f, int):
            w = f
            fw = jax.jit(lambda q, k, v, g, n, w=w: sa.attention_forward(q, k, v, n, scale=d ** -0.5, warps=w))
            try:
                e = err(fw(*sets[0]), want[0], rowmask); tf, sf = timeit(fw, sets)
            except Exception as ex:
                print(label, "failed", type(ex).__name__, str(ex)[:400]); continue
            rows.append(dict(case=name, variant=f"short fwd w{w}", fwd_ms=tf, spread=sf, err_out=e)); print(rows[-1], flush=True)
            continue
        fw = jax.jit(lambda q, k, v, g, n, f=f: f(q, k, v, n))
        def loss(q, k, v, g, n, f=f): return jnp.vdot(f32(f(q, k, v, n)), f32(g))
        both = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        try:
            out = fw(*sets[0]); grads = both(*sets[0])
            errs = [err(out, want[0], rowmask)] + [err(x, w, None) for x, w in zip(grads, want[1:])]
            tf, sf = timeit(fw, sets); tb, sb = timeit(both, sets)
        except Exception as ex:
            print(label, "failed", type(ex).__name__, str(ex)[:400]); continue
        rows.append(dict(case=name, variant=label, fwd_ms=tf, fwd_bwd_ms=tb, spread=max(sf, sb),
                         err_out=errs[0], err_dq=errs[1], err_dk=errs[2], err_dv=errs[3]))
        print(rows[-1], flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "probe_short_attention.json"), "w"), indent=1)
print("\n| case | variant | fwd ms | fwd+bwd ms | spread | err out / dq / dk / dv |")
for r in rows:
    e = " / ".join(f"{r[k]:.1e}" for k in ("err_out", "err_dq", "err_dk", "err_dv") if k in r)
    print(f"| {r['case']} | {r['variant']} | {r['fwd_ms']:.3f} | {r.get('fwd_bwd_ms', float('nan')):.3f} | {r['spread']:.3f} | {e} |")
