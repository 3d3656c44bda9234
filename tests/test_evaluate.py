import copy
import json
import os
import random

import pytest
import torch

from samkd.engine.evaluate import METRIC_NAMES, coco_metrics, detections_to_coco, evaluate

CAT_IDS = (1, 3, 7)
LABEL_TO_CAT = {1: 1, 2: 3, 3: 7}  # contiguous labels (0 = background)


def _make_gt() -> dict:
    """6 images 200x200, small/medium/large boxes, 3 non-contiguous cats, 1 crowd."""
    rng = random.Random(0)
    images, anns = [], []
    ann_id = 1
    # (w, h) sizes spanning small (<32^2), medium and large (>96^2) areas
    sizes = [(12, 14), (20, 25), (28, 30), (40, 45), (60, 50), (80, 90), (110, 100), (150, 130)]
    for img_id in range(1, 7):
        images.append({"id": img_id * 10, "width": 200, "height": 200, "file_name": f"{img_id}.jpg"})
        for _ in range(2 + img_id % 3):
            w, h = sizes[rng.randrange(len(sizes))]
            x = rng.uniform(0, 200 - w)
            y = rng.uniform(0, 200 - h)
            anns.append(
                {
                    "id": ann_id,
                    "image_id": img_id * 10,
                    "category_id": CAT_IDS[rng.randrange(3)],
                    "bbox": [x, y, float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    # one crowd annotation
    anns.append(
        {
            "id": ann_id,
            "image_id": 30,
            "category_id": 3,
            "bbox": [5.0, 5.0, 70.0, 60.0],
            "area": 4200.0,
            "iscrowd": 1,
        }
    )
    cats = [{"id": c, "name": f"c{c}"} for c in CAT_IDS]
    return {"images": images, "annotations": anns, "categories": cats}


def _make_dets(gt: dict) -> list:
    rng = random.Random(1)
    dets = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        r = rng.random()
        if r < 0.15:
            continue  # missed
        jit = 0.03 if r < 0.6 else 0.15
        bb = [
            x + rng.gauss(0, jit * w),
            y + rng.gauss(0, jit * h),
            w * (1 + rng.gauss(0, jit)),
            h * (1 + rng.gauss(0, jit)),
        ]
        cat = a["category_id"]
        if rng.random() < 0.15:  # wrong class
            cat = rng.choice([c for c in CAT_IDS if c != cat])
        dets.append({"image_id": a["image_id"], "category_id": cat, "bbox": bb, "score": rng.uniform(0.3, 1.0)})
    for img in gt["images"]:  # false positives
        for _ in range(2):
            w, h = rng.uniform(8, 100), rng.uniform(8, 100)
            dets.append(
                {
                    "image_id": img["id"],
                    "category_id": rng.choice(CAT_IDS),
                    "bbox": [rng.uniform(0, 200 - w), rng.uniform(0, 200 - h), w, h],
                    "score": rng.uniform(0.0, 0.8),
                }
            )
    return dets


@pytest.fixture(scope="module")
def gt():
    return _make_gt()


@pytest.fixture(scope="module")
def dets(gt):
    return _make_dets(gt)


def test_gt_fixture_spans_area_ranges(gt):
    areas = [a["area"] for a in gt["annotations"] if not a["iscrowd"]]
    assert min(areas) < 32**2 and max(areas) > 96**2
    assert any(32**2 <= a < 96**2 for a in areas)


def test_faster_matches_pycocotools(gt, dets):
    pytest.importorskip("pycocotools")
    dets_before = copy.deepcopy(dets)
    gt_before = copy.deepcopy(gt)
    fast = coco_metrics(gt, dets, backend="faster")
    ref = coco_metrics(gt, dets, backend="pycocotools")
    assert dets == dets_before  # inputs not mutated
    assert gt == gt_before
    assert set(fast) == set(METRIC_NAMES)
    for k in METRIC_NAMES:
        assert fast[k] == pytest.approx(ref[k], abs=1e-6), k
    for k in METRIC_NAMES:
        assert 0.0 < fast[k] < 100.0, (k, fast[k])


def test_gt_input_types_agree(gt, dets, tmp_path):
    from faster_coco_eval import COCO

    p = tmp_path / "gt.json"
    p.write_text(json.dumps(gt))
    ref = coco_metrics(gt, dets)
    assert coco_metrics(str(p), dets) == pytest.approx(ref, abs=1e-9)
    assert coco_metrics(p, dets) == pytest.approx(ref, abs=1e-9)
    assert coco_metrics(COCO(copy.deepcopy(gt)), dets) == pytest.approx(ref, abs=1e-9)
    pycoco = pytest.importorskip("pycocotools.coco")
    c = pycoco.COCO()
    c.dataset = copy.deepcopy(gt)
    c.createIndex()
    assert coco_metrics(c, dets) == pytest.approx(ref, abs=1e-9)
    assert coco_metrics(COCO(copy.deepcopy(gt)), dets, backend="pycocotools") == pytest.approx(ref, abs=1e-6)


def test_perfect_detections(gt):
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]
    m = coco_metrics(gt, perfect)
    for k in METRIC_NAMES:
        assert m[k] == pytest.approx(100.0), k


def test_empty_detections(gt):
    assert coco_metrics(gt, []) == {k: 0.0 for k in METRIC_NAMES}
    assert coco_metrics(gt, [], backend="pycocotools") == {k: 0.0 for k in METRIC_NAMES}


def test_an_area_range_without_ground_truth_is_not_measured(gt, dets):
    """COCO reports -1 for an area range without ground truth; samkd None (null in summary.json), not a score."""
    no_large = {**gt, "annotations": [a for a in gt["annotations"] if a["area"] <= 96**2]}
    assert len(no_large["annotations"]) < len(gt["annotations"])
    for backend in ("faster", "pycocotools"):
        m = coco_metrics(no_large, dets, backend=backend)
        assert m["APl"] is None and all(0.0 < m[k] < 100.0 for k in ("AP", "AP50", "AP75", "APs", "APm")), m
        # no detections: nothing found where there is ground truth (0), nothing measured where there is none
        assert coco_metrics(no_large, [], backend=backend) == {**{k: 0.0 for k in METRIC_NAMES}, "APl": None}
    only_crowd = {**gt, "annotations": [a for a in gt["annotations"] if a["iscrowd"]]}
    assert coco_metrics(only_crowd, []) == {k: None for k in METRIC_NAMES}


def test_measured_reads_null_nan_and_the_old_minus_one_as_not_measured():
    from samkd.engine.evaluate import format_metric, measured
    assert [measured(v) for v in (None, -1.0, -1, float("nan"), "12", True)] == [None] * 6
    assert (measured(0), measured(12.5)) == (0.0, 12.5)
    assert [format_metric(v) for v in (-1.0, None, 0.0, 12.345)] == ["n/a", "n/a", "0.0", "12.3"]


def test_img_ids_restriction(gt, dets):
    sub = [10, 20]
    sub_gt = {
        "images": [i for i in gt["images"] if i["id"] in sub],
        "annotations": [a for a in gt["annotations"] if a["image_id"] in sub],
        "categories": gt["categories"],
    }
    sub_dets = [d for d in dets if d["image_id"] in sub]
    expected = coco_metrics(sub_gt, sub_dets)
    assert coco_metrics(gt, dets, img_ids=sub) == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError):
        coco_metrics(gt, dets, img_ids=[12345])


def test_quiet_by_default(gt, dets, capsys):
    coco_metrics(gt, dets)
    coco_metrics(gt, dets, backend="pycocotools")
    assert capsys.readouterr().out == ""
    coco_metrics(gt, dets, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_detections_to_coco():
    outputs = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.5, 4.0]]),
            "scores": torch.tensor([0.9, 0.123456789]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    res = detections_to_coco(outputs, [torch.tensor(42), 7], LABEL_TO_CAT)
    assert len(res) == 2
    assert res[0] == {"image_id": 42, "category_id": 1, "bbox": [10.0, 20.0, 20.0, 40.0], "score": pytest.approx(0.9)}
    assert res[1]["category_id"] == 7
    assert res[1]["bbox"] == pytest.approx([0.0, 0.0, 5.5, 4.0])
    assert res[1]["score"] == pytest.approx(0.12346)
    for r in res:
        assert type(r["image_id"]) is int and type(r["category_id"]) is int and type(r["score"]) is float
        assert all(type(v) is float for v in r["bbox"])
    # list mapping indexed by label also works
    res2 = detections_to_coco(outputs[:1], [42], [0, 1, 3, 7])
    assert [r["category_id"] for r in res2] == [1, 7]
    with pytest.raises(KeyError):
        detections_to_coco(outputs[:1], [42], {1: 1})


# --------------------------------------------------------------------------- #
# evaluate()
# --------------------------------------------------------------------------- #
class FakeDetector(torch.nn.Module):
    """Returns stored predictions for an image, identified by its first pixel value."""

    def __init__(self, preds_by_index):
        super().__init__()
        self.preds = preds_by_index
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.modes_seen = []

    def forward(self, images):
        self.modes_seen.append(self.training)
        assert not self.training
        return [self.preds[int(img[0, 0, 0].item())] for img in images]


def _preds_from_dets(gt, dets):
    cat_to_label = {v: k for k, v in LABEL_TO_CAT.items()}
    preds = []
    for img in gt["images"]:
        ds = [d for d in dets if d["image_id"] == img["id"]]
        boxes = torch.tensor([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]] for d in ds], dtype=torch.float32).reshape(-1, 4)
        preds.append(
            {
                "boxes": boxes,
                "scores": torch.tensor([d["score"] for d in ds], dtype=torch.float32),
                "labels": torch.tensor([cat_to_label[d["category_id"]] for d in ds], dtype=torch.int64),
            }
        )
    return preds


class FakeDataset(torch.utils.data.Dataset):
    def __init__(self, gt, indices):
        self.gt = gt
        self.indices = indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        idx = self.indices[i]
        img = torch.full((3, 8, 8), float(idx))
        img_id = self.gt["images"][idx]["id"]
        return img, {"image_id": torch.tensor(img_id) if idx % 2 else img_id}


def _collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


@pytest.mark.parametrize("indices", [list(range(6)), [1, 4, 5]])
def test_evaluate_matches_coco_metrics(gt, dets, indices):
    preds = _preds_from_dets(gt, dets)
    model = FakeDetector(preds)
    model.train()
    loader = torch.utils.data.DataLoader(FakeDataset(gt, indices), batch_size=2, collate_fn=_collate)
    m = evaluate(model, loader, gt, LABEL_TO_CAT, progress=False)
    assert model.training  # flag restored
    assert model.modes_seen and not any(model.modes_seen)

    ids = [gt["images"][i]["id"] for i in indices]
    expected_dets = detections_to_coco([preds[i] for i in indices], ids, LABEL_TO_CAT)
    expected = coco_metrics(gt, expected_dets, img_ids=ids)
    assert m == pytest.approx(expected, abs=1e-9)
    if len(indices) == 6:
        # rounding/float32 conversion should not change the numbers materially
        direct = coco_metrics(gt, dets)
        for k in METRIC_NAMES:
            assert m[k] == pytest.approx(direct[k], abs=0.5)

    model.eval()
    evaluate(model, loader, gt, LABEL_TO_CAT, progress=False)
    assert not model.training


# --------------------------------------------------------------------------- #
# evaluate() under DDP (2 CPU processes, gloo)
# --------------------------------------------------------------------------- #
def _ddp_worker(rank, world_size, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        gt = _make_gt()
        preds = _preds_from_dets(gt, _make_dets(gt))
        # 5 images over 2 ranks, padded like DistributedSampler (index 0 repeated)
        shards = {0: [0, 2, 4], 1: [1, 3, 0]}
        loader = torch.utils.data.DataLoader(FakeDataset(gt, shards[rank]), batch_size=2, collate_fn=_collate)
        m = evaluate(FakeDetector(preds), loader, gt, LABEL_TO_CAT, progress=False)
        torch.save(m, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_evaluate_ddp_gathers_all_ranks(gt, dets, tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    m0 = torch.load(tmp_path / "rank0.pt")
    m1 = torch.load(tmp_path / "rank1.pt")
    assert m0 == m1
    preds = _preds_from_dets(gt, dets)
    idx = [0, 1, 2, 3, 4]
    ids = [gt["images"][i]["id"] for i in idx]
    expected = coco_metrics(gt, detections_to_coco([preds[i] for i in idx], ids, LABEL_TO_CAT), img_ids=ids)
    assert m0 == pytest.approx(expected, abs=1e-9)
