"""The MoM (Mixture-of-Memories, arXiv 2502.13685) token mixer in plain PyTorch; Gated DeltaNet as its M = 1 case.

Per token x_t [D], with H heads, M routed memories (+ one shared memory that sees every token when configured):

    p_t = softmax(W_r x_t)  [M];  top-k of p_t, renormalised to sum 1 -> g_t (zero off the top-k)
    q_t = l2norm(silu(conv(W_q x_t))) / sqrt(dk)                       shared by every memory
    k_t^m = l2norm(silu(conv(W_k^m x_t))),  v_t^m = silu(conv(W_v^m x_t))
    a_t^m = exp(-exp(A_log^m) softplus(W_a^m x_t + dt_bias^m)),  b_t^m = sigmoid(W_b^m x_t)
    memory m at token t, if in the top-k or shared: the gated delta rule (rule.py); else a = 1, b = 0 (unchanged)
    o_t = sum_m g_t^m (S_t^m)^T q_t  (+ (S_t^shared)^T q_t)
    y_t = W_o (RMSNorm(o_t) * silu(W_g x_t))                            (norm per head over dv)

The short causal convolutions (depthwise, kernel ``conv_size``) run over the whole token stream, so their caches
depend on the input only; the memories' matrix states are what routing protects. Every memory is computed at every
token and masked (simple and exact on CPU; kernels that gather the routed tokens can replace it).

Load balancing (Switch Transformer): aux = M * sum_m f_m P_m, with f_m the fraction of the top-k assignments that go
to memory m (not differentiable) and P_m the mean router probability of m, over the tokens of the call.

    layer = MoMLayer(MoMConfig(hidden_size=64))
    out = layer(x)                        # x [B, T, D] -> out.hidden [B, T, D], out.aux_loss, out.state
    step = layer(x_next, state=out.state) # decoding: x_next [B, 1, D] continues where x ended
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mlpmem.errors import UsageError
from mlpmem.lm.mom import kernels


@dataclass
class MoMConfig:
    """Sizes of one MoM layer. ``num_memories=1, topk=1, shared_memory=False`` is Gated DeltaNet."""

    hidden_size: int  # D, the model width
    num_heads: int = 4  # H
    head_k_dim: int = 16  # dk, the key/query width per head
    head_v_dim: int = 32  # dv, the value width per head
    num_memories: int = 4  # M, routed memories (1: no router)
    topk: int = 2  # memories each token writes to and reads from
    shared_memory: bool = True  # one more memory that every token writes to and reads from
    conv_size: int = 4  # kernel of the short causal convolutions on q, k, v (tokens)
    chunk_size: int = 64  # tokens per chunk in the chunked (training) form
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        problems = [
            (name, f"must be >= 1, got {getattr(self, name)}")
            for name in ("hidden_size", "num_heads", "head_k_dim", "head_v_dim", "num_memories", "conv_size")
            if getattr(self, name) < 1
        ]
        if self.chunk_size < 1:
            problems.append(("chunk_size", f"must be >= 1, got {self.chunk_size}"))
        if not 1 <= self.topk <= self.num_memories:
            problems.append(("topk", f"must be in 1..num_memories ({self.num_memories}), got {self.topk}"))
        if problems:
            raise UsageError("; ".join(f"{name}: {why}" for name, why in problems), field=problems[0][0])

    @classmethod
    def gated_deltanet(cls, hidden_size: int, **sizes) -> MoMConfig:
        """Gated DeltaNet: one memory, every token routed to it, no router, no shared memory."""
        return cls(hidden_size=hidden_size, num_memories=1, topk=1, shared_memory=False, **sizes)

    @property
    def num_slots(self) -> int:
        """Memories holding a state: the routed ones, then the shared one."""
        return self.num_memories + int(self.shared_memory)


@dataclass
class MoMState:
    """What per-token decoding carries from one call to the next."""

    q_conv: torch.Tensor  # [B, conv_size - 1, H*dk]  last inputs of the q convolution
    k_conv: torch.Tensor  # [B, conv_size - 1, slots*H*dk]
    v_conv: torch.Tensor  # [B, conv_size - 1, slots*H*dv]
    memory: (
        torch.Tensor
    )  # [B, slots, H, dk, dv]  float32 (float64 for a float64 input); slot index = memory index, the shared one last


@dataclass
class MoMOutput:
    hidden: torch.Tensor  # [B, T, D]
    state: MoMState
    aux_loss: torch.Tensor  # [] load-balancing loss (0 without a router)
    routed: torch.Tensor  # [B, T, M] bool: memory m written and read at token t
    router_logits: torch.Tensor | None  # [B, T, M]


def load_balancing_loss(router_logits: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer auxiliary loss M * sum_m f_m P_m; 1 at perfect balance.

    router_logits: [..., M]; routed: [..., M] bool (the top-k choice). f_m = routed tokens of m / all assignments,
    P_m = mean softmax probability of m. d aux / d logit_{t,i} = (M / N) p_{t,i} (f_i - sum_m f_m p_{t,m}).
    """
    M = router_logits.shape[-1]
    probs = (
        router_logits.to(torch.promote_types(router_logits.dtype, torch.float32)).softmax(-1).reshape(-1, M)
    )  # [N, M]
    counts = routed.reshape(-1, M).to(probs.dtype).sum(0)  # [M]
    f = counts / counts.sum().clamp_min(1)
    return M * (f * probs.mean(0)).sum()


class ShortConv(nn.Module):
    """Depthwise causal convolution over tokens, then SiLU; the last ``kernel_size - 1`` inputs are its cache."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, bias=False)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, dim]; cache: [B, kernel_size - 1, dim] or None (zeros). Returns (y [B, T, dim], new cache)."""
        K = self.conv.kernel_size[0]
        if cache is None:
            cache = x.new_zeros(x.shape[0], K - 1, x.shape[2])
        xx = torch.cat([cache.to(x.dtype), x], 1)  # [B, K-1+T, dim]
        if x.shape[1] == 1:  # a decoding step: one weighted sum (a conv call costs ~20x more at this size)
            y = (xx * self.conv.weight[:, 0].t()).sum(1, keepdim=True)  # [B, 1, dim]
        else:
            y = F.conv1d(xx.transpose(1, 2), self.conv.weight, groups=x.shape[2]).transpose(1, 2)  # [B, T, dim]
        return F.silu(y), xx[:, xx.shape[1] - (K - 1) :]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MoMLayer(nn.Module):
    """The token mixer of one MoM (or Gated DeltaNet) block: [B, T, D] -> [B, T, D], with a decoding state."""

    def __init__(self, config: MoMConfig):
        super().__init__()
        self.config = c = config
        D, H, dk, dv, S = c.hidden_size, c.num_heads, c.head_k_dim, c.head_v_dim, c.num_slots
        self.router = nn.Linear(D, c.num_memories, bias=False) if c.num_memories > 1 else None
        self.q_proj = nn.Linear(D, H * dk, bias=False)
        # per-memory projections stacked by rows: rows [s*H*d, (s+1)*H*d) belong to slot s
        self.k_proj = nn.Linear(D, S * H * dk, bias=False)
        self.v_proj = nn.Linear(D, S * H * dv, bias=False)
        self.a_proj = nn.Linear(D, S * H, bias=False)
        self.b_proj = nn.Linear(D, S * H, bias=False)
        self.A_log = nn.Parameter(torch.empty(S, H).uniform_(1, 16).log())  # decay rate, as in Mamba2
        dt = torch.empty(S, H).uniform_(math.log(1e-3), math.log(1e-1)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.q_conv = ShortConv(H * dk, c.conv_size)
        self.k_conv = ShortConv(S * H * dk, c.conv_size)
        self.v_conv = ShortConv(S * H * dv, c.conv_size)
        self.g_proj = nn.Linear(D, H * dv, bias=False)
        self.o_norm = RMSNorm(dv, c.norm_eps)
        self.o_proj = nn.Linear(H * dv, D, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x: [B, T, D] -> (weights g [B, T, M] zero off the top-k, routed [B, T, M] bool, logits [B, T, M] | None)."""
        B, T, _ = x.shape
        if self.router is None:
            return x.new_ones(B, T, 1), torch.ones(B, T, 1, dtype=torch.bool, device=x.device), None
        logits = self.router(x)  # [B, T, M]
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)  # [B, T, M]
        top_p, top_i = probs.topk(self.config.topk, dim=-1)  # [B, T, k]
        weights = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
        routed = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top_i, True)
        return weights, routed, logits

    def forward(
        self,
        x: torch.Tensor,
        state: MoMState | None = None,
        mode: Literal["auto", "chunk", "recurrent"] = "auto",
        kernel: Literal["auto", "plain"] = "auto",
    ) -> MoMOutput:
        """x: [B, T, D]; ``state`` continues a sequence (decoding). ``mode``: "auto" is recurrent for T == 1.
        ``kernel``: "auto" runs the flash-linear-attention kernels on CUDA when installed (``kernels``), "plain" the
        PyTorch forms of ``rule``."""
        c = self.config
        B, T, _ = x.shape
        H, dk, dv, S, M = c.num_heads, c.head_k_dim, c.head_v_dim, c.num_slots, c.num_memories
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32  # the memories' dtype
        weights, routed, logits = self.route(x)
        aux = load_balancing_loss(logits, routed) if logits is not None else x.new_zeros((), dtype=torch.float32)

        q, q_cache = self.q_conv(self.q_proj(x), state.q_conv if state is not None else None)  # [B, T, H*dk]
        k, k_cache = self.k_conv(self.k_proj(x), state.k_conv if state is not None else None)  # [B, T, S*H*dk]
        v, v_cache = self.v_conv(self.v_proj(x), state.v_conv if state is not None else None)  # [B, T, S*H*dv]
        q = F.normalize(q.view(B, T, 1, H, dk).to(cdt), dim=-1) / math.sqrt(dk)
        k = F.normalize(k.view(B, T, S, H, dk).to(cdt), dim=-1)
        v = v.view(B, T, S, H, dv).to(cdt)
        log_a = -self.A_log.exp() * F.softplus(self.a_proj(x).view(B, T, S, H).to(cdt) + self.dt_bias)  # [B,T,S,H]
        beta = self.b_proj(x).view(B, T, S, H).to(cdt).sigmoid()  # [B, T, S, H]

        active = torch.cat([routed, routed.new_ones(B, T, S - M)], -1)[..., None]  # [B, T, S, 1]: shared always
        log_a = torch.where(active, log_a, torch.zeros_like(log_a))  # unrouted: a = 1
        beta = torch.where(active, beta, torch.zeros_like(beta))  # unrouted: b = 0

        fold = lambda t: t.reshape(B, T, S * H, *t.shape[4:])  # slots folded into heads
        memory = state.memory.reshape(B, S * H, dk, dv) if state is not None else None
        use_recurrent = mode == "recurrent" or (mode == "auto" and T == 1)
        q_all = q.expand(B, T, S, H, dk)
        o, memory = kernels.gated_delta_rule(
            fold(q_all), fold(k), fold(v), fold(log_a), fold(beta), memory, use_recurrent, c.chunk_size, kernel
        )

        mix = torch.cat([weights, weights.new_ones(B, T, S - M)], -1).to(
            cdt
        )  # [B, T, S]: g_t, and 1 for the shared one
        o = (o.view(B, T, S, H, dv) * mix[..., None, None]).sum(2)  # [B, T, H, dv]
        o = self.o_norm(o) * F.silu(self.g_proj(x).view(B, T, H, dv).to(cdt))
        hidden = self.o_proj(o.reshape(B, T, H * dv).to(x.dtype))  # [B, T, D]
        new_state = MoMState(q_cache, k_cache, v_cache, memory.view(B, S, H, dk, dv))
        return MoMOutput(hidden=hidden, state=new_state, aux_loss=aux, routed=routed, router_logits=logits)
