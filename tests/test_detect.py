"""maskco.evaluate.detect: the C4 detector holds the checkpoint's res5, pycocotools gives the known answers,
bad input is one line and exit 2, a signal checkpoints and the same command resumes."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from maskco import schedule
from maskco.evaluate import detect, detection_data
from maskco.evaluate.detection_eval import box_ap
from maskco.evaluate.detection_model import DetectorShape, build_detector
from maskco.export import export_backbone, load_backbone, random_backbone
from pipelines import scenes
from test_scenes import fake_fmnist  # noqa: F401  (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--arch", "resnet18", "--stem", "cifar", "--width", "0.25", "--init", "pytorch"]
TINY = ["--batch-size", "2", "--warmup", "2", "--rois-per-image", "8"]
SHAPE = DetectorShape((64,), 64, 64, (12, 24, 48), 8, 32, 64, (300, 100), 20)


@pytest.fixture(scope="module")
def scene_dir(fake_fmnist, tmp_path_factory) -> str:  # noqa: F811
    return scenes.write_scenes(str(tmp_path_factory.mktemp("scenes") / "s"), fake_fmnist, pretrain=4, train=12,
                               test=6)["root"]


@pytest.fixture(scope="module")
def small_backbone(tmp_path_factory) -> str:
    """A backbone.pth of the quality preset's shape (what make transfer fine-tunes)."""
    torch.manual_seed(0)
    model = random_backbone("resnet18", "cifar", 0.25, "pytorch")
    return export_backbone(model.state_dict(), str(tmp_path_factory.mktemp("backbone")), "resnet18", "cifar", 0.25)


def run_tool(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "maskco.evaluate.detect", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


# ---- the model

@pytest.mark.parametrize("layout", ["c4", "fpn"])
def test_the_detector_holds_the_checkpoints_weights(small_backbone, layout):
    backbone = load_backbone(small_backbone)
    reference = {key: value.clone() for key, value in backbone.state_dict().items()}
    model = build_detector(backbone, layout, 10, SHAPE)
    state = model.state_dict()
    if layout == "c4":  # the trunk to C4 is the backbone, the pretrained res5 is the box head
        trunk = {k[len("backbone.body."):]: v for k, v in state.items() if k.startswith("backbone.body.")}
        res5 = {k[len("roi_heads.box_head.res5."):]: v for k, v in state.items()
                if k.startswith("roi_heads.box_head.res5.")}
        assert set(trunk) == {k for k in reference if not k.startswith("layer4.")}
        assert set(res5) == {k[len("layer4."):] for k in reference if k.startswith("layer4.")}
        assert all(torch.equal(res5[k], reference[f"layer4.{k}"]) for k in res5)
    else:
        trunk = {k[len("backbone.body."):]: v for k, v in state.items() if k.startswith("backbone.body.")}
        assert set(trunk) == set(reference)
    assert all(torch.equal(trunk[k], reference[k]) for k in trunk)
    # every layer trains and BatchNorm uses batch statistics (MoCo's protocol: nothing frozen)
    model.train()
    assert all(p.requires_grad for p in model.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) and m.training for m in model.modules())
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([3])}] * 2
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "layer" in n and "weight" in n)


def test_the_schedule_has_the_voc_configs_shape():
    # detectron2's WarmupMultiStepLR at VOC's 24k: warm-up from lr / 1000 over 100, lr / 10 at 18k and 22k
    lr = [schedule.step_decay(step, 24000, 0.02, 100, (3 / 4, 11 / 12)) for step in (0, 50, 100, 17999, 18000,
                                                                                      21999, 22000, 23999)]
    assert lr[0] == pytest.approx(0.02e-3) and lr[1] == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert lr[2:4] == [pytest.approx(0.02)] * 2
    assert lr[4:6] == [pytest.approx(0.002)] * 2 and lr[6:] == [pytest.approx(0.0002)] * 2


# ---- the evaluation: pycocotools' known answers

def ground_truth() -> dict:
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in (1, 2)]
    boxes = [(1, 1, [4, 4, 20, 20]), (1, 2, [30, 10, 20, 20]), (2, 1, [10, 30, 20, 20])]
    annotations = [{"id": k + 1, "image_id": image, "category_id": category, "bbox": box, "area": 400, "iscrowd": 0}
                   for k, (image, category, box) in enumerate(boxes)]
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def test_the_ground_truth_as_predictions_scores_100():
    gt = ground_truth()
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    assert box_ap(gt, results) == {"ap": 100.0, "ap50": 100.0, "ap75": 100.0}


def test_shifted_boxes_score_what_their_iou_allows():
    # 20 x 20 boxes shifted by 4 px: IoU 16 / 24 = 0.667, a hit at IoU 0.50, 0.55, 0.60, 0.65 of COCO's ten
    # thresholds: AP 40, AP50 100, AP75 0
    gt = ground_truth()
    results = [{"image_id": a["image_id"], "category_id": a["category_id"],
                "bbox": [a["bbox"][0] + 4, *a["bbox"][1:]], "score": 0.9} for a in gt["annotations"]]
    assert box_ap(gt, results) == {"ap": 40.0, "ap50": 100.0, "ap75": 0.0}
    wrong_class = [{**r, "category_id": 3 - r["category_id"]} for r in copy.deepcopy(results)]
    assert box_ap(gt, wrong_class)["ap50"] == 0.0
    assert box_ap(gt, []) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}


# ---- the tool

def test_fine_tune_score_and_write_predictions_that_rescore_the_same(scene_dir, small_backbone, tmp_path, capsys):
    out, predictions = tmp_path / "run", tmp_path / "predictions.json"
    argv = ["--checkpoint", small_backbone, "--data", scene_dir, "--iterations", "3", *TINY, "--out-dir", str(out),
            "--predictions", str(predictions)]
    record = detect.main(argv)
    assert {"ap", "ap50", "ap75"} <= set(record) and record["test_images"] == 6 and record["train_images"] >= 1
    with open(predictions, encoding="utf-8") as handle:
        results = json.load(handle)
    assert results and {"image_id", "category_id", "bbox", "score"} == set(results[0])
    test_set = detection_data.load_split(scene_dir, "test")
    assert {k: record[k] for k in ("ap", "ap50", "ap75")} == box_ap(test_set.coco, results)
    capsys.readouterr()
    again = detect.main(argv)  # a finished run is not repeated
    assert again["ap"] == record["ap"] and "already finished" in capsys.readouterr().err
    state = torch.load(out / detect.LAST, weights_only=True)
    assert state["iteration"] == 3
    other = ["--checkpoint", small_backbone, "--data", scene_dir, "--iterations", "3", *TINY, "--lr", "0.01",
             "--out-dir", str(out)]
    with pytest.raises(ValueError, match="another fine-tuning"):
        detect.main(other)  # its checkpoint is of another setting: refused, not resumed


@pytest.mark.parametrize("case", ["no_annotations", "empty_split", "unknown_split", "another_architecture",
                                  "not_a_checkpoint"])
def test_bad_input_is_one_line_and_exit_2(case, scene_dir, small_backbone, tmp_path):
    data, source = scene_dir, ["--checkpoint", small_backbone]
    extra = []
    if case == "no_annotations":
        data = str(tmp_path)
    elif case == "empty_split":
        os.makedirs(tmp_path / "annotations")
        with open(tmp_path / "annotations" / "instances_train.json", "w", encoding="utf-8") as handle:
            json.dump({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}, handle)
        data = str(tmp_path)
    elif case == "unknown_split":
        extra = ["--train-split", "val2017"]
    elif case == "another_architecture":
        source = ["--checkpoint", small_backbone, "--arch", "resnet50"]
    else:
        (tmp_path / "x.pth").write_bytes(b"not a checkpoint")
        source = ["--checkpoint", str(tmp_path / "x.pth")]
    result = run_tool(*source, "--data", data, *extra, "--out-dir", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "maskco.evaluate.detect: error:" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_checkpoints_and_the_same_command_resumes(scene_dir, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "maskco.evaluate.detect", "--random-init", *SMALL, "--data", scene_dir,
            "--iterations", "200", *TINY, "--out-dir", str(out)]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    log, deadline = out / "log.jsonl", time.time() + 240
    while time.time() < deadline and process.poll() is None:  # wait for the first training record
        if log.exists() and '"step"' in log.read_text():
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)  # as a scheduler does: the whole process group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    stopped = torch.load(out / detect.LAST, weights_only=True)["iteration"]
    assert 0 < stopped < 200 and f"at iteration {stopped}" in stderr
    resumed = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["start_iteration"] for r in records if "start_iteration" in r] == [0, stopped]
    assert records[-1]["finished"] and torch.load(out / detect.LAST, weights_only=True)["iteration"] == 200


def write_voc(root, year: str, image_set: str, images: dict) -> None:
    """A VOC<year> folder as torchvision's VOCDetection lays it out: images {name: [(class, xyxy 1-based,
    difficult)]}."""
    from PIL import Image

    base = root / "VOCdevkit" / f"VOC{year}"
    for folder in ("Annotations", "ImageSets/Main", "JPEGImages"):
        os.makedirs(base / folder, exist_ok=True)
    (base / "ImageSets" / "Main" / f"{image_set}.txt").write_text("\n".join(images) + "\n")
    for name, objects in images.items():
        Image.new("RGB", (50, 40), (90, 120, 30)).save(base / "JPEGImages" / f"{name}.jpg")
        body = "".join(f"<object><name>{c}</name><difficult>{int(d)}</difficult><bndbox><xmin>{b[0]}</xmin>"
                       f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                       for c, b, d in objects)
        (base / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><size><width>50</width><height>40</height><depth>3</depth></size>{body}</annotation>")


def test_voc_is_read_as_detectron2_reads_it(tmp_path):
    write_voc(tmp_path, "2007", "trainval", {"000001": [("dog", (11, 6, 30, 25), False)],
                                             "000002": [("cat", (2, 2, 20, 20), True)]})
    write_voc(tmp_path, "2012", "trainval", {"2012_000003": [("person", (5, 5, 45, 35), False),
                                                             ("dog", (1, 1, 10, 10), False)]})
    assert detection_data.detect_format(str(tmp_path)) == "voc"
    voc = detection_data.load_split(str(tmp_path), "2007-trainval+2012-trainval")
    # 1-based inclusive pixels -> minus 1 on the minima; a difficult-only image trains on nothing
    assert len(voc) == 2 and voc.boxes[0].tolist() == [[10.0, 5.0, 30.0, 25.0]]
    assert voc.labels[0].tolist() == [detection_data.VOC_CLASSES.index("dog") + 1]
    assert len(voc.eval_paths) == 3 and [a["iscrowd"] for a in voc.coco["annotations"]] == [0, 1, 0, 0]
    with pytest.raises(detection_data.DataError, match="2010"):
        detection_data.load_split(str(tmp_path), "2010-trainval")


def test_the_command_lines_lists_are_the_libraries():
    # tool_args declares the choices without torch; they must be what the detector and the readers accept
    from maskco import tool_args
    from maskco.evaluate import detection_model

    assert tool_args.DETECT_LAYOUTS == detection_model.LAYOUTS
    assert tool_args.DETECT_FORMATS == detection_data.FORMATS
