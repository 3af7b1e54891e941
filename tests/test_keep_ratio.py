"""Keep-ratio views (issue 14): torchvision's resize arithmetic and pixels, multi-scale replay, padding, and teacher
targets of views whose sizes differ from image to image (cache, serving layout and inline teacher agree)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection.transform import _resize_image_and_masks

from curriculum.config import CacheConfig, CompressionConfig, DataConfig, RunJobConfig, config_from_dict
from curriculum.data import CocoDetection, Resize, View, collate_fn, decide_scale
from curriculum.errors import CacheError, ConfigError, DataError
from teachers.outputs import teacher_outputs
from teachers.readers import CacheReader, collate_targets
from teachers.targets import TeacherTargets
from teachers.zoo import build_detector

from test_cache import build_cache, save_teacher

KEEP = Resize("keep_ratio", min_size=(128,), max_size=224)


@pytest.fixture(scope="module")
def varied_root(tmp_path_factory) -> Path:
    from curriculum.shapes import make_shapes

    root = tmp_path_factory.mktemp("varied")
    make_shapes(root, train_images=12, val_images=4, image_size=128, seed=0, varied_sizes=True)
    return root


def _ds(root: Path, resize: Resize = KEEP, **kw) -> CocoDetection:
    return CocoDetection(root / "train" / "images", root / "train" / "instances.json", resize, **kw)


# ------------------------------------------------------------------------------------------------ resize


@pytest.mark.parametrize("hw", [(480, 640), (427, 640), (1365, 2048), (100, 1000), (333, 333), (37, 51)])
@pytest.mark.parametrize("sizes", [(800, 1333), (512, 853), (320, 640)])
def test_keep_ratio_size_and_pixels_are_torchvisions(hw, sizes):
    img = torch.rand(3, *hw)
    want, _ = _resize_image_and_masks(img, sizes[0], sizes[1])
    view = Resize("keep_ratio", min_size=(sizes[0],), max_size=sizes[1]).view(*hw, flip=False)
    assert (view.out_h, view.out_w) == tuple(want.shape[-2:])
    assert torch.equal(view.apply(img), want)  # the very same call: no antialiasing, align_corners=False
    assert view.padded_size() == tuple(-(-s // 32) * 32 for s in want.shape[-2:])


def test_keep_ratio_boxes_follow_scale_and_flip():
    view = Resize("keep_ratio", min_size=(100,), max_size=1000).view(200, 300, flip=True)
    assert (view.out_h, view.out_w) == (100, 150)
    boxes = torch.tensor([[30.0, 20.0, 90.0, 60.0]])
    mapped = view.map_boxes(boxes)
    assert torch.allclose(mapped, torch.tensor([[150 - 45.0, 10.0, 150 - 15.0, 30.0]]))
    assert torch.allclose(view.unmap_boxes(mapped), boxes)
    assert View.from_dict(view.to_dict()) == view and view.key() == "h100w150f1t"


def test_multi_scale_is_replayable_and_eval_uses_the_largest(varied_root):
    multi = Resize("keep_ratio", min_size=(96, 112, 128), max_size=224)
    ds = _ds(varied_root, multi, flip="random", seed=3)
    iid = ds.image_ids[0]
    for epoch in range(6):
        ds.set_epoch(epoch)
        view = ds[0][1]["view"]
        m = multi.min_size[decide_scale(3, epoch, iid, 3)]
        assert view == multi.view(view.orig_h, view.orig_w, view.flip, m)
    chosen = {multi.min_size[decide_scale(3, e, i, 3)] for e in range(4) for i in ds.image_ids}
    assert chosen == {96, 112, 128}
    assert multi.for_eval().min_size == (128,)
    assert DataConfig(resize="keep_ratio", min_size=[96, 128], max_size=224).resize_spec("val").min_size == (128,)


def test_bad_resize_settings_name_the_entry(tmp_path, varied_root):
    with pytest.raises(ConfigError, match="data: min_size 900 is larger than max_size 800"):
        config_from_dict(RunJobConfig, {"data": {"resize": "keep_ratio", "min_size": 900, "max_size": 800}})
    ann = json.loads((varied_root / "train" / "instances.json").read_text())
    ann["images"] = ann["images"][:1]
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] == ann["images"][0]["id"]]
    ann["images"][0].update(width=1, height=5000)  # checked before any pixel is read
    path = tmp_path / "thin.json"
    path.write_text(json.dumps(ann))
    name = ann["images"][0]["file_name"]
    with pytest.raises(DataError, match=rf"thin.json: image id \d+ \({name}\).*would be 0x\d+ pixels.*raise max_size"):
        CocoDetection(varied_root / "train" / "images", path, Resize("keep_ratio", min_size=(8,), max_size=64))


def test_a_cache_refuses_multi_scale_with_the_way_out():
    from teachers.cache import view_config

    with pytest.raises(CacheError, match="one scale.*run the teacher inline"):
        view_config(Resize("keep_ratio", min_size=(96, 128), max_size=224), ["noflip"])


# ------------------------------------------------------------------------------------------------ targets


@pytest.mark.parametrize("name", ["retinanet_resnet_mini", "fcos_resnet_mini", "fasterrcnn_resnet_mini"])
def test_targets_of_mixed_sizes_fit_the_students_batch(name, varied_root):
    ds = _ds(varied_root)
    images, targets = collate_fn([ds[i] for i in range(4)])
    assert len({t["view"].padded_size() for t in targets}) > 1  # the batch mixes padded sizes
    torch.manual_seed(0)
    teacher = build_detector(name, ds.num_classes).eval()
    rows = teacher_outputs(teacher, images, ["features", "head"], None)
    # A view's row is the teacher on that view alone, whatever its batch neighbours.
    for i in range(4):
        alone = teacher_outputs(teacher, [images[i]], ["features", "head"], None)[0]
        for k, v in alone.items():
            np.testing.assert_allclose(rows[i][k], v, atol=1e-5, err_msg=k)
    tt = collate_targets(rows, [t["image_id"] for t in targets], sizes=[t["view"].padded_size() for t in targets])
    student = build_detector(name, ds.num_classes).train()
    out = student(images, targets, want=("losses", "features", "head"))
    for lvl, f in out.features.items():
        assert tt.features[lvl].shape[-2:] == f.shape[-2:]
    per_level = ["cls_logits", "bbox_regression", "bbox_ctrness", "objectness", "rpn_deltas"]
    for field in per_level:
        if getattr(tt, field) is not None:
            assert [t.shape for t in getattr(tt, field)] == [s.shape for s in out.head[field]], field
    # Image 0's own cells hold its row; the padding holds zeros / background logits.
    h, w = rows[0]["features/p3"].shape[-2:]
    assert torch.equal(tt.features["p3"][0, :, :h, :w], torch.from_numpy(rows[0]["features/p3"]))
    assert (tt.features["p3"][0, :, h:, :] == 0).all() and (tt.features["p3"][0, :, :, w:] == 0).all()
    if tt.cls_logits is not None:
        H, W = out.features["p3"].shape[-2:]
        grid = tt.cls_logits[0][0].reshape(H, W, -1)
        own = torch.from_numpy(rows[0]["head/cls_logits/0"]).reshape(h, w, -1)
        assert torch.equal(grid[:h, :w], own) and (grid[h:] == -30).all() and (grid[:, w:] == -30).all()
    # The inline teacher gives the same layout and values.
    inline = TeacherTargets.inline(teacher, images)
    for lvl in tt.features:
        torch.testing.assert_close(inline.features[lvl], tt.features[lvl], atol=1e-5, rtol=0)
    for field in per_level:
        if getattr(tt, field) is not None:
            for a, b in zip(getattr(inline, field), getattr(tt, field)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_cache_of_keep_ratio_views_equals_the_live_teacher(tmp_path, varied_root):
    images, ann = str(varied_root / "train" / "images"), str(varied_root / "train" / "instances.json")
    ckpt = tmp_path / "t.pt"
    teacher = save_teacher(ckpt, "retinanet_resnet_mini")
    cfg = CacheConfig(root=str(tmp_path / "cache"), shard_size=4, views=["noflip", "flip"],
                      targets=["features", "head"], compression=CompressionConfig(dtype="fp32"))
    cache = build_cache(Path(cfg.root), ckpt, images, ann, cfg, batch_size=3, resize=KEEP)
    assert cache.manifest["key"]["views"] == {"resize": "keep_ratio", "min_size": [128], "max_size": 224,
                                              "views": ["noflip", "flip"]}
    reader = CacheReader(cache)
    ds = _ds(varied_root, flip="always")
    batch = [ds[i] for i in (0, 2, 5)]
    images_b, targets = collate_fn(batch)
    tt = reader.targets_for(targets)
    live = TeacherTargets.inline(teacher, images_b)
    for lvl in live.features:
        torch.testing.assert_close(tt.features[lvl], live.features[lvl], atol=1e-5, rtol=0)
    for a, b in zip(tt.cls_logits, live.cls_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ a whole run


@pytest.mark.parametrize("min_size", [[128], [96, 128]])
def test_a_run_on_keep_ratio_views(min_size, tmp_path, varied_root, ray_session):
    """Single scale: the teacher's cache of keep-ratio views, written by the precompute actors, read by Ray Train
    workers; multi-scale: the teacher inline on each batch. Either way the stage trains and the report is written."""
    import json as _json

    from curriculum.config import RunJobConfig
    from curriculum.pipeline import run_pipeline

    from test_pipeline import tiny

    cfg = tiny(varied_root, tmp_path, tmp_path / "run", stages=[{"epochs": 1}])
    cfg["data"].update(resize="keep_ratio", min_size=min_size, max_size=224)
    run_pipeline(config_from_dict(RunJobConfig, cfg), progress=False)
    done = _json.loads((tmp_path / "run" / "stages" / "1-fcos_resnet_mini" / "done.json").read_text())
    cache = done["stage"]["teachers"][0]["cache"]
    assert (cache is None) == (len(min_size) > 1)
    if cache:
        manifest = _json.loads((Path(cache) / "manifest.json").read_text())
        assert manifest["key"]["views"]["resize"] == "keep_ratio"
    from helpers import tensorboard_scalars

    tb = tensorboard_scalars(tmp_path / "run" / "stages" / "1-fcos_resnet_mini" / "tensorboard")
    assert tb["distill/decay"] == [(1, 1.0)] and any(k.startswith("loss/distill_") for k in tb) and "lr" in tb
    rep = tmp_path / "run" / "report"
    assert torch.load(rep / "student.pt", weights_only=True)["resize"] == {
        "resize": "keep_ratio", "min_size": [128], "max_size": 224}
    if len(min_size) > 1:
        return
    # Shipping (issue 17): latency of each model in the report, the AP-for-latency plot, and student.onnx, which
    # gives what `curriculum predict` gives on a val image resized to the export size.
    results = _json.loads((rep / "results.json").read_text())
    by_role = {r["role"]: r for r in results["rows"]}
    assert by_role["teacher"]["latency"]["eager_ms"]["median"] > 0 and "onnxruntime_ms" in by_role["stage"]["latency"]
    assert (rep / "ap_vs_latency.png").stat().st_size > 0 and "ms/img onnxruntime" in (rep / "results.md").read_text()
    from curriculum.export import detection_differences, run_onnx
    from curriculum.predict import load_predictor, read_image

    predictor = load_predictor(rep / "student.pt")  # the student's own threshold, as in student.onnx
    ds = CocoDetection(varied_root / "val" / "images", varied_root / "val" / "instances.json", KEEP)
    image = read_image(ds.image_path(0))
    view = KEEP.view(*image.shape[-2:], flip=False)
    assert results["export"]["input"] == [1, 3, view.out_h, view.out_w]
    want = predictor(image)
    got = run_onnx(rep / "student.onnx", view.apply(image).clamp(0, 1)[None].numpy())
    boxes = view.unmap_boxes(torch.from_numpy(got[0])).numpy()
    assert len(boxes) == len(want["boxes"])
    box, score = detection_differences((boxes, got[1], got[2]), [want[k].numpy() for k in ("boxes", "scores", "labels")])
    assert box < 0.5 and score < 1e-3


def test_serving_actors_answer_batches_of_mixed_sizes_like_the_inline_teacher(tmp_path, varied_root, ray_session):
    from teachers.serving import TeacherServer

    ckpt = tmp_path / "t.pt"
    teacher = save_teacher(ckpt, "retinanet_resnet_mini")
    ds = _ds(varied_root)
    images, targets = collate_fn([ds[i] for i in range(4)])
    assert len({im.shape for im in images}) > 1
    server = TeacherServer(str(ckpt), ["features", "head"], actors=1, cpus_per_actor=0.5, threads=1)
    try:
        tt = server.submit(images, [t["image_id"] for t in targets], [t["view"] for t in targets]).result()
    finally:
        server.shutdown()
    ref = TeacherTargets.inline(teacher, images)
    for lvl in ref.features:
        torch.testing.assert_close(tt.features[lvl], ref.features[lvl], atol=1e-5, rtol=0)
    for a, b in zip(tt.cls_logits, ref.cls_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
