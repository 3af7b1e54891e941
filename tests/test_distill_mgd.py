"""Masked generative distillation: masks from a generator, hand values, adapters and gradients."""

from __future__ import annotations

import pytest
import torch

from helpers import identity_generation
from trainers.distill import TeacherTargets, build_distiller
from trainers.distill.mgd import PRESETS, mgd_level_loss, random_spatial_mask


def test_presets():
    assert PRESETS["retinanet"] == {"alpha": 2e-5, "lambda_mask": 0.65}
    assert PRESETS["mask_rcnn"] == {"alpha": 5e-7, "lambda_mask": 0.45}
    d = build_distiller([{"name": "mgd", "preset": "mask_rcnn"}], {"p2": 4}, {"p2": 4})
    assert d.terms["mgd"].alpha == 5e-7 and d.terms["mgd"].lambda_mask == 0.45
    assert d.stochastic


def test_mask_follows_authors_rule_and_generator():
    g1 = torch.Generator().manual_seed(7)
    g2 = torch.Generator().manual_seed(7)
    m = random_spatial_mask(2, 3, 4, 0.65, generator=g1)
    u = torch.rand((2, 1, 3, 4), generator=g2)
    assert torch.equal(m, torch.where(u > 1 - 0.65, 0.0, 1.0))  # dropped where rand > 1 - lambda
    big = random_spatial_mask(1, 200, 500, 0.65, generator=torch.Generator().manual_seed(0))
    assert big.mean().item() == pytest.approx(0.35, abs=0.01)  # each pixel dropped with prob lambda
    assert set(big.unique().tolist()) == {0.0, 1.0}


def _identity_mgd(lambda_mask, alpha=1.0):
    # generation convs set to identity: on non-negative inputs G(x) = x (ReLU is a no-op)
    return identity_generation(build_distiller(
        [{"name": "mgd", "alpha": alpha, "lambda_mask": lambda_mask}],
        {"p3": 2},
        {"p3": 2},
    ))


def test_hand_value_without_mask():
    # tiny 1x2x2x2 maps; lambda = 0 keeps every pixel; G = identity
    s = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[0.5, 0.0], [3.0, 1.0]]]])
    t = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[0.5, 1.0], [1.0, 1.0]]]])
    # squared differences: 0, 4, 0, 1 | 0, 1, 4, 0 -> 10; / N = 1; alpha = 2e-5 -> 2e-4
    d = _identity_mgd(0.0, alpha=2e-5)
    out = d({"features": {"p3": s}}, TeacherTargets(features={"p3": t}))["distill_mgd"]
    assert out.item() == pytest.approx(2e-4)
    assert d({"features": {"p3": t.clone()}}, TeacherTargets(features={"p3": t}))["distill_mgd"].item() == 0.0


def test_hand_value_with_generated_mask():
    s = torch.rand(2, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    t = torch.rand(2, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    d = _identity_mgd(0.5)
    out = d(
        {"features": {"p3": s}}, TeacherTargets(features={"p3": t}), generator=torch.Generator().manual_seed(3)
    )["distill_mgd"]
    m = random_spatial_mask(2, 3, 3, 0.5, generator=torch.Generator().manual_seed(3))
    expected = ((t - s * m) ** 2).sum().item() / 2
    assert out.item() == pytest.approx(expected, rel=1e-6)
    # the same generator seed gives the same loss; another seed another mask
    again = d({"features": {"p3": s}}, TeacherTargets(features={"p3": t}), generator=torch.Generator().manual_seed(3))
    assert again["distill_mgd"].item() == out.item()


def test_channel_mismatch_align_and_gradients():
    d = build_distiller([{"name": "mgd", "levels": ["p3", "p4"]}], {"p3": 3, "p4": 4}, {"p3": 5, "p4": 4})
    term = d.terms["mgd"]
    assert set(term.align) == {"p3"} and term.align["p3"].weight.shape == (5, 3, 1, 1)
    s3 = torch.randn(2, 3, 4, 4, requires_grad=True)
    s4 = torch.randn(2, 4, 2, 2, requires_grad=True)
    t3, t4 = torch.randn(2, 5, 4, 4), torch.randn(2, 4, 2, 2)
    tt = TeacherTargets(features={"p3": t3, "p4": t4})
    out = d({"features": {"p3": s3, "p4": s4}}, tt, generator=torch.Generator().manual_seed(0))["distill_mgd"]
    out.backward()
    assert term.align["p3"].weight.grad.abs().sum() > 0
    assert term.generation["p4"][0].weight.grad.abs().sum() > 0
    assert s3.grad.abs().sum() > 0 and s4.grad.abs().sum() > 0
    assert not tt.features["p3"].requires_grad and tt.features["p3"].grad is None
    assert {n.split(".")[2] for n, _ in d.named_parameters()} >= {"align", "generation"}


def test_half_precision_sums_are_taken_in_float32():
    # 16384 squared differences of 16: 262144, beyond float16's 65504
    s = torch.zeros(1, 4, 64, 64, dtype=torch.float16)
    t = torch.full((1, 4, 64, 64), 4.0, dtype=torch.float16)
    out = mgd_level_loss(s, t, torch.ones(1, 1, 64, 64, dtype=torch.float16), torch.nn.Identity())
    assert out.dtype == torch.float32 and out.item() == 16.0 * 16384


def _ops(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 2), (3, 1, 1), (1, 1, 4), (3, 2, 5), (3, 1, 96)])
def test_small_map_conv_is_nn_conv2d(kernel, stride, size):
    """SmallMapConv2d gives nn.Conv2d's output and gradients (same weights), on its own kernel below the bound."""
    from trainers.distill.common import SmallMapConv2d

    torch.manual_seed(0)
    ref = torch.nn.Conv2d(6, 5, kernel, stride=stride, padding=kernel // 2).double()
    conv = SmallMapConv2d(6, 5, kernel, stride=stride, padding=kernel // 2).double()
    conv.load_state_dict(ref.state_dict())
    assert list(conv.state_dict()) == ["weight", "bias"]  # checkpoints of either load into the other
    x = torch.randn(3, 6, size, size, dtype=torch.double, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn_like(ref(x))
    ops = _ops(lambda: conv(x).backward(g))
    ref(x2).backward(g)
    torch.testing.assert_close(conv(x), ref(x2))
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad)
    torch.testing.assert_close(conv.bias.grad, ref.bias.grad)
    small = conv._macs(x) < SmallMapConv2d.max_macs
    assert small == (size < 96)
    assert ("aten::_convolution" not in ops) == small  # its own kernel, not nn.Conv2d's dispatch


def test_mgd_connectors_take_small_map_path_only_when_small(monkeypatch):
    """MGD's align and generation convs run on the im2col kernel on a tiny map, not on a large one; with the
    bound at 0 (bench/step_cost.py's arm (e)) never, and the loss is the same."""
    from trainers.distill.common import SmallMapConv2d

    d = build_distiller([{"name": "mgd"}], {"p3": 8}, {"p3": 4})
    s = {"p3": torch.randn(2, 8, 2, 2)}
    tt = TeacherTargets(features={"p3": torch.randn(2, 4, 2, 2)})

    def loss(bound):
        monkeypatch.setattr(SmallMapConv2d, "max_macs", bound)
        out = {}
        out["ops"] = _ops(lambda: out.setdefault(
            "v", d({"features": s}, tt, generator=torch.Generator().manual_seed(3))["distill_mgd"]))
        return out

    small, default = loss(1 << 22), loss(0)
    assert "aten::thnn_conv2d" in small["ops"] and "aten::_convolution" not in small["ops"]
    assert "aten::_convolution" in default["ops"]
    torch.testing.assert_close(small["v"], default["v"])
