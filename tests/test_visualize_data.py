"""tools/visualize_data.py: pictures of registered records and of the train loader's
samples, checked pixel by pixel against the records' own targets, and its refusals."""
import os

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from common import INSTANT_TEST_CONFIG, INSTANT_TEST_VAL, load_script, make_cfg, read_rgb
from detectron2.data.detection_utils import convert_image_to_rgb
from vipa_d2.engine import ReferringTrainer
from vipa_d2.data.masks import annotations_to_mask
from vipa_d2.utils.visualizer import BACKGROUND_DIM, CONTOUR_COLORS, SIDE_BY_SIDE_GAP, caption_layout

visualize_data = load_script("tools/visualize_data.py")
pytestmark = pytest.mark.usefixtures("single_thread", "synthetic_datasets_root")
# The synthetic_datasets_root images are 64 px on their long side; the outline rings take
# 1 px each, so a target's pixels this far inside its border keep the image's values.
INTERIOR_MARGIN = len(CONTOUR_COLORS) + 1


def _run(tmp_path, *args):
    return visualize_data.main(["--config-file", INSTANT_TEST_CONFIG, "--output-dir", str(tmp_path), *args])


def _check_overlay(picture, image, target, caption):
    """
    Below the caption band: the image dimmed off the target, unchanged inside it (away from
    the outline). Returns whether any of the target's inside was below the band to check.
    """
    _, band = caption_layout(caption, *image.shape[:2])
    body = slice(band, None)
    dimmed = (image.astype(np.float32) * BACKGROUND_DIM).round().astype(np.uint8)
    off = ~target
    np.testing.assert_array_equal(picture[body][off[body]], dimmed[body][off[body]])
    interior = cv2.erode(target.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=INTERIOR_MARGIN).astype(bool)
    np.testing.assert_array_equal(picture[body][interior[body]], image[body][interior[body]])
    return bool(interior[body].any())


def test_annotation_pictures_show_each_records_target_and_landmark(tmp_path):
    records = DatasetCatalog.get(INSTANT_TEST_VAL)
    num = 6
    assert _run(tmp_path, "--source", "annotation", "--dataset", INSTANT_TEST_VAL, "--num", str(num)) == 0
    folder = tmp_path / INSTANT_TEST_VAL
    assert len(os.listdir(folder)) == num
    kinds = set()
    for k, record in enumerate(records[:num]):
        picture = read_rgb(folder / f"{k:04d}_{record['image_id']}_{record['sentence']['sent_id']}.png")
        image = read_rgb(record["file_name"])
        h, w = image.shape[:2]
        target = annotations_to_mask(record["annotations"], h, w).astype(bool)
        landmark = record.get("landmark")
        kinds.add(landmark is not None)
        assert _check_overlay(picture[:, :w], image, target, visualize_data.caption(record))
        if landmark is None:
            assert picture.shape == (h, w, 3)
        else:  # the landmark object, drawn the same way, beside the target
            assert picture.shape == (h, 2 * w + SIDE_BY_SIDE_GAP, 3)
            landmark_mask = annotations_to_mask([landmark["annotation"]], h, w).astype(bool)
            assert _check_overlay(picture[:, w + SIDE_BY_SIDE_GAP:], image, landmark_mask, f"landmark: {landmark['phrase']}")
    assert kinds == {True, False}, "the first records should hold relations and other types"
    assert visualize_data.caption(records[0]).endswith(f"[{records[0]['type']}]")


def test_dataloader_pictures_are_the_train_loaders_samples(tmp_path):
    num = 3  # more than one batch of the instant test (2)
    # Twice the images' size: their objects then have insides wider than the outline.
    size = ["INPUT.IMAGE_SIZE", "128"]
    assert _run(tmp_path, "--source", "dataloader", "--num", str(num), *size) == 0
    # The loader is seeded by SEED: a second one gives the same samples in the same order,
    # also from a worker process (the tool maps in its own).
    cfg = make_cfg(*size, "DATALOADER.NUM_WORKERS", 1, config_file=INSTANT_TEST_CONFIG)
    loader = iter(ReferringTrainer.build_train_loader(cfg))
    samples = [sample for _ in range(2) for sample in next(loader)][:num]
    checked = []
    for k, sample in enumerate(samples):
        picture = read_rgb(tmp_path / "dataloader" / f"{k:04d}_{sample['image_id']}_{sample['sent_id']}.png")
        image = convert_image_to_rgb(sample["image"].permute(1, 2, 0).numpy(), cfg.INPUT.FORMAT)
        assert picture.shape == image.shape == (cfg.INPUT.IMAGE_SIZE, cfg.INPUT.IMAGE_SIZE, 3)
        checked.append(_check_overlay(picture, image, sample["gt_mask"].numpy().astype(bool), sample["sentence"]))
    assert any(checked), "no sample had its target's inside below the caption"
    assert len(os.listdir(tmp_path / "dataloader")) == num


def test_refusals_name_what_is_wrong(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path, "--source", "annotation", "--dataset", "no_such_dataset")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'no_such_dataset' is not registered" in err and INSTANT_TEST_VAL in err

    for args in (["--source", "dataloader", "--num", "0"], ["--source", "dataloader", "--dataset", INSTANT_TEST_VAL]):
        with pytest.raises(SystemExit):
            _run(tmp_path, *args)

    # A record whose image is gone, one without its sentence, one whose sentence is a bare
    # string or whose polygon is a number (an AttributeError / TypeError from drawing before;
    # helper review, session 58): one message naming the dataset, the record and what is wrong.
    good = DatasetCatalog.get(INSTANT_TEST_VAL)[0]
    no_sentence = {k: v for k, v in good.items() if k != "sentence"}
    bad_polygon = dict(good, annotations=[dict(good["annotations"][0], segmentation=5)])
    checked = f"record #0 (image_id={good['image_id']}, ref_id={good['ref_id']})"
    for name, record, item, problem in (
        ("visualize_data_missing_image", dict(good, file_name=str(tmp_path / "gone.png")), checked, "gone.png"),
        ("visualize_data_no_sentence", no_sentence, checked, "sentence: "),
        ("visualize_data_text_sentence", dict(good, sentence="the red cup"), checked, "sentence: "),
        ("visualize_data_bad_polygon", bad_polygon, checked, "annotations[0].segmentation: "),
    ):
        DatasetCatalog.register(name, lambda record=record: [record])
        try:
            assert _run(tmp_path, "--source", "annotation", "--dataset", name) == 1
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert f"{name}: {item}" in err and problem in err, err
            if problem == "gone.png":  # the same record read for training
                assert _run(tmp_path, "--source", "dataloader", "--num", "1", "DATASETS.TRAIN", f"('{name}',)",
                            "DATALOADER.NUM_WORKERS", "1") == 1
                err = capsys.readouterr().err.strip().splitlines()
                # Refused before the first batch, by the training loader's check of the files.
                assert f"DATASETS.TRAIN ('{name}',): 1 of its 1 image files do not exist: " in err[-1]
                assert err[-1].endswith("gone.png")
                assert not any("Traceback" in line for line in err)
        finally:
            DatasetCatalog.remove(name)
