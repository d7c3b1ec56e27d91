"""Probe (device): FP8 GEMMs where they avoid the transposed copies that sank the earlier tries.

(1) The target encoder's forward (no gradient): every block Linear's GEMM on e4m3 operands with
per-tensor current scaling, q-dq around an ordinary dot so that XLA's rewriter emits the FP8
GEMM. With the q/k/v kernel on (qkv stays bf16) and off (all four FP8).
(2) The context encoder forward + backward: FP8 forward and input-gradient GEMMs (e5m2 output
gradient; both operands already have the contracted axis minor), the weight gradient in bf16.

Errors against the same parameters in float32 with `highest` matmuls (xla attention), fresh
inputs. `python probe_fp8.py [--small]` (--small: ViT-Ti, CPU-sized, values only).
"""
import functools, json, os, sys, time
import numpy as np, jax, jax.numpy as jnp
from flax import nnx
from jepa_jax.models import create

SMALL = "--small" in sys.argv
NAME, BATCH, CONTEXT = ("vit_t16", 4, 40) if SMALL else ("vit_h14", 128, 68)
E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


def qdq(x, f8):
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    scale = jnp.maximum(amax, jnp.finfo(jnp.float32).tiny) / float(jnp.finfo(f8).max)
    return (x.astype(jnp.float32) / scale).astype(f8).astype(x.dtype) * scale.astype(x.dtype)


def _mm(x, w):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=x.dtype)


def fp8_forward(lhs, rhs, dims, precision=None, **kw):
    return _mm(qdq(lhs, E4M3), qdq(rhs, E4M3))


@jax.custom_vjp
def fp8_fwd_dx(x, w):
    return _mm(qdq(x, E4M3), qdq(w, E4M3))


def _fwd(x, w):
    return fp8_fwd_dx(x, w), (x, w)


def _bwd(res, g):
    x, w = res
    dx = jax.lax.dot_general(qdq(g, E5M2), qdq(w, E4M3), (((g.ndim - 1,), (1,)), ((), ())),
                             preferred_element_type=x.dtype)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    return dx, jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), preferred_element_type=w.dtype)


fp8_fwd_dx.defvjp(_fwd, _bwd)


def fp8_fwd_dx_general(lhs, rhs, dims, precision=None, **kw):
    return fp8_fwd_dx(lhs, rhs)


def set_dot(encoder, fn):
    n = 0
    for path, m in nnx.iter_graph(encoder.blocks):
        if isinstance(m, nnx.Linear):
            m.dot_general = fn; n += 1
    return n


def timeit(f, args_sets, reps=7, calls=10):
    out = f(*args_sets[0]); jax.block_until_ready(out)
    for a in args_sets: jax.block_until_ready(f(*a))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(calls):
            out = f(*args_sets[i % len(args_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / calls * 1e3)
    return float(np.median(times)), float(max(times) - min(times))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fp8_gemms(f, *a):
    hlo = f.lower(*a).compile().as_text()
    return hlo.count("f8e4m3fn") > 0 and sum(1 for l in hlo.splitlines() if "cublas$lt$matmul$f8" in l)


def main():
    out_dir = os.environ.get("OUT", "/tmp")
    rng = np.random.default_rng()
    side = 224
    imgs = [jnp.asarray(rng.standard_normal((BATCH, side, side, 3)), jnp.float32) for _ in range(3)]
    tok = [jnp.asarray(np.sort(np.stack([rng.permutation(256 if not SMALL else 196)[:CONTEXT] for _ in range(BATCH)]), 1), jnp.int32) for _ in range(3)]
    cot = [jnp.asarray(rng.standard_normal((BATCH, CONTEXT, 1280 if not SMALL else 192)), jnp.float32) for _ in range(3)]
    attn = "xla" if SMALL else "cudnn"
    ref = create(NAME, attention="xla", dtype="float32", fused_qkv="off").encoder
    rows = []

    @jax.jit
    def ref_fwd(params, x):
        with jax.default_matmul_precision("highest"):
            return nnx.merge(gd_ref, params)(x)
    gd_ref, p_ref = nnx.split(ref)
    want = ref_fwd(p_ref, imgs[0])

    def ref_grads(params, x, t, c):
        def loss(p):
            return jnp.sum(nnx.merge(gd_ref, p)(x, t) * c)
        with jax.default_matmul_precision("highest"):
            return jax.grad(loss)(params)
    want_g = jax.jit(ref_grads)(p_ref, imgs[0], tok[0], cot[0])
    want_g = np.concatenate([np.ravel(v) for v in jax.tree.leaves(want_g)])

    for fused in ("on", "off"):
        if SMALL and fused == "on":
            continue
        for variant in ("bf16", "fp8"):
            enc = create(NAME, attention=attn, fused_qkv=fused).encoder
            if variant == "fp8":
                set_dot(enc, fp8_forward)
            gd, params = nnx.split(enc)
            fwd = jax.jit(lambda p, x: nnx.merge(gd, p)(x))
            ms, spread = timeit(fwd, [(params, x) for x in imgs])
            err = rel(fwd(params, imgs[0]), want)
            rows.append(dict(part="target forward", qkv_kernel=fused, variant=variant, ms=ms, spread=spread, error=err,
                             fp8_gemms=fp8_gemms(fwd, params, imgs[0])))
            print(rows[-1], flush=True)
        for variant in ("bf16", "fp8 fwd+dx"):
            enc = create(NAME, attention=attn, fused_qkv=fused).encoder
            if variant != "bf16":
                set_dot(enc, fp8_fwd_dx_general)
            gd, params = nnx.split(enc)

            def grads(p, x, t, c, gd=gd):
                return jax.grad(lambda p: jnp.sum(nnx.merge(gd, p)(x, t) * c))(p)
            g = jax.jit(grads)
            ms, spread = timeit(g, [(params, imgs[i], tok[i], cot[i]) for i in range(3)])
            got = np.concatenate([np.ravel(v) for v in jax.tree.leaves(g(params, imgs[0], tok[0], cot[0]))])
            rows.append(dict(part="context fwd+bwd", qkv_kernel=fused, variant=variant, ms=ms, spread=spread,
                             error=rel(got, want_g), fp8_gemms=fp8_gemms(g, params, imgs[0], tok[0], cot[0])))
            print(rows[-1], flush=True)
    json.dump(dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, rows=rows),
              open(os.path.join(out_dir, "probe_fp8.json"), "w"), indent=1)
    print("\n| part | q/k/v kernel | variant | ms | spread | rel. error vs f32 | FP8 GEMMs |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['part']} | {r['qkv_kernel']} | {r['variant']} | {r['ms']:.2f} | {r['spread']:.2f} | {r['error']:.2e} | {r['fp8_gemms']} |")


if __name__ == "__main__":
    main()
