"""COCO's box AP by pycocotools: the detector's outputs -> COCO results -> AP, AP50, AP75.

The score is pycocotools' own ``COCOeval`` on the ground truth as written (a scenes annotation file, COCO's,
or VOC converted to the same format), not a hand-written mAP: AP averages IoU 0.50:0.05:0.95 over 101 recall
points and every category; AP50 and AP75 are the single thresholds. The results list is COCO's results
format (``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``), so a file written with
``--predictions`` scores the same with pycocotools anywhere::

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    gt = COCO("data/scenes/annotations/instances_test.json")
    run = COCOeval(gt, gt.loadRes("predictions.json"), "bbox"); run.evaluate(); run.accumulate(); run.summarize()
"""
from __future__ import annotations

import contextlib
import copy
import io

import torch


def coco_results(outputs: list[dict], image_ids: list[int], category_ids: list[int]) -> list[dict]:
    """torchvision detector outputs (``boxes`` xyxy [K, 4], ``scores`` [K], ``labels`` 1..C [K]) of the images
    ``image_ids`` -> COCO results entries (``labels`` mapped back to the ground truth's category ids)."""
    results = []
    for output, image_id in zip(outputs, image_ids):
        boxes = output["boxes"].detach().to("cpu", torch.float64)  # [K, 4]
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()  # [K, 4]
        for box, score, label in zip(xywh, output["scores"].tolist(), output["labels"].tolist()):
            results.append({"image_id": int(image_id), "category_id": int(category_ids[label - 1]),
                            "bbox": [round(v, 2) for v in box], "score": round(float(score), 5)})
    return results


def _ground_truth(coco: dict):
    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = copy.deepcopy(coco)
    gt.dataset.setdefault("info", {})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        gt.createIndex()
    return gt


def box_ap(coco: dict, results: list[dict]) -> dict:
    """pycocotools' bbox evaluation of ``results`` against the ground truth ``coco`` (a COCO instances dict)
    -> ``{"ap", "ap50", "ap75"}`` in percent (0 where there are no detections at all)."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    gt = _ground_truth(coco)
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval's progress lines and table
        evaluation = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    ap, ap50, ap75 = (max(0.0, float(value)) * 100 for value in evaluation.stats[:3])  # -1: nothing to score
    return {"ap": round(ap, 2), "ap50": round(ap50, 2), "ap75": round(ap75, 2)}
