"""TEST.EVAL_RESOLUTION, ReLA's metrics and the per-sample results, on hand-computed cases."""

import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from common import (
    GENERALIZED,
    INSTANT_TEST_VAL,
    MAPPER_OPTS,
    PLAIN,
    box_mask,
    captured_log,
    generalized_samples,
    import_train_net,
    make_cfg,
    mapper_record,
    rect_polygon,
    register_evaluator_metadata,
    results_file,
    run_evaluator,
    sample,
    train_net_args,
    write_image,
)
from vipa_d2.data import ReferringDatasetMapper
from vipa_d2.evaluation import print_csv_format
from vipa_d2.data.eval_resolution import InputResolutionMapper, build_test_mapper
from vipa_d2.evaluation import ReferringEvaluator
from vipa_d2.evaluation.rela_metrics import rela_metrics
from vipa_d2.modeling.meta_arch import REF_SEG_BEFORE_VETO

register_evaluator_metadata()

RELA_KEYS = ["cIoU", "gIoU", "N-acc", "T-acc", "Pr@0.7", "Pr@0.8", "Pr@0.9"]


def _at_input_size(inp, gt_mask):
    """``inp`` as the input-resolution mapper hands it over: height/width of the model input."""
    h, w = gt_mask.shape
    return dict(
        inp,
        height=h,
        width=w,
        original_height=inp["height"],
        original_width=inp["width"],
        gt_mask=gt_mask.to(torch.uint8),
    )


def test_the_two_resolutions_score_their_own_targets():
    # Original 6x8 image, target rows 0-1 x cols 0-3 (8 px); at a 4x4 input the target is
    # rows 0 x cols 0-1 (2 px).
    original = sample(0, 6, 8, [rect_polygon(0, 0, 4, 2)])
    small = _at_input_size(original, box_mask(4, 4, (0, 1), (0, 2)))
    # Original: predicted rows 0-1 x cols 0-2 (6 px) -> I=6, U=8, IoU 0.75.
    at_original = run_evaluator(PLAIN, [original], [{"ref_seg": box_mask(6, 8, (0, 2), (0, 3))}])
    # Input: predicted rows 0-1 x cols 0-1 (4 px) -> I=2, U=4, IoU 0.5.
    at_input = run_evaluator(
        PLAIN, [small], [{"ref_seg": box_mask(4, 4, (0, 2), (0, 2))}], resolution="input"
    )
    assert at_original["oIoU"] == pytest.approx(75.0) and at_original["Prec@0.7"] == 100.0
    assert at_input["oIoU"] == pytest.approx(50.0) and at_input["mIoU"] == pytest.approx(50.0)
    assert at_input["Prec@0.5"] == 100.0 and at_input["Prec@0.6"] == 0.0
    # "original" ignores gt_mask; "input" refuses a target of another size.
    assert (
        run_evaluator(
            PLAIN,
            [dict(original, gt_mask=small["gt_mask"])],
            [{"ref_seg": box_mask(6, 8, (0, 2), (0, 3))}],
        )
        == at_original
    )
    with pytest.raises(ValueError, match=r"'gt_mask' of .* \(4, 4\).*\(6, 8\).*build_test_mapper"):
        run_evaluator(
            PLAIN,
            [dict(original, gt_mask=small["gt_mask"])],
            [{"ref_seg": torch.zeros(6, 8)}],
            resolution="input",
        )
    with pytest.raises(ValueError, match="TEST.EVAL_RESOLUTION='480'"):
        ReferringEvaluator(PLAIN, distributed=False, resolution="480")


def test_input_resolution_mapper_gives_the_model_input_size(tmp_path):
    write_image(tmp_path / "a.png")  # 60 x 90: not square, so the sizes are told apart
    cfg = make_cfg(*MAPPER_OPTS)
    cfg.TEST.EVAL_RESOLUTION = "input"
    mapper = build_test_mapper(cfg)
    assert isinstance(mapper, InputResolutionMapper)
    out = mapper(mapper_record(tmp_path / "a.png"))
    assert (out["height"], out["width"]) == (32, 32) == tuple(out["gt_mask"].shape)
    assert (out["original_height"], out["original_width"]) == (60, 90)
    plain = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS), is_train=False)(mapper_record(tmp_path / "a.png"))
    assert (plain["height"], plain["width"]) == (60, 90)
    # An oracle prediction at the input size scores 100 there.
    metrics = run_evaluator(PLAIN, [out], [{"ref_seg": out["gt_mask"].float()}], resolution="input")
    assert metrics["oIoU"] == 100.0 and out["gt_mask"].sum() > 0
    cfg.TEST.EVAL_RESOLUTION = "native"
    with pytest.raises(ValueError, match="'original', 'input'"):
        build_test_mapper(cfg)


def csv_lines(results):
    """What print_csv_format logs, without the "copypaste: " prefix."""
    with captured_log("vipa_d2.evaluation.results_csv") as seen:
        print_csv_format(results)
    return [message.removeprefix("copypaste: ") for _, message in seen]


def test_rela_metrics_beside_ours_hand_computed():
    inputs, outputs = generalized_samples()
    evaluator = ReferringEvaluator(GENERALIZED, distributed=False)
    evaluator.process(inputs, outputs)
    results = evaluator.evaluate()
    # No-target is ReLA's positive class; the no-target score (> 0.5) is its classifier:
    # TP = samples 0, 5; FN = 1; TN = 2 (IoU 1), 3 (mask missed: IoU 0); FP = 4 (I=0, U=16).
    rela = results["rela"]
    assert list(rela) == RELA_KEYS
    assert rela["gIoU"] == pytest.approx(100.0 * 3 / 6)  # 1 + 0 + 1 + 0 + 0 + 1
    assert rela["cIoU"] == pytest.approx(100.0 * 4 / 25)  # I: 4; U: 1 + 4 + 4 + 16
    assert rela["N-acc"] == pytest.approx(200.0 / 3)  # TP / (TP + FN)
    assert rela["T-acc"] == pytest.approx(200.0 / 3)  # TN / (TN + FP): the missed mask counts
    for key in ("Pr@0.7", "Pr@0.8", "Pr@0.9"):
        assert rela[key] == pytest.approx(100.0 / 3)  # over target samples only: 1 of 3
    # Ours on the same predictions: T-acc asks for a non-empty mask, so it differs.
    assert results["refer"]["T-acc"] == pytest.approx(100.0 / 3)
    assert results["refer"]["N-acc"] == pytest.approx(200.0 / 3)
    # The csv lines that train_net logs keep N-acc and T-acc (detectron2's own print_csv_format
    # drops names with "-").
    lines = csv_lines(results)
    assert lines[lines.index("Task: rela") + 1] == ",".join(RELA_KEYS)
    assert lines[lines.index("Task: rela") + 2].split(",")[2] == f"{200.0 / 3:.4f}"
    assert "N-acc" in lines[lines.index("Task: refer") + 1].split(",")
    plain = ReferringEvaluator(PLAIN, distributed=False)
    plain.process(inputs[2:4], outputs[2:4])
    assert list(plain.evaluate()) == ["refer"]  # ReLA's metrics are for generalized data


def test_rela_union_of_a_wrong_no_target_verdict_is_the_mask_as_predicted(tmp_path):
    # ReLA never empties a mask for its no-target verdict: a target sample wrongly called
    # no-target adds I = 0 and the union of the mask as predicted (here 16 px, not the
    # target's 4) to cIoU, as the model's postprocess keeps it in ref_seg_before_veto.
    inputs = [sample(0, 4, 4, [rect_polygon(0, 0, 2, 2)]), sample(1, 4, 4, [rect_polygon(0, 0, 2, 2)])]
    outputs = [
        {"ref_seg": torch.zeros(4, 4), REF_SEG_BEFORE_VETO: torch.ones(4, 4), "no_target_score": torch.tensor(0.9)},
        {"ref_seg": box_mask(4, 4, (0, 2), (0, 2)), "no_target_score": torch.tensor(0.1)},
    ]
    evaluator = ReferringEvaluator(GENERALIZED, distributed=False, output_dir=str(tmp_path))
    evaluator.process(inputs, outputs)
    results = evaluator.evaluate()
    assert results["rela"]["cIoU"] == pytest.approx(100.0 * 4 / (16 + 4))
    # No no-target sample: our N-acc is NaN in the results, null in the (strict) JSON file.
    assert math.isnan(results["refer"]["N-acc"])
    with open(tmp_path / f"referring_results_{GENERALIZED}.json") as f:
        payload = json.loads(f.read(), parse_constant=lambda token: pytest.fail(f"non-JSON {token}"))
    assert payload["metrics"]["N-acc"] is None and payload["metrics"]["T-acc"] == 50.0
    assert results["refer"]["oIoU"] == pytest.approx(100.0 * 4 / (4 + 4))  # ours scores the emptied mask


def _row(no_target, pred_no_target, inter, union):
    return {
        "no_target": no_target,
        "pred_no_target": pred_no_target,
        "intersection": inter,
        "union": union,
    }


def test_rela_metric_edge_cases():
    # A target sample with an empty union has IoU 0; with no no-target sample ReLA reports
    # N-acc = T-acc = 0.
    rows = [_row(False, False, 0, 0), _row(False, False, 8, 10), _row(False, True, 5, 20)]
    m = rela_metrics(rows)
    assert m["gIoU"] == pytest.approx(100.0 * 0.8 / 3) and m["cIoU"] == pytest.approx(
        100.0 * 8 / 30
    )
    assert m["N-acc"] == m["T-acc"] == 0.0
    assert m["Pr@0.7"] == m["Pr@0.8"] == pytest.approx(100.0 / 3) and m["Pr@0.9"] == 0.0
    # Only correctly rejected no-target samples: nothing to divide by for cIoU and Pr@X.
    m = rela_metrics([_row(True, True, 0, 0)])
    assert m["gIoU"] == 100.0 and m["N-acc"] == 100.0
    assert all(math.isnan(m[k]) for k in ("cIoU", "T-acc", "Pr@0.7"))


def test_per_sample_results_carry_sentence_file_and_rle(tmp_path):
    inputs, outputs = generalized_samples()
    for i, inp in enumerate(inputs):
        inp.update(
            file_name=f"/data/img{i}.jpg",
            sentence=f"the thing number {i} ✓",
            empty=not inp["annotations"],
        )
    run_evaluator(GENERALIZED, inputs, outputs, output_dir=str(tmp_path), save_prediction_rle=True)
    payload = json.loads((tmp_path / f"referring_results_{GENERALIZED}.json").read_text())
    assert payload["resolution"] == "original" and list(payload["rela_metrics"]) == RELA_KEYS
    for i, (row, out) in enumerate(zip(payload["samples"], outputs)):
        assert (row["image_id"], row["ref_id"], row["sent_id"]) == (100 + i, 200 + i, 300 + i)
        assert (
            row["file_name"] == f"/data/img{i}.jpg" and row["sentence"] == f"the thing number {i} ✓"
        )
        pred = mask_util.decode(row["prediction"]).astype(bool)
        assert row["prediction"]["size"] == [4, 4]
        # The scored prediction: thresholded, emptied when judged no-target.
        vetoed = float(out["no_target_score"]) > 0.5
        expected = np.zeros((4, 4), bool) if vetoed else out["ref_seg"].numpy() > 0.5
        np.testing.assert_array_equal(pred, expected)
        assert row["pred_no_target"] == vetoed
    # Without the option no mask is kept.
    run_evaluator(GENERALIZED, inputs, outputs, output_dir=str(tmp_path))
    payload = json.loads((tmp_path / f"referring_results_{GENERALIZED}.json").read_text())
    assert "prediction" not in payload["samples"][0]


@pytest.mark.usefixtures("synthetic_datasets_root")
def test_eval_only_at_input_resolution_end_to_end(tmp_path):
    # Random weights: the point is where and how it is scored, not how well.
    results = import_train_net().main(
        train_net_args(
            tmp_path,
            "--eval-only",
            opts=[
                "MODEL.WEIGHTS",
                "",
                "TEST.EVAL_RESOLUTION",
                "input",
                "TEST.SAVE_PREDICTION_RLE",
                "True",
            ],
        )
    )
    payload = results_file(tmp_path)
    assert payload["resolution"] == "input" and payload["metrics"] == pytest.approx(
        results[INSTANT_TEST_VAL]["refer"]
    )
    assert payload["samples"]
    for row in payload["samples"]:
        assert row["prediction"]["size"] == [64, 64]  # the instant test's INPUT.IMAGE_SIZE, square
        assert row["sentence"] and row["file_name"].endswith(".jpg")
