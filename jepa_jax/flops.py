"""Matmul FLOPs of one I-JEPA training step per image, by part (for MFU and the breakdown)."""

from __future__ import annotations


def _block_flops(tokens: float, width: int, mlp_hidden: int, out: float | None = None) -> float:
    """Forward matmul FLOPs of one transformer block over `tokens` tokens, of which the block
    computes past attention only its `out` output rows (all by default)."""
    t, d = tokens, width
    o = t if out is None else out
    qkv, scores_values, proj, mlp = (
        2 * t * d * 3 * d,
        2 * 2 * t * t * d,
        2 * o * d * d,
        2 * 2 * o * d * mlp_hidden,
    )
    return qkv + scores_values + proj + mlp


def flops_per_image(config, spec, target_tokens: float | None = None) -> float:
    """Matmul FLOPs of one training step per image: the sum of `step_flops_by_part`."""
    return float(sum(step_flops_by_part(config, spec, target_tokens).values()))


def step_flops_by_part(config, spec, target_tokens: float | None = None) -> dict[str, float]:
    """Per image and step, by part (2*m*n*k per matmul; norms etc. ignored).

    With N = grid tokens, Kc = spec.num_context, Kt = spec.max_target (or `target_tokens`),
    M targets, block(T, D, F) = 2*T*D*3D + 4*T^2*D + 2*T*D*D + 4*T*D*F:
      target encoder, forward only:   E(N) + L*block(N, D, F),   E(T) = 2*T*(3*p^2)*D embed
      context encoder, fwd + bwd:     2*E(Kc) + 3*L*block(Kc, D, F)
        (only the kept patches are embedded; images need no gradient, so the embed's
        backward is the weight gradient alone: 1x, not 2x)
      predictor, fwd + bwd:           3 * [2*Kc*D*Dp + M*(S + 2*Kt*Dp*D)],
        S = (Lp - 1)*block(Kc+Kt, Dp, 4*Dp) + the last block with proj and MLP on the Kt rows
        read out (its input embed runs once per image, before the M sequences are formed)
    Padded target tokens are executed work, so Kt = max_target counts them.
    """
    from jepa_jax.models import encoder_size

    size, m = encoder_size(config.model), config.model
    n, p = spec.grid[0] * spec.grid[1], m.patch_size
    kc = spec.num_context
    kt = spec.max_target if target_tokens is None else target_tokens
    embed_per_token = 2 * 3 * p * p * size.width
    target = n * embed_per_token + size.depth * _block_flops(n, size.width, size.mlp_hidden)
    context = 2 * kc * embed_per_token
    context += 3 * size.depth * _block_flops(kc, size.width, size.mlp_hidden)
    sequences = (m.pred_depth - 1) * _block_flops(kc + kt, m.pred_dim, 4 * m.pred_dim)
    sequences += _block_flops(kc + kt, m.pred_dim, 4 * m.pred_dim, out=kt)
    sequences += 2 * kt * m.pred_dim * size.width
    predictor = 2 * kc * size.width * m.pred_dim + spec.num_targets * sequences
    return {"target": target, "context": context, "predictor": 3 * predictor}
