"""benchmarks/sld_study.py: its diagnostics against by-hand formulas, its scheduler, its analysis, its --quick run."""
from __future__ import annotations

import importlib
import json
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from samkd.losses import LOSSES, SLDLoss
from samkd.models.taps import Taps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # spawned workers import the script by this name too
study = importlib.import_module("sld_study")


@pytest.fixture
def study_loss():
    """The study's SLD in samkd's loss table for one test only (other tests iterate over that table)."""
    study.register_study_loss()
    yield
    LOSSES.pop(study.STUDY_LOSS, None)


def test_importing_the_study_leaves_the_loss_table_alone():
    assert study.STUDY_LOSS not in LOSSES


# ----------------------------------------------------------------------------------------------- by-hand helpers
def bernoulli_kl(zs, zt, T):
    """T^2 [p log(p/q) + (1-p) log((1-p)/(1-q))], p = sigmoid(zt/T), q = sigmoid(zs/T)."""
    p, q = torch.sigmoid(zt / T), torch.sigmoid(zs / T)
    return T * T * (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q)))


def softmax_weights(ft, fs):
    """H W softmax(D / mean D) with D = mean_c (ft - fs)^2, per image: (N, H, W)."""
    n, _, h, w = ft.shape
    d = ((ft - fs) ** 2).mean(1)
    d = d / d.mean(dim=(1, 2), keepdim=True)
    return h * w * torch.exp(d) / torch.exp(d).sum(dim=(1, 2), keepdim=True)


def _taps(features, logits, targets, batch_shape):
    return Taps(features=features, cls_logits=logits, num_anchors=1, num_logit_classes=logits[0].shape[1],
                targets=targets, batch_shape=batch_shape)


# ----------------------------------------------------------------------------------------------- location masks
def test_gt_class_map_marks_the_fcos_points_strictly_inside_each_box():
    # 32 px batch, a 4x4 level: stride 8, points at 0, 8, 16, 24 on each axis
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 12.0], [8.0, 0.0, 16.0, 30.0]]),
                "labels": torch.tensor([2, 1])}]
    gt = study.gt_class_map(targets, (4, 4), (32, 32), num_classes=3)
    expected = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    expected[0, 2, 1, 1] = expected[0, 2, 1, 2] = True  # 4 < x < 20 -> x in {8, 16}; 4 < y < 12 -> y = 8
    # the second box: 8 < x < 16 holds for no point (x = 8 and x = 16 lie on its edges)
    assert torch.equal(gt, expected)


def test_teacher_error_masks_split_false_positives_and_confusions():
    # 16 px batch, 2x2 level (stride 8): points (x, y) = (0,0) (8,0) (0,8) (8,8); one box of class 1 around (8,8)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 12.0, 12.0]]), "labels": torch.tensor([1])}]
    logits = torch.full((1, 3, 2, 2), -10.0)
    logits[0, 2, 0, 0] = math.log(0.9 / 0.1)  # class 2 at 0.9 outside every box: a false positive
    logits[0, 1, 0, 1] = math.log(0.2 / 0.8)  # 0.2: not confident
    logits[0, 0, 1, 0] = 10.0  # the background logit is never a detection
    logits[0, 2, 1, 1] = math.log(0.8 / 0.2)  # class 2 inside the class-1 box: a confusion
    m = study.teacher_error_masks(logits, targets, (16, 16), num_anchors=1, num_classes=3, thresh=0.3)
    assert m["fp"].tolist() == [[[True, False], [False, False]]]
    assert m["confusion"].tolist() == [[[False, False], [False, True]]]
    assert m["errors"].tolist() == [[[True, False], [False, True]]]
    assert m["inside"].tolist() == [[[False, False], [False, True]]]
    logits[0, 1, 1, 1] = 5.0  # now class 1 (right) tops class 2 inside its box: no error there
    assert not study.teacher_error_masks(logits, targets, (16, 16), 1, 3)["confusion"].any()


def test_weight_mass_and_concentration_by_hand():
    w = torch.tensor([[[6.0, 1.0], [0.5, 0.5]]])  # mean 2
    inside = torch.tensor([[[True, False], [False, True]]])
    assert study.mass_share(w, inside).item() == pytest.approx((6.0 + 0.5) / 8.0)
    c = study.concentration(w)
    assert c["w_max"].item() == pytest.approx(6.0 / 2.0)
    assert c["top1_share"].item() == pytest.approx(6.0 / 8.0)  # 1% of 4 locations rounds up to one location
    assert c["support"].item() == pytest.approx(8.0 ** 2 / (4 * (36 + 1 + 0.25 + 0.25)))


def test_loss_shares_sum_levels_as_the_loss_does():
    """share = sum_l mean(W kd E) / sum_l mean(W kd), each level averaged over its own locations."""
    stats = [study.LevelStats(), study.LevelStats()]
    w0, kd0 = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]]), torch.tensor([[[1.0, 3.0], [2.0, 0.0]]])
    e0 = torch.tensor([[[True, False], [True, False]]])
    w1, kd1 = torch.tensor([[[1.0]]]), torch.tensor([[[4.0]]])
    e1 = torch.tensor([[[False]]])
    for s, w, kd, e in ((stats[0], w0, kd0, e0), (stats[1], w1, kd1, e1)):
        masks = {"errors": e, "fp": e, "confusion": torch.zeros_like(e), "inside": ~e}
        s.add(w, kd, masks, top=torch.ones_like(w))
    shares = study.loss_shares([s.result() for s in stats])
    level0 = (2 * 1 + 1 * 2) / 4  # mean over 4 locations of W kd on errors
    total = (2 * 1 + 0 * 3 + 1 * 2 + 1 * 0) / 4 + 4.0 / 1
    assert shares["sld_share_errors"] == pytest.approx(level0 / total)
    assert shares["kd_share_errors"] == pytest.approx(((1 + 2) / 4) / ((1 + 3 + 2 + 0) / 4 + 4.0))
    assert stats[0].result()["mass_fp"] == pytest.approx((2 + 1) / 4)


# ----------------------------------------------------------------------------------------------- the study's SLD
def _random_taps(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 4), (2, 2), (1, 1)]
    fs = [torch.randn(2, 8, h, w, generator=g) for h, w in shapes]
    ft = [torch.randn(2, 8, h, w, generator=g) for h, w in shapes]
    zs = [torch.randn(2, 3, h, w, generator=g) for h, w in shapes]
    zt = [torch.full((2, 3, h, w), -8.0) for h, w in shapes]
    zt[0][0, 2, 0, 0] = 3.0  # image 0, P3, point (0, 0): class 2, no box there -> false positive
    zt[0][1, 2, 1, 1] = 3.0  # image 1, P3, point (8, 8): class 2 inside a class-1 box -> confusion
    zt[0][1, 1, 2, 2] = 3.0  # image 1, P3, point (16, 16): class 1 inside its box -> right
    targets = [{"boxes": torch.tensor([[20.0, 20.0, 30.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "labels": torch.tensor([1])}]
    batch = (32, 32)
    return _taps(fs, zs, targets, batch), _taps(ft, zt, targets, batch)


def test_study_sld_with_no_switch_is_sld():
    s, t = _random_taps()
    expected = SLDLoss(8, 3)(s, t)["sld"]
    assert study.StudySLDLoss(8, 3)(s, t)["sld"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_study_sld_switches_by_hand():
    s, t = _random_taps()
    T = 2.0
    kd = [bernoulli_kl(zs, zt, T).sum(1) for zs, zt in zip(s.cls_logits, t.cls_logits)]
    w = [softmax_weights(ft, fs) for fs, ft in zip(s.features, t.features)]
    errors = torch.zeros(2, 4, 4)
    errors[0, 0, 0] = errors[1, 1, 1] = 1.0  # the false positive and the confusion placed in _random_taps
    fp_only = torch.zeros(2, 4, 4)
    fp_only[0, 0, 0] = 1.0
    keep = [1 - errors, torch.ones(2, 2, 2), torch.ones(2, 1, 1)]
    no_errors = sum((wl * kl * k).mean() for wl, kl, k in zip(w, kd, keep))
    no_fp = (w[0] * kd[0] * (1 - fp_only)).mean() + (w[1] * kd[1]).mean() + (w[2] * kd[2]).mean()
    # every location of every level the same weight: L sum_l sum_{n,h,w} / sum_l N H_l W_l (2 images, 16 + 4 + 1)
    per_location_no_errors = 3 * sum((wl * kl * k).sum() for wl, kl, k in zip(w, kd, keep)) / (2 * (16 + 4 + 1))
    loss = lambda **kw: study.StudySLDLoss(8, 3, **kw)(s, t)["sld"].item()  # noqa: E731
    assert loss(skip="teacher_errors", level_weighting="level") == pytest.approx(no_errors.item(), rel=1e-5)
    assert loss(skip="teacher_fp", level_weighting="level") == pytest.approx(no_fp.item(), rel=1e-5)
    assert loss(skip="teacher_errors", level_weighting="location", beta_sld=0.5) == pytest.approx(
        0.5 * per_location_no_errors.item(), rel=1e-5)


def test_the_area_variant_is_sfd_plus_sld_with_every_location_weighing_the_same():
    """`sfd_sld_area` = SAMKD (its SFD untouched) whose SLD sums every location of every level alike."""
    from samkd.losses import build_loss
    s, t = _random_taps()
    (name, block), = study.VARIANTS["sfd_sld_area"].losses.items()
    terms = build_loss(name, 8, 3, **block)(s, t)
    kd = [bernoulli_kl(zs, zt, 2.0).sum(1) for zs, zt in zip(s.cls_logits, t.cls_logits)]
    w = [softmax_weights(ft, fs) for fs, ft in zip(s.features, t.features)]
    per_location = 3 * sum((wl * kl).sum() for wl, kl in zip(w, kd)) / (2 * (16 + 4 + 1))
    per_level = sum((wl * kl).mean() for wl, kl in zip(w, kd))
    assert set(terms) == {"sfd", "sld"}
    assert terms["sld"].item() == pytest.approx(study.SAMKD_WEIGHT * per_location.item(), rel=1e-5)
    assert per_location.item() != pytest.approx(per_level.item(), rel=1e-2)  # the taps tell the two apart


def test_study_variants_are_valid_configs_and_the_split_sld_equals_samkd(study_loss):
    """SFD + the study's SLD with no switch is SAMKD exactly (same masks, same terms), so each variant differs
    from SAMKD by its switch alone."""
    from samkd.config import config_from_dict
    from samkd.distill import Distiller
    from samkd.models import build_detector

    for name, variant in study.VARIANTS.items():
        raw = study.student_config(study.bench_params(True), Path("/data"), 0, variant.losses, "t.pt")
        config_from_dict({**raw, "output_dir": "/tmp/x"}, source=name)
    common = dict(num_classes=3, min_size=64, max_size=64, anchor_sizes=[4, 8, 16, 32, 64])
    torch.manual_seed(0)
    student, teacher = build_detector("fcos", "resnet18", **common), build_detector("fcos", "resnet18", **common)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 30.0]]), "labels": torch.tensor([1])}] * 2
    terms = []
    for losses in ({"samkd": {}}, {"samkd": {"use_sld": False}, study.STUDY_LOSS: {}}):
        torch.manual_seed(1)
        distiller = Distiller(student, teacher, losses=losses).train()
        torch.manual_seed(2)
        out = distiller(images, targets)
        terms.append({k: v.item() for k, v in out.items() if k.startswith("distill/")})
        distiller.remove_hooks()
    assert terms[0].keys() == terms[1].keys() == {"distill/sfd", "distill/sld"}
    for k in terms[0]:
        assert terms[1][k] == pytest.approx(terms[0][k], rel=1e-5)


def test_tap_diagnostics_gradient_ratio_is_the_ratio_of_logit_gradient_norms():
    from samkd.distill import Distiller
    from samkd.models import build_detector

    common = dict(num_classes=3, min_size=64, max_size=64, anchor_sizes=[4, 8, 16, 32, 64])
    torch.manual_seed(0)
    distiller = Distiller(build_detector("fcos", "resnet18", **common), build_detector("fcos", "resnet18", **common),
                          losses={})
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 20.0, 60.0, 60.0]]), "labels": torch.tensor([2])}]
    for m in distiller.student.modules():  # BatchNorm in train mode moves its statistics: freeze them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.0
    diag = study.tap_diagnostics(distiller, [(images, targets)], {"samkd": {}})
    det, s, t = distiller.compare(images, targets)
    sld = SLDLoss(256, 5)(s, t)["sld"]
    g_sld = torch.autograd.grad(sld, s.cls_logits, retain_graph=True)
    g_cls = torch.autograd.grad(det["classification"], s.cls_logits)
    norm = lambda gs: math.sqrt(sum(float((g ** 2).sum()) for g in gs))  # noqa: E731
    assert diag["sld_grad_ratio"] == pytest.approx(norm(g_sld) / norm(g_cls), rel=1e-4)
    coarse = sum(float((g ** 2).sum()) for g in g_sld[2:]) / norm(g_sld) ** 2
    assert diag["sld_grad_share_p5_p7"] == pytest.approx(coarse, rel=1e-4)
    assert diag["own_grad_ratio"] == pytest.approx(diag["sld_grad_ratio"], rel=1e-6)  # SAMKD's own term is SLD
    assert len(diag["levels"]) == 5 and 0.0 <= diag["mass_inside"] <= 1.0


# ----------------------------------------------------------------------------------------------- detections
def test_match_detections_counts_and_copied_false_positives_by_hand():
    gt = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]), "labels": torch.tensor([1, 2])}
    det = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0],     # tp (class 1)
                                  [0.0, 0.0, 10.0, 9.0],      # dup: class 1 box already matched
                                  [20.0, 20.0, 30.0, 30.0],   # confusion: class 3 on the class-2 box
                                  [50.0, 50.0, 60.0, 60.0],   # fp
                                  [70.0, 70.0, 80.0, 80.0],   # fp, but below the confidence threshold
                                  [40.0, 0.0, 50.0, 10.0]]),  # fp
           "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.2, 0.5]), "labels": torch.tensor([1, 1, 3, 2, 2, 1])}
    m = study.match_detections(det, gt, conf=0.3)
    assert (m["tp"], m["dup"], m["confusion"], m["fp"], m["confident"], m["gt"]) == (1, 1, 1, 2, 5, 2)
    assert m["found"].tolist() == [True, False] and m["confused"].tolist() == [False, True]
    teacher_fp = torch.tensor([[51.0, 51.0, 60.0, 60.0], [0.0, 40.0, 10.0, 50.0]])  # overlaps the first fp only
    assert study.copied_false_positives(m["fp_boxes"], teacher_fp) == 1
    stats = study.detection_stats([det], [gt], num_classes=4,
                                  teacher_dets=[{"boxes": teacher_fp, "scores": torch.tensor([0.9, 0.9]),
                                                 "labels": torch.tensor([1, 1])}], conf=0.3)
    assert stats["fp_share"] == pytest.approx(2 / 5) and stats["recall"] == pytest.approx(1 / 2)
    assert stats["copied_fp_share"] == pytest.approx(1 / 2)
    assert stats["class_confusion_rate"] == {"1": 0.0, "2": 1.0, "3": 0.0}


def test_coco_detail_matches_the_library_evaluator_overall_and_per_class():
    pytest.importorskip("faster_coco_eval")
    from faster_coco_eval import COCO

    from samkd.engine.evaluate import coco_metrics
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in range(3)]
    anns = [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 40, 40], "area": 1600, "iscrowd": 0}]
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    dets = [{"image_id": 0, "category_id": 1, "bbox": [12, 10, 30, 30], "score": 0.9},
            {"image_id": 1, "category_id": 2, "bbox": [10, 10, 20, 20], "score": 0.8},
            {"image_id": 2, "category_id": 1, "bbox": [0, 0, 38, 40], "score": 0.4},
            {"image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "score": 0.7}]
    gt = COCO()
    gt.dataset = json.loads(json.dumps(data))
    gt.createIndex()
    detail = study.coco_detail(gt, dets)
    assert detail["AP"] == pytest.approx(coco_metrics(data, dets)["AP"], abs=1e-6)
    for cat in (1, 2):
        only = {**data, "annotations": [a for a in anns if a["category_id"] == cat]}
        expected = coco_metrics(only, [d for d in dets if d["category_id"] == cat])["AP"]
        assert detail["per_class_AP"][str(cat)] == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------------------------- plan and scheduler
def test_plan_runs_the_sld_pairs_of_every_data_seed_first():
    order = study.plan_students((0, 2, 3), (0, 1), ("sfd", "samkd", "sfd_sld_noerr", "sfd_kd"))
    assert order[:6] == [(0, 0, "sfd"), (0, 0, "samkd"), (2, 0, "sfd"), (2, 0, "samkd"), (3, 0, "sfd"),
                         (3, 0, "samkd")]
    assert order[6:9] == [(0, 0, "sfd_sld_noerr"), (2, 0, "sfd_sld_noerr"), (3, 0, "sfd_sld_noerr")]
    assert len(order) == len(set(order)) == 3 * 2 * 4


def test_the_plan_dry_run_prints_the_simulated_schedule_and_writes_nothing(tmp_path, capsys, study_loss):
    out = tmp_path / "out"
    assert study.main(["--plan", "--out", str(out), "--data-seeds", "0", "2", "--seeds", "0", "--variants", "sfd",
                       "samkd", "sfd_kd", "--jobs", "2", "--budget-s", "380", "--teacher-est-s", "100",
                       "--student-est-s", "100"]) == 0
    # by hand, 2 slots: both teachers 0-100 s, then the students in pairs, 100-200 and 200-300; the third pair would
    # start at 300 and end at 400 > 380: not started
    lines = capsys.readouterr().out.splitlines()
    assert "2 teachers, 6 students" in lines[0] and "4 students would finish by 300s" in lines[0]
    plan = [line.split()[1] for line in lines[1:]]
    assert plan == ["d0", "d2", "d0/s0/sfd", "d0/s0/samkd", "d2/s0/sfd", "d2/s0/samkd", "d0/s0/sfd_kd", "d2/s0/sfd_kd"]
    assert [line.endswith("(finishes in the simulation)") for line in lines[1:]] == [True] * 6 + [False] * 2
    assert not out.exists()


def test_the_study_teachers_are_the_bench_teachers_in_their_pinned_folder(monkeypatch):
    """Its default cache and teacher configs are `samkd bench --suite fcos`'s (tests/test_bench.py pins that
    folder), so a teacher the bench trained is read back, not trained again."""
    import samkd.data
    from samkd.bench import run_dir
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(samkd.data, "make_synthetic_dataset", lambda *args, **kwargs: None)  # write no data
    work = study.default_work_dir()
    p = study.bench_params(False)
    teacher = run_dir(work, study.teacher_run_name(0), study.teacher_config(p, study.make_data(work, p, 0)))
    assert teacher == Path("benchmarks/work/runs/teacher-fcos-d0-c59f8de949")


def test_a_finished_teacher_leaves_slots_for_the_higher_priority_runs_of_teachers_still_training():
    tasks = study.build_tasks((0, 2), (0, 1), ("sfd", "samkd"))[2:]  # the students
    status = {0: "ok", 2: "running"}.get
    launch, drop = study.select_launches(tasks, busy=1, jobs=5, now=10.0, budget_s=100.0,
                                         estimate={"teacher": 50.0, "student": 20.0}.get, teacher_status=status)
    assert [t.key for t in launch] == ["d0/s0/sfd", "d0/s0/samkd"] and not drop  # 1 busy + 2 + d2's 2 reserved
    launch, _ = study.select_launches(tasks, 1, 5, now=85.0, budget_s=100.0,
                                      estimate={"teacher": 50.0, "student": 20.0}.get, teacher_status=status)
    assert launch == []  # nothing that would end after the budget starts
    _, drop = study.select_launches(tasks, 0, 5, 10.0, 100.0, {"teacher": 50.0, "student": 20.0}.get,
                                    {0: "ok", 2: "failed"}.get)
    assert {t.key for t in drop} == {"d2/s0/sfd", "d2/s0/samkd", "d2/s1/sfd", "d2/s1/samkd"}


def _fake_run(job):
    """Teachers take 0.3 s (data seed 9 fails), students 0.1 s; a student of data seed 7 hangs."""
    if job["kind"] == "teacher":
        time.sleep(0.3)
        return {"ok": job["data_seed"] != 9, "error": "boom", "duration_s": 0.3}
    if job["data_seed"] == 7:
        job["release"].wait(10)
    time.sleep(0.1)
    return {"ok": True, "duration_s": 0.1, "teacher_seen": job["teacher"]["ok"]}


def test_the_scheduler_waits_for_teachers_drops_orphans_and_abandons_runs_past_the_deadline():
    release = threading.Event()
    done, progress = [], []
    tasks = study.build_tasks((0, 9, 7), (0,), ("sfd", "samkd"))
    with ThreadPoolExecutor(max_workers=3) as pool:
        scheduler = study.Scheduler(pool, _fake_run, lambda task, teacher: {"kind": task.kind, "release": release,
                                                                            "data_seed": task.data_seed,
                                                                            "teacher": teacher},
                                    lambda task, rec, now: done.append((task.key, rec)), jobs=3, budget_s=1.5,
                                    grace_s=0.2, priors={"teacher": 0.5, "student": 0.2}, poll_s=0.05,
                                    on_progress=lambda: progress.append(len(done)))
        result = scheduler.run(tasks)
        release.set()
    assert progress[0] == 0 and progress[-1] == len(done)  # called after every pass, the last one included
    keys = [k for k, _ in done]
    assert set(keys[:3]) == {"d0", "d7", "d9"}  # the teachers come first (in any order: they end together)
    assert {"d0/s0/sfd", "d0/s0/samkd"} <= set(keys) and all(rec["teacher_seen"] for k, rec in done if "/" in k)
    assert set(result["dropped"]) == {"d9/s0/sfd", "d9/s0/samkd"}  # their teacher failed
    assert set(result["abandoned"]) == {"d7/s0/sfd", "d7/s0/samkd"}  # still running at budget + grace
    assert not result["not_started"]


def test_a_broken_pool_stops_new_runs_and_keeps_what_finished():
    class BreaksAfterTeachers(ThreadPoolExecutor):
        def submit(self, fn, *args):
            if args[0]["kind"] == "student":
                raise RuntimeError("A process in the process pool was terminated abruptly")
            return super().submit(fn, *args)

    done = []
    with BreaksAfterTeachers(max_workers=2) as pool:
        scheduler = study.Scheduler(pool, _fake_run, lambda task, teacher: {"kind": task.kind, "data_seed": 0,
                                                                            "teacher": teacher},
                                    lambda task, rec, now: done.append(task.key), jobs=2, budget_s=30.0,
                                    grace_s=1.0, priors={"teacher": 1.0, "student": 1.0}, poll_s=0.05)
        result = scheduler.run(study.build_tasks((0,), (0,), ("sfd", "samkd")))
    assert done == ["d0"] and result["not_started"] == ["d0/s0/sfd", "d0/s0/samkd"]


# ----------------------------------------------------------------------------------------------- analysis
def test_pearson_and_the_exact_permutation_p():
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 4.0, 3.0, 6.0]
    mx, my = sum(x) / 5, sum(y) / 5
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    r = cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert study.pearson(x, y) == pytest.approx(r)
    assert study.permutation_p(x, [1, 2, 3, 4, 5]) == pytest.approx(2 / 120)  # only the two perfect orders


def _run(ds, seed, variant, ap, **extra):
    return {"data_seed": ds, "seed": seed, "variant": variant, "metrics": {"AP": ap}, **extra}


def test_analysis_of_a_hand_made_study_finds_the_planted_mechanism():
    """SLD costs 3 AP on data seeds 3 and 4 and gains 2 elsewhere; removing the teacher's errors recovers it."""
    runs, teachers = {}, {}
    sld_effect = {0: 2.0, 2: 2.0, 3: -3.0, 4: -3.0}
    for ds, effect in sld_effect.items():
        teachers[f"d{ds}"] = {"metrics": {"AP": 25.0}, "detections": {"fp_per_image": 1.0 if effect > 0 else 3.0}}
        for seed in (0, 1):
            noise = {(0, 0): 0.3, (0, 1): -0.1, (2, 0): 0.2, (2, 1): -0.25, (3, 0): 0.15, (3, 1): -0.3,
                     (4, 0): 0.05, (4, 1): -0.2}[(ds, seed)]
            share = 0.1 if effect > 0 else 0.4
            diag = {"diag": {"start": {"sld_share_errors": share + noise / 10}}}
            runs[f"d{ds}/s{seed}/sfd"] = _run(ds, seed, "sfd", 8.0, **diag)
            runs[f"d{ds}/s{seed}/samkd"] = _run(ds, seed, "samkd", 8.0 + effect + noise, **diag)
            runs[f"d{ds}/s{seed}/sfd_sld_noerr"] = _run(ds, seed, "sfd_sld_noerr", 8.0 + max(effect, 0.5), **diag)
            runs[f"d{ds}/s{seed}/sfd_kd"] = _run(ds, seed, "sfd_kd", 8.0 + effect - noise, **diag)
    a = study.analyse(teachers, runs)
    assert a["sld_effect"]["all"]["mean"] == pytest.approx(-0.5 + sum([0.3, -0.1, 0.2, -0.25, 0.15, -0.3, 0.05,
                                                                       -0.2]) / 8)
    assert a["harmed_data_seeds"] == [3, 4]
    assert a["between_data_seeds"]["p"] < 0.1  # the data seed, not the training seed, decides the effect
    noerr = a["interventions"]["sfd_sld_noerr"]
    assert noerr["harmed_vs_samkd"]["mean"] == pytest.approx(3.5 - (0.15 - 0.3 + 0.05 - 0.2) / 4)
    assert noerr["cross_fitted"]["n"] == 8 and noerr["cross_fitted"]["r"] < -0.9  # gains where SLD hurt
    assert a["correlations"]["sld_loss_share_on_teacher_errors"]["r"] < -0.95
    verdict = {v["hypothesis"]: v["verdict"] for v in a["verdicts"]}
    assert verdict["teacher errors at SLD's focus (false positives, wrong classes)"] == "supported"
    assert verdict["the discrepancy weighting (vs plain KD)"] == "ruled out"
    assert verdict["noise (training-seed spread)"] == "ruled out"
    meta = {"command": "x", "date": "d", "machine": "m", "planned_students": 32, "data_seeds": [0, 2, 3, 4],
            "seeds": [0, 1], "variants": ["sfd", "samkd", "sfd_sld_noerr", "sfd_kd"], "teacher_steps": 1,
            "teacher_batch_size": 8, "steps": 1, "batch_size": 4, "image_size": 128, "train_images": 1,
            "val_images": 1}
    text = study.markdown({"meta": meta, "runs": runs, "teachers": teachers, "failed": {}, "analysis": a})
    assert "| d3 (never seen) | 25.0 | 3.00 |" in text and "*supported*" in text
    assert "**Supported:** teacher errors at SLD's focus" in study.answer(a)
    json.dumps(study._finite(a), allow_nan=False)


def test_intervention_verdict_rules():
    def iv(mean, t, n=5, harmed=None, sld=None, cross=None):
        h = {"n": 1, "mean": harmed} if harmed is not None else {"n": 0}
        hs = {"n": 1, "mean": sld} if sld is not None else {"n": 0}
        return {"vs_samkd": {"n": n, "mean": mean, "t": t}, "harmed_vs_samkd": h, "harmed_sld_effect": hs,
                "cross_fitted": None if cross is None else {"r": cross}}
    assert study._intervention_verdict(iv(1.0, 2.5)) == "supported"
    assert study._intervention_verdict(iv(0.3, 0.5, harmed=2.0, sld=-3.0, cross=-0.8)) == "supported"
    assert study._intervention_verdict(iv(0.3, 0.5, harmed=2.0, sld=-3.0)) == "suggested"  # no unbiased check
    assert study._intervention_verdict(iv(0.3, 0.5, harmed=2.0, sld=-3.0, cross=0.2)) == "inconclusive"
    assert study._intervention_verdict(iv(0.3, 0.5, harmed=1.0, sld=-3.0)) == "ruled out"  # < half the loss back
    assert study._intervention_verdict(iv(-1.0, -3.0)) == "ruled out"
    assert study._intervention_verdict(iv(0.2, 0.5, n=2)) == "inconclusive"  # too few pairs to rule out
    assert study._intervention_verdict(iv(0.8, 1.5)) == "inconclusive"


# ----------------------------------------------------------------------------------------------- the --quick run
@pytest.mark.slow
def test_the_quick_study_runs_end_to_end_and_writes_its_three_files(tmp_path, study_loss):
    out = tmp_path / "out"
    assert study.main(["--quick", "--jobs", "2", "--out", str(out), "--work-dir", str(tmp_path / "work"),
                       "--variants", "sfd", "samkd", "sfd_sld_noerr", "--budget-s", "1200"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sld_study.json", "sld_study.md", "sld_study.png"]
    payload = json.loads((out / "sld_study.json").read_text())
    assert payload["meta"]["status"] == "finished" and not payload["failed"]
    assert set(payload["teachers"]) == {"d0", "d2"} and len(payload["runs"]) == 6
    teacher = payload["teachers"]["d0"]
    assert {"AP", "AR100", "per_class_AP", "detections", "metrics"} <= set(teacher)
    run = payload["runs"]["d2/s0/sfd_sld_noerr"]
    assert run["losses"] == study.VARIANTS["sfd_sld_noerr"].losses
    assert run["AP"] == pytest.approx(run["metrics"]["AP"], abs=1e-6)  # own evaluation = the engine's
    for when in ("start", "end"):
        diag = run["diag"][when]
        assert len(diag["levels"]) == 5 and diag["sld_grad_ratio"] > 0 and "own_grad_ratio" in diag
        assert 0.0 <= diag["sld_share_errors"] <= 1.0 and 0.0 <= diag["mass_inside"] <= 1.0
    assert run["detections"]["copied_fp_share"] is not None and run["kd_to_task"] is not None
    analysis = payload["analysis"]
    assert set(analysis["sld_effect"]["pairs"]) == {"d0/s0", "d2/s0"} and "sfd_sld_noerr" in analysis["interventions"]
    assert "SLD study" in (out / "sld_study.md").read_text()
    # a second call reads every run back from the cache (teachers and students alike)
    again = tmp_path / "again"
    assert study.main(["--quick", "--jobs", "2", "--out", str(again), "--work-dir", str(tmp_path / "work"),
                       "--variants", "sfd", "samkd", "sfd_sld_noerr"]) == 0
    rerun = json.loads((again / "sld_study.json").read_text())["runs"]
    assert rerun["d2/s0/samkd"]["metrics"] == payload["runs"]["d2/s0/samkd"]["metrics"]
