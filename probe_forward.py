"""Probe (device, next session): (1) a one-tile forward with programs heads-fastest against
cuDNN's forward; (2) the backward with several heads per program. H/14's context and predictor
shapes, fresh inputs, float32 reference. `python probe_forward.py --cpu` checks values only, in
Pallas' interpreter, at small shapes."""
import functools, json, os, sys, time
import numpy as np, jax, jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jepa_jax.attention import reference_attention
from jepa_jax.kernels import short_attention as sa

CPU = "--cpu" in sys.argv
P2 = sa._next_power_of_two

def slab(b, h, tokens, head_dim):
    t, d = jnp.arange(P2(tokens)), jnp.arange(P2(head_dim))
    mask = (t[:, None] < tokens) & (d[None, :] < head_dim)
    at = (b * tokens + t[:, None], h * head_dim + d[None, :])
    return at, mask, lambda ref: plgpu.load(ref.at[at], mask=mask, other=0.0)

def probs(q, k, length, tokens, scale):
    logits = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(jnp.arange(P2(tokens))[None, :] < length, logits, jnp.finfo(jnp.float32).min)
    p = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
    return p / jnp.sum(p, axis=1, keepdims=True)

def fwd_body(q_ref, k_ref, v_ref, len_ref, o_ref, *, tokens, head_dim, scale, hp):
    g, b = pl.program_id(0), pl.program_id(1)
    length = plgpu.load(len_ref.at[b])
    for j in range(hp):
        at, mask, load = slab(b, g * hp + j, tokens, head_dim)
        q, k, v = load(q_ref), load(k_ref), load(v_ref)
        o = jnp.dot(probs(q, k, length, tokens, scale).astype(v.dtype), v, preferred_element_type=jnp.float32)
        plgpu.store(o_ref.at[at], o.astype(o_ref.dtype), mask=mask)

def bwd_body(q_ref, k_ref, v_ref, do_ref, len_ref, dq_ref, dk_ref, dv_ref, *, tokens, head_dim, scale, hp):
    g, b = pl.program_id(0), pl.program_id(1)
    length = plgpu.load(len_ref.at[b])
    for j in range(hp):
        at, mask, load = slab(b, g * hp + j, tokens, head_dim)
        q, k, v, do = load(q_ref), load(k_ref), load(v_ref), load(do_ref)
        p = probs(q, k, length, tokens, scale)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = (p * (dp - jnp.sum(p * dp, axis=1, keepdims=True))).astype(q.dtype)
        grads = (jnp.dot(ds, k, preferred_element_type=jnp.float32) * scale,
                 jnp.dot(ds.T, q, preferred_element_type=jnp.float32) * scale,
                 jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32))
        for ref, grad in zip((dq_ref, dk_ref, dv_ref), grads):
            plgpu.store(ref.at[at], grad.astype(ref.dtype), mask=mask)

@functools.partial(jax.jit, static_argnames=("backward", "hp", "warps"))
def call(*args, backward, hp, warps):
    q = args[0]; n = args[-1]
    batch, tokens, heads, head_dim = q.shape
    flat = [a.reshape(batch * tokens, heads * head_dim) for a in args[:-1]]
    body = bwd_body if backward else fwd_body
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    outs = pl.pallas_call(
        functools.partial(body, tokens=tokens, head_dim=head_dim, scale=head_dim ** -0.5, hp=hp),
        out_shape=[jax.ShapeDtypeStruct(flat[0].shape, q.dtype)] * (3 if backward else 1),
        grid=(heads // hp, batch), in_specs=[anywhere] * (len(flat) + 1),
        out_specs=[anywhere] * (3 if backward else 1),
        compiler_params=plgpu.CompilerParams(num_warps=warps), interpret=CPU,
    )(*flat, n.astype(jnp.int32))
    return tuple(o.reshape(q.shape) for o in outs)

def timeit(f, sets, calls=40, reps=7):
    for s in sets[:2]: jax.block_until_ready(f(*s))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(calls): out = f(*sets[i % len(sets)])
        jax.block_until_ready(out); ts.append((time.perf_counter() - t) / calls)
    return round(float(np.median(ts)) * 1e3, 4), round(float(np.max(ts) - np.min(ts)) * 1e3, 4)

def rel(x, w, rowmask=None):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    assert not np.isnan(x).any()
    if rowmask is not None: x, w = x * rowmask, w * rowmask
    return float(np.linalg.norm(x - w) / np.linalg.norm(w))

CASES = ([("context", 4, 12, 4, 80, 9, 9), ("predictor", 4, 20, 4, 24, 11, 17)] if CPU else
         [("context", 128, 72, 16, 80, 68, 68), ("predictor", 512, 128, 16, 24, 95, 122)])
rows = []
for name, b, t, h, d, lo, hi in CASES:
    sets = []
    for _ in range(3):
        ks = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 5)
        sets.append(tuple(jax.random.normal(kk, (b, t, h, d), jnp.bfloat16) for kk in ks[:4])
                    + (jax.random.randint(ks[4], (b,), lo, hi + 1),))
    q, k, v, g, n = sets[0]
    f32 = [a.astype(jnp.float32) for a in (q, k, v, g)]
    out, vjp = jax.vjp(lambda *a: reference_attention(*a, kv_lengths=n), *f32[:3])
    want = [out, *vjp(f32[3])]
    rowmask = np.asarray(jnp.arange(t)[None, :] < n[:, None])[:, :, None, None]  # real query rows
    variants = [] if CPU else [("cuDNN forward", False, jax.jit(lambda q, k, v, g, n: (
        jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=n, implementation="cudnn"),)))]
    for hp in (1, 2, 4):
        for w in ((4,) if CPU else (4, 8)):
            variants.append((f"kernel forward, {hp} heads/program, {w} warps", False,
                             jax.jit(lambda q, k, v, g, n, hp=hp, w=w: call(q, k, v, n, backward=False, hp=hp, warps=w))))
            variants.append((f"kernel backward, {hp} heads/program, {w} warps", True,
                             jax.jit(lambda q, k, v, g, n, hp=hp, w=w: call(q, k, v, g, n, backward=True, hp=hp, warps=w))))
    for label, backward, f in variants:
        try:
            got = f(*sets[0])
            errs = ([rel(x, y) for x, y in zip(got, want[1:])] if backward
                    else [rel(got[0], want[0], rowmask)])
            ms, spread = (None, None) if CPU else timeit(f, sets)
        except Exception as ex:
            print(name, label, "failed", type(ex).__name__, str(ex)[:300], flush=True); continue
        rows.append(dict(case=name, variant=label, ms=ms, spread=spread, errors=[f"{e:.1e}" for e in errs]))
        print(rows[-1], flush=True)
        if CPU: assert max(errs) < 2e-2, (label, errs)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "probe_forward.json"), "w"), indent=1)
print("\n| case | variant | ms | spread | errors (out, or dq / dk / dv) |\n|---|---|---|---|---|")
for r in rows: print(f"| {r['case']} | {r['variant']} | {r['ms']} | {r['spread']} | {' / '.join(r['errors'])} |")
