"""demo/demo.py end to end: overlays of the input's size, file naming, clear refusals; binary
masks, a JSON per image, manifests giving each image its own expressions, Unicode captions,
and prediction beside target."""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import detection_utils as utils
from PIL import Image

from common import PREDICTOR_OPTS, REPO_ROOT, TINY_CONFIG, load_script, make_cfg
from vipa_d2.data.masks import segmentation_to_mask
from vipa_d2.predictor import VIPAPredictor
from vipa_d2.utils.visualizer import (
    SIDE_BY_SIDE_GAP,
    caption_layout,
    draw_caption,
    draw_overlay,
    draw_prediction_and_target,
    save_image,
)

DEMO = os.path.join(REPO_ROOT, "demo", "demo.py")
pytestmark = pytest.mark.usefixtures("single_thread")

demo = load_script(DEMO)


@pytest.fixture(scope="module")
def images(synthetic_benchmark, tmp_path_factory):
    """A folder with two synthetic images (JPEG, as the generator writes them)."""
    root, _ = synthetic_benchmark(4, image_size=128)
    source = os.path.join(root, "refsynth", "images")
    folder = str(tmp_path_factory.mktemp("two"))
    for name in sorted(os.listdir(source))[:2]:
        shutil.copy(os.path.join(source, name), folder)
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    return folder, files


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A saved tiny model and the predictor it came from."""
    cfg = make_cfg(*PREDICTOR_OPTS, config_file=TINY_CONFIG)
    torch.manual_seed(0)
    predictor = VIPAPredictor(cfg)
    out = tmp_path_factory.mktemp("weights")
    DetectionCheckpointer(predictor.model, save_dir=str(out)).save("model_final")
    return str(out / "model_final.pth"), predictor


def _run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as _single_thread, for the child process
    return subprocess.run(
        [sys.executable, DEMO, *args], capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300
    )


def test_cli_writes_overlay_of_input_size_with_random_weights(images, tmp_path):
    _, files = images
    out = tmp_path / "overlay.png"
    proc = _run_cli(
        "--config-file", TINY_CONFIG, "--input", files[0], "--text", "the red circle",
        "--output", str(out), "--opts", *PREDICTOR_OPTS,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "RANDOM initialisation" in proc.stdout + proc.stderr
    assert "Done: 1 image(s) x 1 expression(s)" in proc.stdout
    with Image.open(files[0]) as src, Image.open(out) as got:
        assert got.size == src.size and got.mode == "RGB"


def test_folder_several_expressions_relevance_and_trailing_opts(images, weights, tmp_path, capsys):
    folder, files = images
    ckpt, predictor = weights
    texts = ["the object on the left", "the biggest shape"]
    out = tmp_path / "out"
    # A file from an earlier run, which this one replaces: said, not done silently.
    out.mkdir()
    earlier = out / f"{_stem(files[0])}_1_relevance.png"
    earlier.write_bytes(b"an earlier run's picture")
    argv = ["--config-file", TINY_CONFIG, "--input", folder, "--output", str(out), "--show-relevance"]
    for t in texts:
        argv += ["--text", t]
    # Detectron2-style overrides at the end of the command line.
    rc = demo.main(argv + PREDICTOR_OPTS + ["MODEL.WEIGHTS", ckpt])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "RANDOM" not in captured.out
    assert f"1 existing file(s) will be replaced: {earlier}" in captured.out
    assert f"Done: 2 image(s) x 2 expression(s) -> {out}" in captured.out
    expected = set()
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        expected |= {f"{stem}_{k}.png" for k in range(2)} | {f"{stem}_{k}_relevance.png" for k in range(2)}
    assert set(os.listdir(out)) == expected
    # The overlays are exactly what the predictor + draw_overlay give for the loaded weights.
    fmt = predictor.cfg.INPUT.FORMAT
    image = utils.read_image(files[1], format=fmt)
    stem = os.path.splitext(os.path.basename(files[1]))[0]
    for k, text in enumerate(texts):
        written = np.asarray(Image.open(out / f"{stem}_{k}.png").convert("RGB"))
        assert written.shape == image.shape
        np.testing.assert_array_equal(written, draw_overlay(image, predictor(image, text), text, image_format=fmt))


def _refusal(argv, capsys):
    rc = demo.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == demo.REFUSAL_EXIT_CODE and rc != 0
    assert len(lines) == 1 and lines[0].startswith("demo.py: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_refusals_before_the_model(images, tmp_path, capsys):
    _, files = images
    base = ["--config-file", TINY_CONFIG, "--input", files[0], "--output", str(tmp_path / "o.png")]
    missing = str(tmp_path / "nope.png")
    msg = _refusal(["--config-file", TINY_CONFIG, "--input", missing, "--text", "a", "--output", str(tmp_path)], capsys)
    assert missing in msg and "not found" in msg
    # Overrides after --input: its list takes them (README sweep, session 54: "not found:
    # MODEL.WEIGHTS" named the symptom only).
    msg = _refusal(["--config-file", TINY_CONFIG, "--text", "a", "--output", str(tmp_path), "--input", files[0],
                    "MODEL.WEIGHTS", "w.pth"], capsys)
    assert msg.endswith("input image not found: MODEL.WEIGHTS, a config key: --input's list took the overrides after "
                        "it; put them after --opts, or after another option")
    for name in ("IMG_0001.JPG", "MODEL.NO_SUCH_KEY"):  # shaped like keys, but none
        assert _refusal(["--config-file", TINY_CONFIG, "--text", "a", "--output", str(tmp_path), "--input", name],
                        capsys).endswith(f"input image not found: {name}")
    msg = _refusal(["--config-file", TINY_CONFIG, "--input", str(tmp_path / "*.jpg"), "--text", "a", "--output", str(tmp_path)], capsys)
    assert "no files match" in msg
    for blank in ["", "   \t"]:
        assert "has no letter or digit; expected some words" in _refusal(base + ["--text", "cat", "--text", blank], capsys)
    msg = _refusal(base + ["--text", "cat", "--opts", "MODEL.VIPA.NO_SUCH_KEY", "1"], capsys)
    assert "MODEL.VIPA.NO_SUCH_KEY" in msg
    msg = _refusal(base + ["--text", "cat", "MODEL.NO_SUCH", "1"], capsys)  # trailing style
    assert "MODEL.NO_SUCH" in msg
    # An option after the trailing overrides is one of them to argparse (new-user walkthrough,
    # session 52: the web demo's --port): named as misplaced, not as an unknown key.
    msg = _refusal(base + ["--text", "cat", "MODEL.DEVICE", "cpu", "--show-relevance", "x"], capsys)
    assert msg.endswith("--show-relevance: options go before the KEY VALUE config overrides (here it was read as a key)")
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text(f'_BASE_: "{TINY_CONFIG}"\nMODEL:\n  VIPA:\n    NOT_A_KEY: 3\n')
    msg = _refusal(["--config-file", str(bad_cfg)] + base[2:] + ["--text", "cat"], capsys)
    assert "MODEL.VIPA.NOT_A_KEY" in msg and "bad.yaml" in msg
    msg = _refusal(["--config-file", str(tmp_path / "none.yaml")] + base[2:] + ["--text", "cat"], capsys)
    assert "none.yaml" in msg and "not found" in msg
    msg = _refusal(base + ["--text", "cat", "--text", "dog"], capsys)
    assert "single image and a single --text" in msg
    msg = _refusal(base + ["--text", "cat", "--opts", "MODEL.WEIGHTS", str(tmp_path / "gone.pth")], capsys)
    assert "gone.pth" in msg and "not found" in msg
    # An output under a file (as a file or as a folder): said before the model runs, and
    # nothing made (it was a traceback after inference).
    (tmp_path / "a_file").write_text("")
    for output in (tmp_path / "a_file" / "o.png", tmp_path / "a_file" / "sub" / "folder"):
        msg = _refusal(base[:4] + ["--output", str(output), "--text", "cat"], capsys)
        assert msg.endswith(f"cannot write under {tmp_path / 'a_file'}, which is a file, not a folder")


def test_inputs_that_are_no_images_are_refused_before_the_model(images, tmp_path, capsys):
    # A glob keeps any file: its notes.txt stopped the run after the images before it,
    # with their pictures written (predictor review, session 52).
    _, files = images
    shutil.copy(files[0], tmp_path / "a.jpg")
    (tmp_path / "b_notes.txt").write_text("not an image")
    out = tmp_path / "out"
    msg = _refusal(["--config-file", TINY_CONFIG, "--input", str(tmp_path / "*"), "--text", "cat", "--output", str(out)],
                   capsys)
    assert f"1 of the 2 inputs cannot be read as images of 8 bits per channel: {tmp_path / 'b_notes.txt'} is no image " \
           "file PIL reads (cannot identify image file" in msg, msg
    assert not out.exists()


def test_outputs_that_would_overwrite_an_input_or_each_other_are_refused(images, tmp_path, capsys):
    _, files = images
    folder = tmp_path / "in"
    folder.mkdir()
    png = folder / "photo.png"
    Image.open(files[0]).save(png)
    before = png.read_bytes()
    base = ["--config-file", TINY_CONFIG, "--text", "cat"]
    # The input folder as --output: the overlay of photo.png is photo.png.
    for output in (folder, png):
        msg = _refusal(base + ["--input", str(png), "--output", str(output)], capsys)
        assert msg.endswith(f"would overwrite the input image {png}"), msg
    assert png.read_bytes() == before
    # a.jpg's mask and a_mask.jpg's overlay are both a_mask.png.
    shutil.copy(files[0], tmp_path / "a.jpg")
    shutil.copy(files[1], tmp_path / "a_mask.jpg")
    out = tmp_path / "out"
    msg = _refusal(base + ["--input", str(tmp_path / "a.jpg"), str(tmp_path / "a_mask.jpg"), "--output", str(out),
                           "--save-masks"], capsys)
    assert f"{out / 'a_mask.png'} would be written twice" in msg and "the mask of" in msg and "the overlay of" in msg
    assert not out.exists()
    # A folder where an overlay goes: refused before the model (a traceback after it, and
    # listed as a file to replace; diff review, session 54).
    (out / "a.png").mkdir(parents=True)
    msg = _refusal(base + ["--input", str(tmp_path / "a.jpg"), "--output", str(out)], capsys)
    assert msg.endswith(f"{out / 'a.png'} (the overlay of {tmp_path / 'a.jpg'}, expression 0) is a folder; "
                        "move it or give another --output")


def test_refusals_after_building_the_model(images, weights, tmp_path, capsys):
    _, files = images
    ckpt, predictor = weights
    unreadable = tmp_path / "broken.png"
    unreadable.write_bytes(b"\x89PNG not really")
    base = ["--config-file", TINY_CONFIG, "--text", "cat", "--output", str(tmp_path / "o.png")]
    msg = _refusal(base + ["--input", str(unreadable), "--opts", *PREDICTOR_OPTS], capsys)
    assert str(unreadable) in msg and "is no image file PIL reads" in msg  # (from its header, before the model now)
    # A header PIL reads over data it cannot decode: refused when the image is read.
    truncated = tmp_path / "truncated.jpg"
    data = open(files[0], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    msg = _refusal(base + ["--input", str(truncated), "--opts", *PREDICTOR_OPTS], capsys)
    assert str(truncated) in msg and "Cannot read image" in msg

    state = torch.load(ckpt, map_location="cpu")["model"]
    dropped = next(k for k in state if k.startswith("head.transformer_decoder."))
    del state[dropped]
    state["head.veg.unused.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "mismatch.pth")
    msg = _refusal(
        base + ["--input", files[0], "--opts", *PREDICTOR_OPTS, "MODEL.WEIGHTS", str(tmp_path / "mismatch.pth")], capsys
    )
    assert "mismatch.pth" in msg and dropped in msg and "head.veg.unused.weight" in msg
    assert "missing" in msg and "unexpected" in msg
    # A checkpoint that needs full pickle is refused as such, not as an "invalid config"
    # (new-user walkthrough, session 46).
    torch.save({"model": state, "args": argparse.Namespace(lr=1)}, tmp_path / "untrusted.pth")
    msg = _refusal(base + ["--input", files[0], "--opts", *PREDICTOR_OPTS, "MODEL.WEIGHTS", str(tmp_path / "untrusted.pth")], capsys)
    assert "untrusted.pth: cannot be loaded as weights only" in msg and "invalid config" not in msg


def test_a_folder_run_segments_past_an_image_it_cannot_read_and_says_what_it_left_out(images, weights, tmp_path, capsys):
    # A truncated file passes the header check: it stopped the run, leaving the images
    # after it undone; a folder's other files and subfolders were left out unsaid.
    _, files = images
    ckpt, _ = weights
    folder, out = tmp_path / "in", tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(files[0], folder / "a.jpg")
    data = open(files[1], "rb").read()
    (folder / "b.jpg").write_bytes(data[: len(data) // 2])
    shutil.copy(files[1], folder / "c.jpg")
    (folder / "notes.txt").write_text("not an image")
    rc = demo.main(["--config-file", TINY_CONFIG, "--input", str(folder), "--text", "cat", "--output", str(out),
                    "--opts", *PREDICTOR_OPTS, "MODEL.WEIGHTS", ckpt])
    captured = capsys.readouterr()
    assert rc == demo.REFUSAL_EXIT_CODE and "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.replace("\r", "\n").splitlines() if line and not line.startswith("images:")]
    assert len(errors) == 1  # the one refusal, beside the progress bar
    assert errors[0].startswith("demo.py: error: 1 of the 3 inputs could not be read, the others were "
                                f"segmented: Cannot read image {folder / 'b.jpg'}")
    assert sorted(os.listdir(out)) == ["a.png", "c.png"]  # one expression: named after the image
    assert f"2 entries of {folder} left out (subfolders, files not named" in captured.out
    assert f": notes.txt, sub{os.sep}\n" in captured.out


def test_refusal_is_one_line_without_traceback(images, tmp_path, capsys):
    # main's status is the script's exit status (sys.exit(main()), run as a script above).
    _, files = images
    rc = demo.main([
        "--config-file", TINY_CONFIG, "--input", files[0], "--text", "cat",
        "--output", str(tmp_path / "o.png"), "--opts", "MODEL.BOGUS", "1",
    ])
    assert rc == 1
    assert capsys.readouterr().err.strip() == "demo.py: error: invalid config override: Non-existent key: MODEL.BOGUS"
    assert not (tmp_path / "o.png").exists()


# ----------------------------------------------------------- masks, JSON, manifests, captions
TEXTS = ["the café table", "the biggest shape"]


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def test_save_masks_and_json_hold_the_predictions(images, weights, tmp_path, capsys):
    folder, files = images
    ckpt, predictor = weights
    out = tmp_path / "out"
    argv = ["--config-file", TINY_CONFIG, "--input", folder, "--output", str(out), "--save-masks", "--save-json"]
    for text in TEXTS:
        argv += ["--text", text]
    assert demo.main(argv + ["--opts", *PREDICTOR_OPTS, "MODEL.WEIGHTS", ckpt]) == 0, capsys.readouterr().err
    for path in files:
        stem = _stem(path)
        expected = {f"{stem}_{k}{suffix}.png" for k in range(2) for suffix in ("", "_mask")} | {f"{stem}.json"}
        assert expected <= set(os.listdir(out))
        image = utils.read_image(path, format=predictor.cfg.INPUT.FORMAT)
        results = predictor(image, TEXTS)
        with open(out / f"{stem}.json", encoding="utf-8") as f:
            record = json.load(f)
        assert (record["image"], record["height"], record["width"]) == (path, *image.shape[:2])
        assert [e["text"] for e in record["expressions"]] == TEXTS  # "café" round-trips
        for k, (entry, result) in enumerate(zip(record["expressions"], results)):
            written = np.asarray(Image.open(out / f"{stem}_{k}_mask.png"))
            assert written.dtype == np.uint8 and set(np.unique(written)) <= {0, 255}
            np.testing.assert_array_equal(written == 255, result["mask"])
            rle = dict(entry["mask"], counts=entry["mask"]["counts"].encode("ascii"))
            np.testing.assert_array_equal(mask_util.decode(rle).astype(bool), result["mask"])
            assert entry["area"] == int(result["mask"].sum())
            assert entry["confidence"] == pytest.approx(result["confidence"], abs=1e-6)
            assert entry["no_target_score"] == pytest.approx(result["no_target_score"], abs=1e-6)
            assert entry["retrieved_words"] == [c["word"] for c in result["retrieved"]]
            if k == 0:  # the uncased tokenizer folds the accent; the text keeps it
                assert entry["retrieved_words"] == ["[CLS]", "the", "cafe", "table"]
    assert any(0 < e["area"] < record["height"] * record["width"] for e in record["expressions"])


def test_json_of_an_image_whose_name_is_not_utf8(images, weights, tmp_path, capsys):
    # os.listdir gives such a name as lone surrogates, which json.dump could not write: a
    # bare UnicodeEncodeError after the overlay was saved (predictor review, session 52).
    _, files = images
    ckpt, _ = weights
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(files[0], os.path.join(os.fsencode(folder), b"caf\xe9.jpg"))
    out = tmp_path / "out"
    argv = ["--config-file", TINY_CONFIG, "--input", str(folder), "--output", str(out), "--save-json", "--text", "cat"]
    assert demo.main(argv + ["--opts", *PREDICTOR_OPTS, "MODEL.WEIGHTS", ckpt]) == 0, capsys.readouterr().err
    with open(os.path.join(os.fsencode(out), b"caf\xe9.json"), encoding="utf-8") as f:
        assert json.load(f)["image"] == f"{folder}/caf\\xe9.jpg"


def _write_manifests(tmp_path, files):
    """The same manifest as JSON and CSV: image 0 with two expressions, image 1 with one."""
    rel = [os.path.relpath(f, tmp_path) for f in files]
    entries = [{"image": rel[0], "expressions": TEXTS}, {"image": rel[1], "expressions": ["the left one"]}]
    (tmp_path / "m.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    # As a spreadsheet saves UTF-8 CSV: with a byte-order mark.
    with open(tmp_path / "m.csv", "w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "expression"])
        writer.writerows([[rel[0], TEXTS[0]], [rel[1], "the left one"], [rel[0], TEXTS[1]]])
    return entries


@pytest.mark.parametrize("kind", ["json", "csv"])
def test_manifest_gives_each_image_its_expressions(images, weights, tmp_path, capsys, kind):
    _, files = images
    ckpt, predictor = weights
    _write_manifests(tmp_path, files)
    out = tmp_path / "out"
    argv = ["--config-file", TINY_CONFIG, "--manifest", str(tmp_path / f"m.{kind}"), "--output", str(out), "--save-json"]
    assert demo.main(argv + ["--opts", *PREDICTOR_OPTS, "MODEL.WEIGHTS", ckpt]) == 0
    assert "Done: 2 image(s), 3 expression(s) in all" in capsys.readouterr().out
    a, b = _stem(files[0]), _stem(files[1])
    assert set(os.listdir(out)) == {f"{a}_0.png", f"{a}_1.png", f"{b}.png", f"{a}.json", f"{b}.json"}
    with open(out / f"{a}.json", encoding="utf-8") as f:
        assert [e["text"] for e in json.load(f)["expressions"]] == TEXTS
    fmt = predictor.cfg.INPUT.FORMAT
    image = utils.read_image(files[1], format=fmt)
    written = np.asarray(Image.open(out / f"{b}.png").convert("RGB"))
    expected = draw_overlay(image, predictor(image, "the left one"), "the left one", image_format=fmt)
    np.testing.assert_array_equal(written, expected)


def test_bad_manifests_are_refused_naming_file_entry_and_key(images, tmp_path, capsys):
    _, files = images
    entries = _write_manifests(tmp_path, files)
    base = ["--config-file", TINY_CONFIG, "--output", str(tmp_path / "out")]

    def refusal(name, content):
        path = tmp_path / name
        path.write_text(content, encoding="utf-8")
        return _refusal(base + ["--manifest", str(path)], capsys)

    msg = refusal("typo.json", json.dumps([entries[0], {"image": entries[1]["image"], "expression": ["x"]}]))
    assert "typo.json: entry 1:" in msg and "'expressions'" in msg
    msg = refusal("gone.json", json.dumps([{"image": "nothere.jpg", "expressions": ["x"]}]))
    assert "gone.json: entry 0: image: image 'nothere.jpg' not found" in msg
    msg = refusal("blank.json", json.dumps([{"image": entries[0]["image"], "expressions": ["ok", "  "]}]))
    assert "blank.json: entry 0: expressions[1]: not a referring expression: " in msg and "has no letter or digit" in msg
    msg = refusal("twice.json", json.dumps([entries[0], entries[0]]))
    assert "twice.json: entry 1: image:" in msg and "already listed in entry 0" in msg
    msg = refusal("broken.json", '[{"image": ')
    assert "broken.json" in msg and "not valid JSON (line 1" in msg
    msg = refusal("header.csv", "file,text\na.jpg,the cup\n")
    assert "header.csv: row 1:" in msg and "image,expression" in msg
    msg = refusal("row.csv", f"image,expression\n{entries[0]['image']},the cup\n{entries[1]['image']},\n")
    assert "row.csv: row 3: expression:" in msg
    assert "unknown manifest format '.txt'" in refusal("list.txt", "a.jpg")
    msg = _refusal(base + ["--manifest", str(tmp_path / "m.json"), "--text", "cat"], capsys)
    assert "drop --input and --text" in msg
    assert "give --input and --text, or --manifest" in _refusal(base + ["--text", "cat"], capsys)


def test_unicode_caption_is_drawn_not_replaced():
    image = np.full((96, 160, 3), 120, np.uint8)
    drawn = {text: draw_caption(image, text) for text in ["the café table", "the caf? table", "the cafe table"]}
    _, band = caption_layout("the café table", *image.shape[:2])
    assert band > 0
    accented = drawn["the café table"][:band]
    # The accent is drawn: neither a '?' nor the bare letter.
    assert (accented != drawn["the caf? table"][:band]).any()
    assert (accented != drawn["the cafe table"][:band]).any()
    np.testing.assert_array_equal(drawn["the café table"][band:], image[band:])


def test_a_cut_caption_keeps_its_score():
    # The score followed the text into the '...' cut, so long expressions showed none
    # (predictor review, session 52).
    long_text = "the small blue object in the top left corner of the picture beside the red one " * 20
    lines, _ = caption_layout(long_text, 256, 248, suffix=" (0.95)")
    assert len(lines) == 2 and lines[-1].endswith("... (0.95)")
    shown = " ".join(lines)[: -len("... (0.95)")]
    assert " ".join(long_text.split()).startswith(shown)
    # A caption that fits is laid out as the text with its score.
    assert caption_layout("the cup", 256, 248, suffix=" (0.95)") == caption_layout("the cup (0.95)", 256, 248)


def test_dollar_signs_are_drawn_as_text_not_math():
    # matplotlib reads text between two "$" as a formula: "$5 or $" lost its signs and spaces,
    # and "$^$" raised a parse error (web demo review, session 47).
    image = np.full((96, 320, 3), 120, np.uint8)
    _, band = caption_layout("the $5 or the $6 bill", *image.shape[:2])

    def right_ink(text):  # the rightmost column of the band not at its (dimmed) background
        drawn = draw_caption(image, text)[:band, :, 0]
        background = np.bincount(drawn.ravel()).argmax()
        return np.nonzero((drawn != background).any(axis=0))[0].max()

    assert right_ink("the $5 or the $6 bill") > right_ink("the 5 or the 6 bill")
    assert draw_caption(image, "the tag reading $^$").shape == image.shape


def test_prediction_beside_target():
    image = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    prediction, target = np.zeros((64, 80), bool), np.zeros((64, 80), bool)
    prediction[20:40, 10:30] = True
    target[25:50, 20:45] = True
    result = {"mask": prediction, "confidence": 0.8}
    figure = draw_prediction_and_target(image, result, target, "the square")
    left, right = figure[:, :80], figure[:, -80:]
    assert figure.shape == (64, 80 + SIDE_BY_SIDE_GAP + 80, 3)
    np.testing.assert_array_equal(left, draw_overlay(image, result, "prediction: the square"))
    np.testing.assert_array_equal(right, draw_overlay(image, {"mask": target}, "target"))
    assert (figure[:, 80:-80] == 255).all()


def test_manifest_targets_draw_prediction_beside_target(images, weights, tmp_path, capsys):
    _, files = images
    ckpt, predictor = weights
    square = [[10, 10, 60, 10, 60, 50, 10, 50]]  # a COCO polygon
    entry = {"image": files[0], "expressions": TEXTS, "targets": [square, None]}
    (tmp_path / "t.json").write_text(json.dumps([entry]), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--config-file", TINY_CONFIG, "--manifest", str(tmp_path / "t.json"), "--output", str(out)]
    assert demo.main(argv + ["--opts", *PREDICTOR_OPTS, "MODEL.WEIGHTS", ckpt]) == 0, capsys.readouterr().err
    fmt = predictor.cfg.INPUT.FORMAT
    image = utils.read_image(files[0], format=fmt)
    results = predictor(image, TEXTS)
    target = segmentation_to_mask(square, *image.shape[:2]).astype(bool)
    no_target = np.zeros(image.shape[:2], bool)
    for k, mask in enumerate([target, no_target]):
        written = np.asarray(Image.open(out / f"{_stem(files[0])}_{k}.png").convert("RGB"))
        expected = draw_prediction_and_target(image, results[k], mask, TEXTS[k], image_format=fmt)
        np.testing.assert_array_equal(written, expected)

    # A target that does not fit the image is named by manifest, entry and key.
    entry["targets"] = [{"size": [5, 5], "counts": "0"}, None]
    (tmp_path / "bad.json").write_text(json.dumps([entry]), encoding="utf-8")
    argv = ["--config-file", TINY_CONFIG, "--manifest", str(tmp_path / "bad.json"), "--output", str(out)]
    msg = _refusal(argv + ["--opts", *PREDICTOR_OPTS, "MODEL.WEIGHTS", ckpt], capsys)
    assert msg.startswith("demo.py: error: invalid manifest ") and "does not match the image size" in msg
    assert "bad.json: entry 0: targets[0].segmentation.size:" in msg
    # ... against the image's header, before the model: not as an image that "could not be
    # read" once the entries before it were segmented (diff review, session 56).
    first = {"image": files[1], "expressions": ["the cup"]}
    (tmp_path / "late_size.json").write_text(json.dumps([first, entry]), encoding="utf-8")
    msg = _refusal(["--config-file", TINY_CONFIG, "--manifest", str(tmp_path / "late_size.json"), "--output",
                    str(tmp_path / "late_size_out")], capsys)
    assert msg.startswith("demo.py: error: invalid manifest ") and "late_size.json: entry 1: targets[0]" in msg
    assert not (tmp_path / "late_size_out").exists()
    # ... by the manifest's reading, before any image is segmented (it came with its image,
    # after the entries before it had been written).
    (tmp_path / "late.json").write_text(json.dumps([first, dict(entry, targets=["not a mask", None])]), encoding="utf-8")
    late_out = tmp_path / "late_out"
    msg = _refusal(["--config-file", TINY_CONFIG, "--manifest", str(tmp_path / "late.json"), "--output", str(late_out)],
                   capsys)
    assert "late.json: entry 1: targets[0].segmentation: expected a list of polygons or an RLE dict" in msg
    assert not late_out.exists()
    entry["targets"] = [None]
    (tmp_path / "short.json").write_text(json.dumps([entry]), encoding="utf-8")
    msg = _refusal(["--config-file", TINY_CONFIG, "--manifest", str(tmp_path / "short.json"), "--output", str(out)], capsys)
    assert "short.json: entry 0: targets: expected a list of 2 segmentations" in msg


def test_a_picture_that_fails_to_save_leaves_the_file_as_it_was(tmp_path):
    # Pillow opened (so truncated) the file before encoding: a mode the format cannot take,
    # or a run stopped mid-write, left a broken picture under the name (session 58's list).
    path = tmp_path / "overlay.jpg"
    save_image(str(path), np.full((4, 4, 3), 200, np.uint8))
    before = path.read_bytes()
    with pytest.raises(OSError, match="cannot write mode LA as JPEG"):
        save_image(str(path), np.zeros((4, 4, 2), np.uint8))  # grey + alpha: no JPEG mode
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["overlay.jpg"]
    with pytest.raises(ValueError, match=r"overlay\.xyz: unknown picture file extension '\.xyz'"):
        save_image(str(tmp_path / "overlay.xyz"), np.zeros((4, 4, 3), np.uint8))


def test_inputs_of_16_bit_pixels_are_refused_before_the_model(images, tmp_path, capsys):
    # Their header tells: they were found only when their turn came, after the model was
    # built and the images before them segmented (session 58's list).
    _, files = images
    shutil.copy(files[0], tmp_path / "a.jpg")
    Image.fromarray(np.full((8, 8), 300, np.uint16)).save(tmp_path / "b_depth.png")
    out = tmp_path / "out"
    msg = _refusal(["--config-file", TINY_CONFIG, "--input", str(tmp_path / "*"), "--text", "cat", "--output", str(out),
                    "MODEL.WEIGHTS", str(tmp_path / "absent.pth")], capsys)  # refused before the weights are read
    mode = Image.open(tmp_path / "b_depth.png").mode  # I;16, or I in older Pillows
    assert msg.endswith(f"1 of the 2 inputs cannot be read as images of 8 bits per channel: {tmp_path / 'b_depth.png'} "
                        f"has PIL mode {mode} (16-bit or float); expected 8 bits per channel (grey, RGB, RGBA or "
                        "palette)"), msg
    assert not out.exists()
