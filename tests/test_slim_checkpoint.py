"""tools/slim_checkpoint.py: a model-only export of a real training checkpoint that is
smaller, loads in the demo, the predictor and the evaluator, and gives the same masks (fp32)
or nearly the same (fp16)."""
import os
import re

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog

from common import INSTANT_TEST_CONFIG as CONFIG
from common import INSTANT_TEST_VAL as VAL
from common import NO_SIZE_RANKS_OPTS, import_train_net, load_script, make_cfg, train_net_args
from vipa_d2 import VIPAPredictor
from vipa_d2.modeling.text_encoder import CHECKPOINT_FILES_KEY

# fp16 weights move probabilities by ~1e-3: only pixels near the threshold may flip ...
MIN_FP16_MEDIAN_IOU = 0.98
# ... or, with the object choice, the pick between two near-tied candidates of a barely
# trained model (one of 16 val expressions: IoU 0.59 when this was written).
MAX_FP16_SWITCHED_SHARE = 1 / 8
SWITCHED_IOU = 0.9

slim_checkpoint = load_script("tools/slim_checkpoint.py")
train_net = import_train_net()
pytestmark = pytest.mark.usefixtures("single_thread", "synthetic_datasets_root")


# Every run here is the instant test with NO_SIZE_RANKS_OPTS (a 4-iteration model, whose
# masks would all be empty with the size ranks). The export does not depend on keys.
def _train_net(output_dir, *flags, opts=()):
    return train_net.main(train_net_args(output_dir, *flags, opts=[*NO_SIZE_RANKS_OPTS, *opts]))


def _export(source, output, *extra):
    return slim_checkpoint.main(["--config-file", CONFIG, "--input", source, "--output", output, *extra, *NO_SIZE_RANKS_OPTS])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real training checkpoint (model, trainer state with AdamW and scheduler, iteration)."""
    out = tmp_path_factory.mktemp("train")
    _train_net(out, opts=["DATASETS.TEST", "()"])
    return str(out / "model_final.pth")


def _predictor(weights):
    cfg = make_cfg(*NO_SIZE_RANKS_OPTS, "MODEL.WEIGHTS", weights, config_file=CONFIG)
    return VIPAPredictor(cfg)


def _masks(predictor):
    """Masks of every val expression, image by image."""
    by_image = {}
    for record in DatasetCatalog.get(VAL):
        by_image.setdefault(record["file_name"], []).append(record["sentence"]["raw"])
    return [r["mask"] for path, texts in by_image.items() for r in predictor(path, texts)]


def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def test_export_is_smaller_and_gives_the_same_masks(trained, tmp_path, capsys):
    slim, half = str(tmp_path / "slim.pth"), str(tmp_path / "slim_fp16.pth")
    assert _export(trained, slim) == 0
    printed = capsys.readouterr().out
    assert "slim.pth" in printed and "MB (fp32, model only)" in printed
    assert _export(trained, half, "--fp16") == 0

    full_size, slim_size, half_size = (os.path.getsize(p) for p in (trained, slim, half))
    assert slim_size < full_size and half_size < 0.6 * slim_size
    full = torch.load(trained, map_location="cpu", weights_only=True)
    assert {"trainer", "iteration"} <= set(full)  # optimizer, scheduler and hook state
    exported = torch.load(slim, map_location="cpu", weights_only=True)
    assert set(exported) == {"model", CHECKPOINT_FILES_KEY}
    assert all(torch.equal(exported["model"][k], v) for k, v in full["model"].items())
    halved = torch.load(half, map_location="cpu", weights_only=True)["model"]
    assert {v.dtype for v in halved.values() if v.is_floating_point()} == {torch.float16}

    reference = _masks(_predictor(trained))
    assert any(0 < m.sum() < m.size for m in reference)  # partial masks: equality means something
    for a, b in zip(reference, _masks(_predictor(slim))):
        np.testing.assert_array_equal(a, b)
    ious = [_iou(a, b) for a, b in zip(reference, _masks(_predictor(half)))]
    print(f"fp16 vs fp32 masks: median IoU {np.median(ious):.4f} over {len(ious)} expressions, lowest {min(ious):.3f}")
    assert np.median(ious) >= MIN_FP16_MEDIAN_IOU
    assert np.mean(np.asarray(ious) < SWITCHED_IOU) <= MAX_FP16_SWITCHED_SHARE


def test_export_evaluates_like_the_training_checkpoint(trained, tmp_path):
    slim = str(tmp_path / "slim.pth")
    _export(trained, slim)
    original = _train_net(tmp_path / "a", "--eval-only", opts=["MODEL.WEIGHTS", trained])
    exported = _train_net(tmp_path / "b", "--eval-only", opts=["MODEL.WEIGHTS", slim])
    assert exported == original and set(original[VAL]["refer"]) >= {"oIoU", "mIoU"}


def test_export_refuses_a_checkpoint_of_another_model(trained, tmp_path, capsys):
    # Each refusal is one line on stderr and exit status 2 (argparse's), not a traceback.
    refusals = [
        ((trained, str(tmp_path / "x.pth"), "MODEL.VIPA.DECODER.NUM_LAYERS", "2"),
         r"--input=.*model_final.pth: does not match the model: .*unexpected keys"),
        ((trained, trained), "is the --input file"),
        ((str(tmp_path / "gone.pth"), str(tmp_path / "y.pth")), r"--input=.*gone.pth: checkpoint file not found"),
        ((trained, str(tmp_path / "z.pth"), "MODEL.BOGUS", "1"), "invalid config override: Non-existent key: MODEL.BOGUS"),
        ((trained, str(tmp_path / "no_folder" / "w.pth")), r"--output .*no_folder/w.pth: its folder does not exist"),
        ((trained, str(tmp_path)), r"--output .* is a folder; give the checkpoint file to write"),
    ]
    for args, message in refusals:
        with pytest.raises(SystemExit) as e:
            _export(*args)
        assert e.value.code == 2
        assert re.search(message, capsys.readouterr().err)
    assert not any((tmp_path / f).exists() for f in ("x.pth", "y.pth", "z.pth"))
    # An existing file (e.g. a run's model_final.pth) was replaced without a word (tools review, session 56).
    kept = tmp_path / "kept.pth"
    kept.write_bytes(b"an earlier export")
    with pytest.raises(SystemExit) as e:
        _export(trained, str(kept))
    assert e.value.code == 2 and f"--output {kept} exists; give another path, or --overwrite" in capsys.readouterr().err
    assert kept.read_bytes() == b"an earlier export"
    assert _export(trained, str(kept), "--overwrite") == 0
    assert set(torch.load(kept, map_location="cpu", weights_only=True)) == {"model", CHECKPOINT_FILES_KEY}
