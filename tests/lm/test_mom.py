"""The MoM layer and its gated delta rule, each against a reference written here from the equations.

PYTHONPATH=src python -m pytest -q tests/lm/test_mom.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlpmem.errors import UsageError
from mlpmem.lm.mom import rule
from mlpmem.lm.mom.layer import MoMConfig, MoMLayer, load_balancing_loss

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap

SIZES = dict(num_heads=2, head_k_dim=4, head_v_dim=3, chunk_size=4)
CONFIGS = {
    "mom": lambda: MoMConfig(hidden_size=8, num_memories=4, topk=2, shared_memory=True, **SIZES),
    "mom-unshared-top1": lambda: MoMConfig(hidden_size=8, num_memories=3, topk=1, shared_memory=False, **SIZES),
    "gated-deltanet": lambda: MoMConfig.gated_deltanet(hidden_size=8, **SIZES),
}


def rule_inputs(B=2, T=13, H=3, dk=5, dv=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, dk, generator=g, dtype=dtype)  # [B, T, H, dk]
    k = F.normalize(torch.randn(B, T, H, dk, generator=g, dtype=dtype), dim=-1)  # [B, T, H, dk]
    v = torch.randn(B, T, H, dv, generator=g, dtype=dtype)  # [B, T, H, dv]
    log_a = -torch.rand(B, T, H, generator=g, dtype=dtype)  # [B, T, H]  a in (e^-1, 1]
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)  # [B, T, H]
    state = torch.randn(B, H, dk, dv, generator=g, dtype=dtype)  # [B, H, dk, dv]
    return q, k, v, log_a, beta, state


def naive_rule(q, k, v, log_a, beta, state):
    """S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T; o_t = S_t^T q_t, one (batch, head) at a time."""
    B, T, H, dk = k.shape
    o = torch.zeros(B, T, H, v.shape[-1], dtype=v.dtype)
    S = state.clone()
    eye = torch.eye(dk, dtype=k.dtype)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                kt = k[b, t, h]
                a, bt = log_a[b, t, h].exp(), beta[b, t, h]
                S[b, h] = a * (eye - bt * torch.outer(kt, kt)) @ S[b, h] + bt * torch.outer(kt, v[b, t, h])
                o[b, t, h] = S[b, h].T @ q[b, t, h]
    return o, S


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 16])
def test_chunked_equals_recurrent_equals_naive_rule(chunk_size):
    inputs = rule_inputs()
    o_ref, s_ref = naive_rule(*inputs)
    o_rec, s_rec = rule.recurrent(*inputs)
    o_chk, s_chk = rule.chunked(*inputs, chunk_size=chunk_size)
    for o, s in ((o_rec, s_rec), (o_chk, s_chk)):
        torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_rule_from_zero_state_and_gradients_agree():
    q, k, v, log_a, beta, _ = rule_inputs(T=9)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_a, beta)]
    grads = []
    for fn in (rule.recurrent, lambda *a: rule.chunked(*a, chunk_size=4)):
        o, s = fn(*leaves)
        (o.square().sum() + s.sin().sum()).backward()
        grads.append([t.grad.clone() for t in leaves])
        for t in leaves:
            t.grad = None
    o_ref, _ = naive_rule(q, k, v, log_a, beta, torch.zeros(2, 3, 5, 4, dtype=torch.float64))
    torch.testing.assert_close(rule.chunked(q, k, v, log_a, beta, chunk_size=4)[0], o_ref, rtol=1e-10, atol=1e-10)
    for g_rec, g_chk in zip(*grads):
        torch.testing.assert_close(g_chk, g_rec, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_a_token_with_a_1_b_0_leaves_the_state_bit_identical(form):
    q, k, v, log_a, beta, state = rule_inputs(dtype=torch.float32)
    log_a[:, :, 1], beta[:, :, 1] = 0.0, 0.0  # head 1 never written
    fn = rule.recurrent if form == "recurrent" else lambda *a: rule.chunked(*a, chunk_size=4)
    _, final = fn(q, k, v, log_a, beta, state)
    assert torch.equal(final[:, 1], state[:, 1])
    assert not torch.equal(final[:, 0], state[:, 0])


def make_layer(name, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return MoMLayer(CONFIGS[name]()).to(dtype)


def naive_layer(layer, x):
    """The layer's equations token by token, from its parameters (module docstring of mlpmem.lm.mom.layer)."""
    c = layer.config
    B, T, D = x.shape
    H, dk, dv, M, S, K = c.num_heads, c.head_k_dim, c.head_v_dim, c.num_memories, c.num_slots, c.conv_size
    out = torch.zeros(B, T, D, dtype=x.dtype)
    eye = torch.eye(dk, dtype=x.dtype)

    def conv(proj, conv, b, t):  # silu(sum_i w_i W x_{t-i}), zero before the first token
        w = conv.conv.weight[:, 0, :]  # [dim, K]; the last tap multiplies the current token
        acc = sum(w[:, K - 1 - i] * (proj.weight @ x[b, t - i]) for i in range(K) if t - i >= 0)
        return F.silu(acc)

    for b in range(B):
        mem = torch.zeros(S, H, dk, dv, dtype=x.dtype)
        for t in range(T):
            xt = x[b, t]
            if layer.router is None:
                g = {0: 1.0}
            else:
                p = (layer.router.weight @ xt).softmax(-1)  # [M]
                chosen = sorted(range(M), key=lambda m: -p[m].item())[: c.topk]
                g = {m: p[m] / sum(p[j] for j in chosen) for m in chosen}
            if c.shared_memory:
                g[M] = 1.0
            q = F.normalize(conv(layer.q_proj, layer.q_conv, b, t).view(H, dk), dim=-1) / dk**0.5
            k = F.normalize(conv(layer.k_proj, layer.k_conv, b, t).view(S, H, dk), dim=-1)
            v = conv(layer.v_proj, layer.v_conv, b, t).view(S, H, dv)
            a = torch.exp(-layer.A_log.exp() * F.softplus((layer.a_proj.weight @ xt).view(S, H) + layer.dt_bias))
            beta = (layer.b_proj.weight @ xt).view(S, H).sigmoid()
            o = torch.zeros(H, dv, dtype=x.dtype)
            for s, gs in g.items():
                for h in range(H):
                    kk = k[s, h]
                    mem[s, h] = a[s, h] * (eye - beta[s, h] * torch.outer(kk, kk)) @ mem[s, h]
                    mem[s, h] += beta[s, h] * torch.outer(kk, v[s, h])
                    o[h] += gs * mem[s, h].T @ q[h]
            o = o / (o.square().mean(-1, keepdim=True) + c.norm_eps).sqrt() * layer.o_norm.weight  # [H, dv]
            o = o * F.silu((layer.g_proj.weight @ xt).view(H, dv))
            out[b, t] = layer.o_proj.weight @ o.reshape(-1)
    return out


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_equals_naive_per_token_loop(name, mode):
    layer = make_layer(name)
    x = torch.randn(2, 11, 8, dtype=torch.float64)  # [B, T, D]
    out = layer(x, mode=mode)
    assert out.hidden.shape == (2, 11, 8)
    torch.testing.assert_close(out.hidden, naive_layer(layer, x), rtol=1e-10, atol=1e-10)
    S = layer.config.num_slots
    assert out.state.memory.shape == (2, S, 2, 4, 3)
    assert out.routed.shape == (2, 11, layer.config.num_memories)
    assert (out.routed.sum(-1) == layer.config.topk).all()


def test_layer_gradients_agree_between_chunked_and_recurrent_forms():
    layer = make_layer("mom")
    x = torch.randn(2, 9, 8, dtype=torch.float64)  # [B, T, D]
    grads = []
    for mode in ("chunk", "recurrent"):
        layer.zero_grad()
        out = layer(x, mode=mode)
        (out.hidden.square().sum() + out.state.memory.sum() + out.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
    assert set(grads[0]) == {n for n, _ in layer.named_parameters()}  # every parameter is trained
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-9, atol=1e-10, msg=n)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoding_with_the_state_equals_the_full_forward(name):
    layer = make_layer(name, dtype=torch.float32)
    x = torch.randn(2, 10, 8)  # [B, T, D]
    full = layer(x)  # chunked
    prefix = layer(x[:, :3])  # a prompt in one chunked call, then one token per call
    steps, state = [prefix.hidden], prefix.state
    for t in range(3, 10):
        step = layer(x[:, t : t + 1], state=state)
        steps.append(step.hidden)
        state = step.state
    torch.testing.assert_close(torch.cat(steps, 1), full.hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.memory, full.state.memory, rtol=1e-5, atol=1e-6)
    for name_ in ("q_conv", "k_conv", "v_conv"):
        torch.testing.assert_close(getattr(state, name_), getattr(full.state, name_))  # the last inputs


def test_memories_not_routed_to_keep_their_state_bit_identical():
    layer = make_layer("mom", dtype=torch.float32)
    x = torch.randn(3, 12, 8)  # [B, T, D]
    state, unrouted, routed = None, 0, 0
    for t in range(12):
        step = layer(x[:, t : t + 1], state=state)
        if state is not None:
            for b in range(3):
                for m in range(layer.config.num_memories):
                    same = torch.equal(step.state.memory[b, m], state.memory[b, m])
                    if step.routed[b, 0, m]:
                        routed += 1
                        assert not same
                    else:
                        unrouted += 1
                        assert same, f"memory {m} changed at token {t} (batch {b}) without being routed to"
            assert all(not torch.equal(step.state.memory[b, -1], state.memory[b, -1]) for b in range(3))  # shared
        state = step.state
    assert unrouted == routed == 3 * 11 * 2  # 4 memories, top-2: half of them written at each token


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("name", ["mom", "gated-deltanet"])
def test_a_future_token_never_changes_an_earlier_output(name, mode):
    layer = make_layer(name, dtype=torch.float32)
    x = torch.randn(2, 11, 8)  # [B, T, D]
    for t0 in (1, 4, 6, 10):  # inside and at the edges of the 4-token chunks
        y = x.clone()
        y[:, t0:] += 100 * torch.randn_like(y[:, t0:])
        a, b = layer(x, mode=mode).hidden, layer(y, mode=mode).hidden
        torch.testing.assert_close(a[:, :t0], b[:, :t0], rtol=0, atol=1e-6)
        assert (a[:, t0] - b[:, t0]).abs().max() > 1e-3  # the perturbed token itself does change


def test_aux_loss_gradient_is_zero_when_routing_is_uniform():
    """d aux / d z_{t,i} = (M / N) p_{t,i} (f_i - sum_m f_m p_{t,m}): zero when p and f are both uniform."""
    M, N = 4, 8
    logits = torch.zeros(N, M, dtype=torch.float64, requires_grad=True)  # p uniform
    balanced = torch.zeros(N, M, dtype=torch.bool)
    for t in range(N):  # top-2, every memory chosen equally often: f_m = 1/M
        balanced[t, [t % M, (t + 1) % M]] = True
    aux = load_balancing_loss(logits, balanced)
    (grad,) = torch.autograd.grad(aux, logits)
    assert aux.item() == pytest.approx(1.0)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_aux_loss_gradient_follows_the_formula():
    M, N = 4, 6
    g = torch.Generator().manual_seed(0)
    routed = torch.zeros(N, M, dtype=torch.bool)
    routed[:, :2] = True  # every token to memories 0 and 1: f = (1/2, 1/2, 0, 0)
    f = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    grads = []
    for logits in (torch.zeros(N, M, dtype=torch.float64), torch.randn(N, M, generator=g, dtype=torch.float64)):
        logits.requires_grad_()
        aux = load_balancing_loss(logits, routed)
        (grad,) = torch.autograd.grad(aux, logits)
        p = logits.detach().softmax(-1)  # [N, M]
        torch.testing.assert_close(grad, M / N * p * (f - (p * f).sum(-1, keepdim=True)))
        assert aux.item() == pytest.approx((M * f * p.mean(0)).sum().item())
        grads.append(grad)
    # uniform probabilities but unbalanced dispatch: (f_i - 1/M) / N, away from the over-used memories
    torch.testing.assert_close(grads[0], ((f - 1 / M) / N).expand(N, M))


def test_layer_aux_loss_and_gated_deltanet_config():
    mom, gdn = make_layer("mom"), make_layer("gated-deltanet")
    x = torch.randn(2, 5, 8, dtype=torch.float64)  # [B, T, D]
    out = mom(x)
    assert out.aux_loss.item() == pytest.approx(load_balancing_loss(out.router_logits, out.routed).item())
    assert out.aux_loss.requires_grad
    assert gdn.router is None and gdn.config.num_slots == 1
    g_out = gdn(x)
    assert g_out.aux_loss.item() == 0.0 and g_out.router_logits is None and g_out.routed.all()


def test_config_reports_every_problem():
    with pytest.raises(UsageError) as err:
        MoMConfig(hidden_size=8, num_memories=2, topk=3, chunk_size=0)
    assert "topk" in str(err.value) and "chunk_size" in str(err.value)
    assert err.value.field == "chunk_size"
