"""Mask R-CNN (issue 16): segm evaluation, the zoo's Mask R-CNNs and torchvision's through the project, training on
the built-in masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.models import get_model_builder

from curriculum.config import TrainJobConfig, config_from_dict
from curriculum.data import CocoDetection, Resize, collate_fn
from teachers.zoo import build_detector, needs_masks
from trainers.coco_eval import evaluate_detections
from trainers.train import train_detector


def test_ground_truth_as_detections_scores_mask_ap_one(shapes_root):
    ann = shapes_root / "val" / "instances.json"
    coco = json.loads(ann.read_text())
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "segmentation": a["segmentation"], "score": 1.0} for a in coco["annotations"]]
    for iou_type in ("bbox", "segm"):
        m = evaluate_detections(ann, dets, iou_type=iou_type)
        assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0), iou_type
    # A mask off by a shift scores lower on masks than its (unchanged) box does.
    from pycocotools import mask as mask_utils

    from curriculum.shapes import mask_rle

    shifted = []
    for d in dets:
        im = next(i for i in coco["images"] if i["id"] == d["image_id"])
        m = mask_utils.decode(d["segmentation"]).astype(bool)
        shifted.append(dict(d, segmentation=mask_rle(np.roll(m, 3, axis=1))))
    assert evaluate_detections(ann, shifted, iou_type="segm")["AP"] < 0.9 < evaluate_detections(ann, shifted)["AP"]
    assert im  # the images were found


def test_maskrcnn_records_masks_and_needs_them_to_train(shapes_root):
    ds = CocoDetection(shapes_root / "train" / "images", shapes_root / "train" / "instances.json", 128, masks=True)
    images, targets = collate_fn([ds[i] for i in range(3)])
    assert needs_masks("maskrcnn_resnet_mini") and needs_masks("torchvision:maskrcnn_resnet50_fpn")
    det = build_detector("maskrcnn_resnet_mini", ds.num_classes).train()
    out = det(images, targets, want=("losses", "features", "head"))
    assert set(out.losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    out.losses["loss_mask"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in det.model.roi_heads.mask_head.parameters())
    n_pos = sum(len(b) for b in out.head["mask_boxes"])
    assert out.head["mask_logits"].shape == (n_pos, ds.num_classes, 28, 28)
    assert out.head["mask_features"].shape[0] == n_pos and out.head["mask_features"].shape[-2:] == (14, 14)
    # The mask head scores given boxes on recorded features (a cached teacher's, for a mask term).
    det.eval()
    logits = det.score_masks(out.features, out.head["mask_boxes"], out.image_sizes)
    assert logits.shape == out.head["mask_logits"].shape
    with pytest.raises(ValueError, match="needs instance masks in its targets"):
        det.train()(images, [{k: v for k, v in t.items() if k != "masks"} for t in targets])
    det.eval().set_thresholds(score_thresh=0.0)
    d = det.predict(images)[0]
    assert d["masks"].shape[1:] == (1, *images[0].shape[-2:]) and d["mask_probs"].shape[1:] == (1, 28, 28)


def test_torchvision_maskrcnn_gives_torchvisions_masks(tmp_path):
    torch.manual_seed(0)
    ref = get_model_builder("maskrcnn_resnet50_fpn")(weights=None, weights_backbone=None, num_classes=91, min_size=224,
                                                     max_size=352, box_score_thresh=0.01).eval()
    torch.save(ref.state_dict(), tmp_path / "m.pth")
    det = build_detector("torchvision:maskrcnn_resnet50_fpn", 91, weights=str(tmp_path / "m.pth"),
                         score_thresh=0.01).eval()
    img = torch.rand(3, 300, 420, generator=torch.Generator().manual_seed(3))
    view = Resize("keep_ratio", min_size=(224,), max_size=352).view(300, 420, flip=False)
    with torch.no_grad():
        want = ref([img])[0]
        got = det.predict([view.apply(img)])[0]
    assert len(got["boxes"]) == len(want["boxes"]) > 0
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    boxes = view.unmap_boxes(got["boxes"])
    masks = paste_masks_in_image(got["mask_probs"], boxes, (300, 420))  # as `curriculum eval` pastes them
    d_box = (boxes[:, None] - want["boxes"][None]).abs().amax(-1)
    j = d_box.argmin(dim=1)
    assert d_box.gather(1, j[:, None]).max() < 0.25
    assert (masks - want["masks"][j]).abs().max() < 0.05  # probabilities pasted at the original size
    assert ((masks >= 0.5) != (want["masks"][j] >= 0.5)).float().mean() < 1e-3


def test_short_maskrcnn_training_learns_masks(easy_shapes_root, tmp_path):
    job = config_from_dict(TrainJobConfig, {
        "output_dir": str(tmp_path / "mask"), "data": {"root": str(easy_shapes_root), "builtin": "none"},
        "model": {"name": "maskrcnn_resnet_mini"},
        "train": {"epochs": 6, "batch_size": 8, "lr": 0.002, "warmup_iters": 20}, "eval": {"max_images": 40}})
    summary = train_detector(job, progress=False)
    segm = json.loads((tmp_path / "mask" / "eval.json").read_text())["segm"]
    # Untrained, the same detector scores 0.0; measured here at 6 epochs: mask AP50 0.09, box AP50 0.13.
    assert segm["AP50"] > 0.03 and set(segm) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"}
    assert summary["val"]["AP50"] > 0.03 and summary["val"]["segm"]["AP50"] == segm["AP50"]
    results = json.loads((tmp_path / "mask" / "detections_val.json").read_text())
    assert results and all("segmentation" in r for r in results)
