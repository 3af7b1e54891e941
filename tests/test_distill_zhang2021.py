"""Zhang & Ma 2021: masks, feature / attention / non-local losses against loop references."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.distill import TeacherTargets, build_distiller
from trainers.distill.zhang2021 import (
    PRESETS,
    NonLocalBlock,
    ZhangNonLocalLoss,
    attention_masks,
    channel_attention,
    channel_mask_from,
    spatial_attention,
    spatial_mask_from,
)

E = math.e


# ---- straightforward loop references ----------------------------------------------------------


def _softmax(xs, tau):
    ex = [math.exp(x / tau) for x in xs]
    s = sum(ex)
    return [v / s for v in ex]


def ref_masks(f, tau):
    """Spatial [n][h][w] and channel [n][c] masks of one map, by loops."""
    n_, c_, h_, w_ = f.shape
    spatial, channel = [], []
    for n in range(n_):
        g = [sum(abs(f[n, c, i, j].item()) for c in range(c_)) / c_ for i in range(h_) for j in range(w_)]
        sm = [h_ * w_ * v for v in _softmax(g, tau)]
        spatial.append([[sm[i * w_ + j] for j in range(w_)] for i in range(h_)])
        gc = [sum(abs(f[n, c, i, j].item()) for i in range(h_) for j in range(w_)) / (h_ * w_) for c in range(c_)]
        channel.append([c_ * v for v in _softmax(gc, tau)])
    return spatial, channel


def ref_feature_loss(t, s, tau, w_f, channel_mask=True):
    ts, tc = ref_masks(t, tau)
    ss, sc = ref_masks(s, tau)
    n_, c_, h_, w_ = t.shape
    total = 0.0
    for n in range(n_):
        for c in range(c_):
            for i in range(h_):
                for j in range(w_):
                    m = (ts[n][i][j] + ss[n][i][j]) / 2
                    if channel_mask:
                        m *= (tc[n][c] + sc[n][c]) / 2
                    total += (t[n, c, i, j].item() - s[n, c, i, j].item()) ** 2 * m
    return w_f * math.sqrt(total)


def ref_attention_loss(t, s, w_a):
    n_, c_, h_, w_ = t.shape
    dc = 0.0
    for n in range(n_):
        for c in range(c_):
            mt = sum(t[n, c, i, j].item() for i in range(h_) for j in range(w_)) / (h_ * w_)
            ms = sum(s[n, c, i, j].item() for i in range(h_) for j in range(w_)) / (h_ * w_)
            dc += (mt - ms) ** 2
    ds = 0.0
    for n in range(n_):
        for i in range(h_):
            for j in range(w_):
                mt = sum(t[n, c, i, j].item() for c in range(c_)) / c_
                ms = sum(s[n, c, i, j].item() for c in range(c_)) / c_
                ds += (mt - ms) ** 2
    return w_a * (math.sqrt(dc) + math.sqrt(ds))


# ---- masks -------------------------------------------------------------------------------------


def test_masks_hand_values():
    # F[0, :, 0, 0] = [1, 1], F[0, :, 0, 1] = [3, -1]  (N=1, C=2, H=1, W=2)
    f = torch.tensor([[[[1.0, 3.0]], [[1.0, -1.0]]]])
    # G_S = mean_C |F| = [1, 2]; M_S = 2 * softmax([1, 2])
    assert spatial_attention(f).flatten().tolist() == pytest.approx([1.0, 2.0])
    ms = spatial_mask_from(spatial_attention(f), 1.0)
    assert ms.flatten().tolist() == pytest.approx([2 / (1 + E), 2 * E / (1 + E)])
    # G_C = mean_HW |F| = [2, 1]; M_C = 2 * softmax([2, 1])
    assert channel_attention(f).flatten().tolist() == pytest.approx([2.0, 1.0])
    mc = channel_mask_from(channel_attention(f), 1.0)
    assert mc.shape == (1, 2, 1, 1)
    assert mc.flatten().tolist() == pytest.approx([2 * E / (1 + E), 2 / (1 + E)])
    # tau = 0.5 sharpens: softmax([2, 4])
    assert spatial_mask_from(spatial_attention(f), 0.5).flatten().tolist() == pytest.approx(
        [2 / (1 + E**2), 2 * E**2 / (1 + E**2)]
    )


def test_mask_modes_and_detached():
    t = torch.tensor([[[[1.0, 3.0]], [[1.0, -1.0]]]])
    s = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]], requires_grad=True)
    ms, mc = attention_masks(t, s, 1.0, "code")
    assert not ms.requires_grad and not mc.requires_grad
    # code: mean of separately normalised masks; student G_S = [1, 0]
    exp_s = [(2 / (1 + E) + 2 * E / (1 + E)) / 2, (2 * E / (1 + E) + 2 / (1 + E)) / 2]
    assert ms.flatten().tolist() == pytest.approx(exp_s)
    # paper: softmax of the summed attention [2, 2] -> uniform
    ms_p, _ = attention_masks(t, s, 1.0, "paper")
    assert ms_p.flatten().tolist() == pytest.approx([1.0, 1.0])
    ms_t, _ = attention_masks(t, s, 1.0, "teacher")
    assert ms_t.flatten().tolist() == pytest.approx([2 / (1 + E), 2 * E / (1 + E)])


# ---- feature loss ------------------------------------------------------------------------------


def _feat_distiller(name, channels=3, **opts):
    cfg = [{"name": name, "levels": ["p3"], "adapter_init": "identity", **opts}]
    return build_distiller(cfg, {"p3": channels}, {"p3": channels})


def test_feature_loss_matches_loop_reference_one_stage():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 2, 3, generator=g)
    s = torch.randn(2, 3, 2, 3, generator=g)
    d = _feat_distiller("zhang_feature", preset="one_stage")
    out = d({"features": {"p3": s}}, TeacherTargets(features={"p3": t}))["distill_zhang_feature"]
    assert out.item() == pytest.approx(ref_feature_loss(t, s, 0.1, 4.2e-4), rel=1e-5)


def test_feature_loss_two_stage_has_no_channel_mask_and_normalize():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(1, 3, 3, 2, generator=g)
    s = torch.randn(1, 3, 3, 2, generator=g)
    tt = TeacherTargets(features={"p3": t})
    d = _feat_distiller("zhang_feature", preset="two_stage")
    out = d({"features": {"p3": s}}, tt)["distill_zhang_feature"]
    ref = ref_feature_loss(t, s, 0.5, 7e-5, channel_mask=False)
    assert out.item() == pytest.approx(ref, rel=1e-5)
    dn = _feat_distiller("zhang_feature", preset="two_stage", normalize=True)
    outn = dn({"features": {"p3": s}}, tt)["distill_zhang_feature"]
    # root of the mean instead of the sum: divide by sqrt(numel)
    assert outn.item() == pytest.approx(ref / math.sqrt(t.numel()), rel=1e-5)


def test_feature_loss_zero_when_equal_and_grad_treats_masks_as_constants():
    t = torch.tensor([[[[1.0, 3.0]], [[1.0, -1.0]]]])
    d = _feat_distiller("zhang_feature", channels=2, preset="one_stage", tau=1.0, w_f=1.0)
    tt = TeacherTargets(features={"p3": t})
    s0 = t.clone().requires_grad_(True)
    out0 = d({"features": {"p3": s0}}, tt)["distill_zhang_feature"]
    assert out0.item() == 0.0
    out0.backward()
    assert torch.all(torch.isfinite(s0.grad)) and torch.all(s0.grad == 0)

    s = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]], requires_grad=True)
    out = d({"features": {"p3": s}}, tt)["distill_zhang_feature"]
    out.backward()
    ms, mc = attention_masks(t, s, 1.0, "code")
    m = ms * mc
    expected_grad = -(t - s.detach()) * m / math.sqrt(((t - s.detach()) ** 2 * m).sum().item())
    assert torch.allclose(s.grad, expected_grad, atol=1e-6)


# ---- attention loss ----------------------------------------------------------------------------


def test_attention_loss_matches_loop_reference_and_grads():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2, 3, 2, 2, generator=g)
    s = torch.randn(2, 3, 2, 2, generator=g).requires_grad_(True)
    d = _feat_distiller("zhang_attention", preset="one_stage")
    out = d({"features": {"p3": s}}, TeacherTargets(features={"p3": t}))["distill_zhang_attention"]
    assert out.item() == pytest.approx(ref_attention_loss(t, s.detach(), 2.4e-2), rel=1e-5)
    out.backward()
    term = d.terms["zhang_attention"]
    assert term.channel_adapters["p3"].weight.grad.abs().sum() > 0
    assert term.spatial_adapters["p3"].weight.grad.abs().sum() > 0
    assert s.grad.abs().sum() > 0
    same = d({"features": {"p3": t.clone()}}, TeacherTargets(features={"p3": t}))["distill_zhang_attention"]
    assert same.item() == 0.0


# ---- non-local ---------------------------------------------------------------------------------


def test_nonlocal_block_matches_loop_reference():
    torch.manual_seed(3)
    block = NonLocalBlock(2, inter_channels=1, downsample=1, bn=False)
    with torch.no_grad():
        for conv in (block.theta, block.phi, block.g, block.W):
            conv.weight.copy_(torch.randn_like(conv.weight))
            conv.bias.copy_(torch.randn_like(conv.bias))
    x = torch.randn(1, 2, 2, 2)
    z = block(x)
    # loops: positions p, q over the 4 cells, inter channel 1
    xs = [[x[0, c].flatten()[p].item() for p in range(4)] for c in range(2)]

    def proj(conv, p):
        return sum(conv.weight[0, c, 0, 0].item() * xs[c][p] for c in range(2)) + conv.bias[0].item()

    theta = [proj(block.theta, p) for p in range(4)]
    phi = [proj(block.phi, p) for p in range(4)]
    gg = [proj(block.g, p) for p in range(4)]
    y = [sum(theta[p] * phi[q] / 4 * gg[q] for q in range(4)) for p in range(4)]
    for c in range(2):
        for p in range(4):
            ref = block.W.weight[c, 0, 0, 0].item() * y[p] + block.W.bias[c].item() + xs[c][p]
            assert z[0, c].flatten()[p].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_nonlocal_block_pooling_and_identity_at_init():
    block = NonLocalBlock(4, downsample=2)
    x = torch.randn(2, 4, 4, 6)
    assert torch.allclose(block(x), x)  # zero-initialised BN: identity at start
    tiny = torch.randn(1, 4, 1, 1)  # smaller than the pool, one value per channel in BN
    assert torch.allclose(block(tiny), tiny)


def test_nonlocal_loss_zero_when_equal_and_grads_reach_both_blocks():
    d = _feat_distiller("zhang_nonlocal", preset="one_stage", w_n=1.0)
    t = torch.randn(2, 3, 4, 4)
    tt = TeacherTargets(features={"p3": t})
    assert d({"features": {"p3": t.clone()}}, tt)["distill_zhang_nonlocal"].item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = d({"features": {"p3": s}}, tt)["distill_zhang_nonlocal"]
    # at init both blocks are the identity: the loss is ||S - T|| (identity adapter)
    assert out.item() == pytest.approx(torch.linalg.vector_norm(s.detach() - t).item(), rel=1e-5)
    out.backward()
    term = d.terms["zhang_nonlocal"]
    assert s.grad.abs().sum() > 0
    assert term.adapters["p3"].weight.grad.abs().sum() > 0
    assert term.student_nl["p3"].bn.weight.grad.abs().sum() > 0
    assert term.teacher_nl["p3"].bn.weight.grad.abs().sum() > 0
    assert not tt.features["p3"].requires_grad and tt.features["p3"].grad is None


def test_presets_and_two_stage_nonlocal_shapes():
    assert PRESETS["one_stage"]["tau"] == 0.1 and PRESETS["one_stage"]["w_f"] == 4.2e-4
    assert PRESETS["one_stage"]["w_a"] == 2.4e-2 and PRESETS["one_stage"]["w_n"] == 4.2e-4
    assert PRESETS["one_stage"]["channel_mask"] is True
    assert PRESETS["two_stage"]["tau"] == 0.5 and PRESETS["two_stage"]["w_f"] == 7e-5
    assert PRESETS["two_stage"]["w_a"] == 4e-3 and PRESETS["two_stage"]["w_n"] == 7e-5
    assert PRESETS["two_stage"]["channel_mask"] is False
    term = ZhangNonLocalLoss(
        student_channels={"p2": 128, "p4": 128}, teacher_channels={"p2": 128, "p4": 128}, preset="two_stage"
    )
    assert term.student_nl["p2"].inter_channels == 64 and term.student_nl["p2"].downsample == 8
    assert term.teacher_nl["p4"].inter_channels == 64 and term.teacher_nl["p4"].downsample == 2
    assert term.w_n == 7e-5


def test_channel_mismatch_uses_adapters():
    d = build_distiller(
        [{"name": "zhang_feature", "preset": "one_stage"}, {"name": "zhang_attention"}, {"name": "zhang_nonlocal"}],
        {"p3": 3},
        {"p3": 5},
    )
    s = torch.randn(1, 3, 4, 4, requires_grad=True)
    t = torch.randn(1, 5, 4, 4)
    out = d({"features": {"p3": s}}, TeacherTargets(features={"p3": t}))
    total = sum(out.values())
    total.backward()
    assert d.terms["zhang_feature"].adapters["p3"].weight.shape == (5, 3, 1, 1)
    assert d.terms["zhang_attention"].channel_adapters["p3"].weight.shape == (5, 3)
    assert d.terms["zhang_nonlocal"].student_nl["p3"].channels == 3
    assert d.terms["zhang_nonlocal"].teacher_nl["p3"].channels == 5
    for p in (d.terms["zhang_feature"].adapters["p3"].weight, d.terms["zhang_nonlocal"].adapters["p3"].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(torch.isfinite(v) for v in out.values())
