"""maskco/configs/detectron2: the paper's detection configs parse and carry MoCo's values, and (where detectron2
is installed) build models that load the detectron2 export by exact name (docs/transfer.md)."""
import os
import pickle

import pytest
import torch
import torchvision
import yaml

from maskco import export

CONFIGS = os.path.join(os.path.dirname(export.__file__), "configs", "detectron2")
BASE = "Base-RCNN-C4-BN.yaml"
# The values each file must set (MoCo's detection configs, docs/transfer.md); a child gets its base's too.
EXPECTED = {
    BASE: {"MODEL.RESNETS.NORM": "naiveSyncBN", "MODEL.RESNETS.STRIDE_IN_1X1": False,
           "MODEL.RESNETS.OUT_FEATURES": ["res4"], "MODEL.BACKBONE.FREEZE_AT": 0,
           "MODEL.ROI_HEADS.NAME": "Res5ROIHeads", "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
           "MODEL.PIXEL_STD": [58.395, 57.120, 57.375], "INPUT.FORMAT": "RGB", "TEST.PRECISE_BN.ENABLED": True,
           "SOLVER.IMS_PER_BATCH": 16, "SOLVER.BASE_LR": 0.02},
    "voc_R_50_C4_24k.yaml": {"SOLVER.MAX_ITER": 24000, "SOLVER.STEPS": [18000, 22000], "SOLVER.WARMUP_ITERS": 100,
                             "MODEL.MASK_ON": False, "MODEL.ROI_HEADS.NUM_CLASSES": 20,
                             "INPUT.MIN_SIZE_TRAIN": list(range(480, 801, 32)), "INPUT.MIN_SIZE_TEST": 800,
                             "DATASETS.TRAIN": ["voc_2007_trainval", "voc_2012_trainval"],
                             "DATASETS.TEST": ["voc_2007_test"]},
    "coco_R_50_C4_2x.yaml": {"SOLVER.MAX_ITER": 180000, "SOLVER.STEPS": [120000, 160000], "MODEL.MASK_ON": True,
                             "INPUT.MIN_SIZE_TRAIN": list(range(640, 801, 32)), "INPUT.MIN_SIZE_TEST": 800,
                             "DATASETS.TRAIN": ["coco_2017_train"], "DATASETS.TEST": ["coco_2017_val"]},
}
CHILDREN = [name for name in EXPECTED if name != BASE]
# The layers a detector adds to the backbone: initialised fresh, so the export has no weights for them.
NEW_LAYERS = ("proposal_generator.", "roi_heads.box_predictor.", "roi_heads.mask_head.")


def read(name: str) -> dict:
    with open(os.path.join(CONFIGS, name)) as stream:
        return yaml.safe_load(stream)


def lookup(values: dict, dotted: str):
    for key in dotted.split("."):
        values = values[key]
    return list(values) if isinstance(values, tuple) else values  # detectron2 holds lists as tuples


def test_the_files_parse_and_each_child_names_an_existing_base():
    assert sorted(os.listdir(CONFIGS)) == sorted(EXPECTED)
    for name in CHILDREN:
        assert os.path.isfile(os.path.join(CONFIGS, read(name)["_BASE_"])), name
    assert "_BASE_" not in read(BASE)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_file_sets_the_papers_values(name):
    values = read(name)
    assert {key: lookup(values, key) for key in EXPECTED[name]} == EXPECTED[name]


# ---- with detectron2 (GPU users install it; CI does not have it)

def detectron2_model(name: str):
    """The detectron2 model of config ``name`` on the CPU, and its config."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed (docs/transfer.md: GPU users install it)")
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, name))
    cfg.MODEL.DEVICE = "cpu"
    # NORM stays naiveSyncBN: NaiveSyncBatchNorm is a BatchNorm2d that synchronises only inside a process
    # group in training, so it builds and loads on the CPU as shipped.
    return build_model(cfg), cfg


def exported(tmp_path) -> tuple[str, dict]:
    """A random torchvision ResNet-50 (BatchNorm statistics moved off their defaults too) written by
    export_detectron2 -> (path, the file's weights)."""
    generator = torch.Generator().manual_seed(0)
    weights = {key: value + torch.rand(value.shape, generator=generator) if value.is_floating_point() else value
               for key, value in torchvision.models.resnet50().state_dict().items()}
    path = str(tmp_path / export.DETECTRON2_FILE)
    export.export_detectron2(weights, path, "c4")
    with open(path, "rb") as stream:
        return path, pickle.load(stream)["model"]


def load(model, path: str):
    """What DetectionCheckpointer(model).load(path) finds incompatible: its own two steps, read file then load."""
    from detectron2.checkpoint import DetectionCheckpointer

    checkpointer = DetectionCheckpointer(model)
    return checkpointer._load_model(checkpointer._load_file(path))


@pytest.mark.parametrize("name", CHILDREN)
def test_detectron2_reads_the_values_through_its_base(name):
    _, cfg = detectron2_model(name)
    expected = {**EXPECTED[BASE], **EXPECTED[name]}
    assert {key: lookup(cfg, key) for key in expected} == expected


@pytest.mark.parametrize("name", CHILDREN)
def test_detectron2_loads_every_exported_weight_by_exact_name(name, tmp_path):
    model, _ = detectron2_model(name)
    path, weights = exported(tmp_path)
    incompatible = load(model, path)
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    # missing: only the detector's new layers, nothing of the backbone (backbone.*) or of res5 (roi_heads.res5.*)
    assert incompatible.missing_keys and all(key.startswith(NEW_LAYERS) for key in incompatible.missing_keys)
    state = model.state_dict()
    for key, value in weights.items():
        assert torch.equal(state[key], torch.from_numpy(value)), key


def test_mocos_extra_norm_head_misses_only_its_norm(tmp_path):
    """MoCo's Res5ROIHeadsExtraNorm (its detection/train_net.py) is Res5ROIHeads with a norm appended to res5
    as ``res5.norm``; built the same way here, the export leaves exactly that new layer missing."""
    model, cfg = detectron2_model("voc_R_50_C4_24k.yaml")
    from detectron2.layers import get_norm

    model.roi_heads.res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, model.roi_heads.res5[-1].out_channels))
    path, _ = exported(tmp_path)
    missing = [key for key in load(model, path).missing_keys if not key.startswith(NEW_LAYERS)]
    assert sorted(missing) == [f"roi_heads.res5.norm.{p}" for p in ("bias", "running_mean", "running_var", "weight")]
