"""Probe (device): cuDNN attention forward and backward at the step's short shapes, and whether
padding the head dim or the sequence changes its time. Fresh inputs, median of host-timed batches."""
import json, os, time
import numpy as np, jax, jax.numpy as jnp

def timeit(f, sets, calls=30, reps=7):
    for s in sets[:2]: jax.block_until_ready(f(*s))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(calls): out = f(*sets[i % len(sets)])
        jax.block_until_ready(out); ts.append((time.perf_counter() - t) / calls)
    return float(np.median(ts)) * 1e3, float(np.max(ts) - np.min(ts)) * 1e3

def attn(q, k, v, lengths, head_dim, seq):
    """q, k, v [B, T, H, d]: padded to head_dim and seq tokens (zeros), the result cut back."""
    b, t, h, d = q.shape
    pad = ((0, 0), (0, seq - t), (0, 0), (0, head_dim - d))
    q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, scale=d ** -0.5, key_value_seq_lengths=lengths,
                                       implementation="cudnn")
    return out[:, :t, :, :d]

CASES = [  # name, B, T, H, d, real kv length range, variants (head_dim, seq), backward?
    ("target", 128, 256, 16, 80, (256, 256), [(80, 256), (128, 256)], False),
    ("context", 128, 72, 16, 80, (68, 68), [(80, 72), (80, 128), (128, 72), (64 + 32, 72)], True),
    ("predictor", 512, 128, 16, 24, (95, 122), [(24, 128), (32, 128), (64, 128)], True),
]
rows = []
for name, b, t, h, d, (lo, hi), variants, backward in CASES:
    sets = []
    for _ in range(3):
        ks = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 5)
        q, k, v, g = (jax.random.normal(kk, (b, t, h, d), jnp.bfloat16) for kk in ks[:4])
        sets.append((q, k, v, g, jax.random.randint(ks[4], (b,), lo, hi + 1)))
    ref = None
    for head_dim, seq in variants:
        fwd = jax.jit(lambda q, k, v, g, n, hd=head_dim, s=seq: attn(q, k, v, n, hd, s))
        def loss(q, k, v, g, n, hd=head_dim, s=seq):
            return jnp.vdot(attn(q, k, v, n, hd, s).astype(jnp.float32), g.astype(jnp.float32))
        both = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        try:
            out = [np.asarray(x, np.float32) for x in [fwd(*sets[0]), *both(*sets[0])]]
            assert not any(np.isnan(x).any() for x in out)
            if ref is None: ref = out
            err = max(float(np.linalg.norm(x - r) / np.linalg.norm(r)) for x, r in zip(out, ref))
            tf, sf = timeit(fwd, sets)
            tb, sb = timeit(both, sets) if backward else (float("nan"), 0.0)
        except Exception as e:
            print(name, head_dim, seq, "failed:", type(e).__name__, str(e)[:300]); continue
        r = dict(case=name, head_dim=head_dim, seq=seq, fwd_ms=tf, fwd_spread=sf, fwd_bwd_ms=tb,
                 fwd_bwd_spread=sb, err_vs_first=err)
        rows.append(r); print(r, flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "probe_attention.json"), "w"), indent=1)
print("\n| case | head dim | tokens | fwd ms | fwd+bwd ms | err vs first |")
for r in rows:
    print(f"| {r['case']} | {r['head_dim']} | {r['seq']} | {r['fwd_ms']:.3f} (±{r['fwd_spread']:.3f}) | "
          f"{r['fwd_bwd_ms']:.3f} (±{r['fwd_bwd_spread']:.3f}) | {r['err_vs_first']:.1e} |")
