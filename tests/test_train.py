"""Plain training: the loss falls and AP rises on the built-in data; resume equals an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

import trainers.train as train_mod
from curriculum.config import TrainConfig, TrainJobConfig, config_from_dict
from curriculum.errors import CurriculumError
from trainers.train import NonFiniteLossError, build_dataset, make_loader, train_detector, train_one_epoch


def _job(root, out, **train):
    return config_from_dict(TrainJobConfig, {
        "output_dir": str(out),
        "data": {"root": str(root), "builtin": "none"},
        "model": {"name": "retinanet_resnet_mini"},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.003, "warmup_iters": 10, **train},
        "eval": {"batch_size": 20},
    })


def _untrained_ap50(job) -> float:
    from teachers.zoo import build_detector
    from curriculum.seeds import seed_everything
    from trainers.train import evaluate_model

    seed_everything(job.train.seed)  # the initial weights train_detector starts from
    val = build_dataset(job.data, "val")
    model = build_detector(job.model.name, val.num_classes, image_size=job.data.image_size)
    return evaluate_model(model, val, job.eval, progress=False)["AP50"]


@pytest.mark.slow
def test_short_training_learns(easy_shapes_root, tmp_path):
    """Loss and AP50 move well clear of where they start. Measured AP50 at epochs 3 and 6: 0.084 and 0.141 with
    2 torch threads, 0.100 and 0.145 with 1 (the last epoch's loss 0.56 of the first); the untrained detector 0.0.
    Floors: about a third of the end value, and the end above the middle minus a margin (training on 200 images
    wobbles)."""
    job = _job(easy_shapes_root, tmp_path / "run", epochs=6, eval_every=3)
    untrained = _untrained_ap50(job)
    summary = train_detector(job, progress=False)
    hist = summary["history"]
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"], [h["loss"] for h in hist]
    ap_mid, ap_end = hist[2]["val"]["AP50"], hist[5]["val"]["AP50"]
    assert untrained < 0.01, untrained
    assert ap_end > 0.05 and ap_end > untrained + 0.04, (untrained, hist[-1]["val"])
    assert ap_end > ap_mid - 0.01, (ap_mid, ap_end)
    out = tmp_path / "run"
    for name in ("model.pt", "eval.json", "detections_val.json", "metrics.jsonl", "loss.png", "ap.png", "config.yaml"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["images"] == 40 and set(metrics["per_class"]) == {"circle", "triangle", "square", "star", "cross", "ring"}


def test_training_in_process_leaves_the_callers_thread_count(shapes_root, tmp_path):
    before = torch.get_num_threads()
    own = 1 if before != 1 else 2
    train_detector(_job(shapes_root, tmp_path / "t", epochs=1, max_iters_per_epoch=1, num_threads=own),
                   progress=False)
    assert torch.get_num_threads() == before


def test_resume_equals_uninterrupted(shapes_root, tmp_path, monkeypatch):
    common = dict(epochs=2, max_iters_per_epoch=3)
    ref = train_detector(_job(shapes_root, tmp_path / "ref", **common), progress=False)
    ref_state = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)["model"]
    # TensorBoard (issue 17): every step's loss terms and lr, the final val metrics, in the output folder.
    from helpers import tensorboard_scalars

    tb = tensorboard_scalars(tmp_path / "ref" / "tensorboard")
    assert [s for s, _ in tb["loss/loss"]] == list(range(6)) and [s for s, _ in tb["lr"]] == list(range(6))
    assert {"loss/classification", "loss/bbox_regression"} <= set(tb)
    assert tb["loss/loss"][-1][1] == pytest.approx(ref["history"][-1]["loss"] * 3 - sum(v for _, v in tb["loss/loss"][3:5]),
                                                   rel=1e-4)
    assert tb["val/AP"] == [(2, pytest.approx(ref["val"]["AP"], abs=1e-6))]

    real = train_mod.train_one_epoch

    def killed_at_second_epoch(*args, **kw):
        if args[5] == 1:  # epoch index
            raise KeyboardInterrupt("job killed")
        return real(*args, **kw)

    monkeypatch.setattr(train_mod, "train_one_epoch", killed_at_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_detector(_job(shapes_root, tmp_path / "cut", **common), progress=False)
    monkeypatch.setattr(train_mod, "train_one_epoch", real)
    with pytest.raises(CurriculumError, match="pass --resume"):
        train_detector(_job(shapes_root, tmp_path / "cut", **common), progress=False)
    resumed = train_detector(_job(shapes_root, tmp_path / "cut", **common), resume=True, progress=False)
    state = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["model"]
    for k, v in ref_state.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=1e-6, msg=k)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["val"]["AP"] == pytest.approx(ref["val"]["AP"], abs=1e-9)


def test_non_finite_loss_names_epoch_and_batch(shapes_root, tmp_path):
    job = _job(shapes_root, tmp_path / "nan", max_iters_per_epoch=2)
    from teachers.zoo import build_detector

    ds = build_dataset(job.data, "train")
    model = build_detector("retinanet_mobilenetv3_micro", ds.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, batch 0 \(image ids \[\d+"):
        train_one_epoch(model, make_loader(ds, 4, True, 0), opt, sched, job.train, 2, progress=False,
                        extra_loss=lambda out, t, im: {"distill": torch.tensor(float("nan"))})
    # The bad step was not applied: no weight moved (BatchNorm's running statistics do follow the forward pass).
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())


def test_the_transformer_recipe_keeps_weight_decay_off_norms_biases_and_position_tables():
    from teachers.zoo import build_detector
    from trainers.train import make_optimizer

    det = build_detector("fcos_swin_mini", 4)
    named = dict(det.named_parameters())
    t = TrainConfig(weight_decay=0.05, decay_norm_and_bias=False)
    decayed, plain = make_optimizer(det.named_parameters(), t).param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    no_decay = {n for n, p in named.items() if any(p is q for q in plain["params"])}
    assert any("relative_position_bias_table" in n for n in no_decay)
    assert all(named[n].ndim <= 1 or "position_bias_table" in n for n in no_decay)
    assert all(p.ndim > 1 for p in decayed["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(named)
    (group,) = make_optimizer(det.named_parameters(), TrainConfig(weight_decay=0.05)).param_groups
    assert group["weight_decay"] == 0.05 and len(group["params"]) == len(named)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_the_fused_optimizer_makes_torchs_reference_update(kind):
    """make_optimizer runs torch's fused kernel on the CPU; its updates (weight decay on weights only) match
    torch's per-tensor reference loop to float rounding over several steps."""
    from trainers.train import make_optimizer

    t = TrainConfig(optimizer=kind, lr=0.05, weight_decay=0.01, momentum=0.9, decay_norm_and_bias=False)
    torch.manual_seed(0)
    start = {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4), "fc.weight": torch.randn(5, 7)}
    grads = [{n: torch.randn_like(w) for n, w in start.items()} for _ in range(5)]
    params = {n: torch.nn.Parameter(w.clone()) for n, w in start.items()}
    opt = make_optimizer(params.items(), t)
    assert all(g["fused"] for g in opt.param_groups)
    ref = {n: torch.nn.Parameter(w.clone()) for n, w in start.items()}
    groups = [{"params": [ref["conv.weight"], ref["fc.weight"]]}, {"params": [ref["conv.bias"]], "weight_decay": 0.0}]
    ref_opt = (torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=0.01, foreach=False) if kind == "sgd"
               else torch.optim.AdamW(groups, lr=0.05, weight_decay=0.01, foreach=False))
    for g in grads:
        for n in start:
            params[n].grad, ref[n].grad = g[n].clone(), g[n].clone()
        opt.step()
        ref_opt.step()
    for n in start:
        assert not torch.equal(params[n], start[n])
        torch.testing.assert_close(params[n], ref[n], rtol=1e-6, atol=1e-6)


def test_optimizer_state_by_name_goes_on_in_an_optimizer_over_other_parameters():
    """A student's AdamW moments, taken by name into a new optimizer that also holds a new adapter, make the
    same update as the old optimizer going on; a parameter whose shape changed starts fresh."""
    from trainers.train import load_optimizer_state_by_name, make_optimizer, optimizer_state_by_name

    t = TrainConfig(optimizer="adamw", lr=0.1, weight_decay=0.01)
    torch.manual_seed(0)
    w, old_adapter = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    grads = [torch.randn(3) for _ in range(4)]
    opt = make_optimizer([("w", w), ("adapter", old_adapter)], t)
    for g in grads[:3]:
        w.grad, old_adapter.grad = g.clone(), torch.ones(2)
        opt.step()
    states = optimizer_state_by_name(opt, [("w", w)])
    assert set(states) == {"w"} and int(states["w"]["step"]) == 3
    w2, new_adapter = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(torch.randn(5))
    opt2 = make_optimizer([("w", w2), ("adapter", new_adapter)], t)
    taken = load_optimizer_state_by_name(opt2, [("w", w2), ("adapter", new_adapter)],
                                         {**states, "adapter": {"exp_avg": torch.zeros(2)}})
    assert taken == ["w"]
    w.grad, w2.grad, new_adapter.grad = grads[3].clone(), grads[3].clone(), torch.ones(5)
    opt.step()
    opt2.step()
    torch.testing.assert_close(w2.detach(), w.detach(), rtol=0, atol=0)
    assert int(opt2.state[new_adapter]["step"]) == 1
