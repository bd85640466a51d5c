"""The gated delta rule on a matrix memory per head: a per-token form for decoding, a chunked form for training.

Per token t, with decay a_t = exp(log_a_t) in (0, 1], write strength b_t in [0, 1] and (L2-normalised) key k_t:

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T        S: [dk, dv]
    o_t = S_t^T q_t                                               (read after the write)

This is the convention of the flash-linear-attention library's reference rule (state [dk, dv], keys on the rows,
the output read from the updated state), so its kernels can replace these functions later. Written as
``S <- a S;  u = b (v - S^T k);  S <- S + k u^T``, a token with a = 1, b = 0 leaves S bit-identical, which is how
the MoM layer keeps a memory untouched by the tokens not routed to it. The query is used as given: normalising
and scaling it is the caller's choice.

Chunked form (C tokens per chunk, S_0 the state entering the chunk, G_t = a_1 ... a_t within the chunk): writing
u_t = b_t (v_t - a_t S_{t-1}^T k_t), so that S_t = a_t S_{t-1} + k_t u_t^T, the u of a chunk solve one unit
lower-triangular system (the WY / UT-transform representation):

    (I + A) U = diag(b) V - diag(b G) K S_0,      A_tj = b_t (G_t / G_j) k_t.k_j   for j < t
    O   = diag(G) Q S_0 + ((Q K^T) * D) U,          D_tj = G_t / G_j               for j <= t, else 0
    S_C = G_C S_0 + (K * (G_C / G))^T U

so the work inside a chunk is matrix products and one triangular solve, and only the state crosses chunks.
All arithmetic is in float32 (or the inputs' dtype when that is float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def recurrent_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_a: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token. q, k: [B, H, dk]; v: [B, H, dv]; log_a, beta: [B, H]; state: [B, H, dk, dv].

    Returns (o [B, H, dv], the new state [B, H, dk, dv]).
    """
    state = state * log_a.exp()[..., None, None]  # a_t S_{t-1}
    u = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", state, k))  # [B, H, dv]
    state = state + k[..., :, None] * u[..., None, :]  # + k_t u_t^T
    o = torch.einsum("bhkv,bhk->bhv", state, q)  # S_t^T q_t
    return o, state


def recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_a: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token. q, k: [B, T, H, dk]; v: [B, T, H, dv]; log_a, beta: [B, T, H]; state: [B, H, dk, dv] or None
    (zeros). Returns (o [B, T, H, dv], final state [B, H, dk, dv]), both in the compute dtype.
    """
    dtype = _compute_dtype(v)
    q, k, v, log_a, beta = (x.to(dtype) for x in (q, k, v, log_a, beta))
    B, T, H, dk = k.shape
    S = q.new_zeros(B, H, dk, v.shape[-1]) if state is None else state.to(dtype)
    outs = []
    for t in range(T):
        o, S = recurrent_step(q[:, t], k[:, t], v[:, t], log_a[:, t], beta[:, t], S)
        outs.append(o)
    o = torch.stack(outs, 1) if outs else v.new_zeros(B, 0, H, v.shape[-1])  # [B, T, H, dv]
    return o, S


def _to_chunks(x: torch.Tensor, pad: int, chunk_size: int) -> torch.Tensor:
    """[B, T, H, *d] -> [B, H, n, C, *d], zero-padded at the end to n*C tokens."""
    B, T, H = x.shape[:3]
    x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, 0, 0, pad))
    x = x.reshape(B, (T + pad) // chunk_size, chunk_size, H, *x.shape[3:])
    return x.permute(0, 3, 1, 2, *range(4, x.dim()))


def chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_a: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same computation as :func:`recurrent`, chunk by chunk (same arguments and returns).

    Padding tokens (to a multiple of ``chunk_size``) have a = 1, b = 0 and zero q, k, v: they change nothing.
    """
    dtype = _compute_dtype(v)
    q, k, v, log_a, beta = (x.to(dtype) for x in (q, k, v, log_a, beta))
    B, T, H, dk = k.shape
    dv, C = v.shape[-1], chunk_size
    pad = (-T) % C
    q, k, v = (_to_chunks(x, pad, C) for x in (q, k, v))  # [B, H, n, C, d]
    log_a, beta = (_to_chunks(x[..., None], pad, C)[..., 0] for x in (log_a, beta))  # [B, H, n, C]

    gamma = log_a.cumsum(-1)  # [B, H, n, C]  log G_t within the chunk
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    log_ratio = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf"))
    decay = log_ratio.exp()  # [B, H, n, C, C]  D_tj = G_t / G_j for j <= t, else 0
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)  # [B, H, n, C, C]
    eye = torch.eye(C, dtype=dtype, device=q.device)
    w = torch.linalg.solve_triangular(eye + A, (beta * gamma.exp())[..., None] * k, upper=False, unitriangular=True)
    u0 = torch.linalg.solve_triangular(eye + A, beta[..., None] * v, upper=False, unitriangular=True)
    qk = (q @ k.transpose(-1, -2)) * decay  # [B, H, n, C, C]
    k_to_end = k * (gamma[..., -1:] - gamma).exp()[..., None]  # [B, H, n, C, dk]  k_j G_C / G_j

    S = q.new_zeros(B, H, dk, dv) if state is None else state.to(dtype)
    outs = []
    for c in range(q.shape[2]):
        u = u0[:, :, c] - w[:, :, c] @ S  # [B, H, C, dv]
        outs.append(gamma[:, :, c].exp()[..., None] * (q[:, :, c] @ S) + qk[:, :, c] @ u)  # [B, H, C, dv]
        S = gamma[:, :, c, -1].exp()[..., None, None] * S + k_to_end[:, :, c].transpose(-1, -2) @ u
    o = torch.stack(outs, 2) if outs else v.new_zeros(B, H, 0, C, dv)  # [B, H, n, C, dv]
    o = o.reshape(B, H, -1, dv)[:, :, :T].transpose(1, 2)  # [B, T, H, dv]
    return o, S
