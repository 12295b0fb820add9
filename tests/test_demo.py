"""demo/demo.py end to end: overlays of the input's size, file naming, and clear refusals."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import detection_utils as utils
from PIL import Image

from common import PREDICTOR_OPTS, REPO_ROOT, TINY_CONFIG, load_script, make_cfg
from vipa_d2.predictor import VIPAPredictor
from vipa_d2.utils.visualizer import draw_overlay

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
    argv = ["--config-file", TINY_CONFIG, "--input", folder, "--output", str(out), "--show-relevance"]
    for t in texts:
        argv += ["--text", t]
    # Detectron2-style overrides at the end of the command line.
    rc = demo.main(argv + PREDICTOR_OPTS + ["MODEL.WEIGHTS", ckpt])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "RANDOM" not in captured.out
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
    msg = _refusal(["--config-file", TINY_CONFIG, "--input", str(tmp_path / "*.jpg"), "--text", "a", "--output", str(tmp_path)], capsys)
    assert "no files match" in msg
    for blank in ["", "   \t"]:
        assert "empty or blank" in _refusal(base + ["--text", "cat", "--text", blank], capsys)
    msg = _refusal(base + ["--text", "cat", "--opts", "MODEL.VIPA.NO_SUCH_KEY", "1"], capsys)
    assert "MODEL.VIPA.NO_SUCH_KEY" in msg
    msg = _refusal(base + ["--text", "cat", "MODEL.NO_SUCH", "1"], capsys)  # trailing style
    assert "MODEL.NO_SUCH" in msg
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


def test_refusals_after_building_the_model(images, weights, tmp_path, capsys):
    _, files = images
    ckpt, predictor = weights
    unreadable = tmp_path / "broken.png"
    unreadable.write_bytes(b"\x89PNG not really")
    base = ["--config-file", TINY_CONFIG, "--text", "cat", "--output", str(tmp_path / "o.png")]
    msg = _refusal(base + ["--input", str(unreadable), "--opts", *PREDICTOR_OPTS], capsys)
    assert str(unreadable) in msg and "Cannot read image" in msg

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


def test_refusal_from_a_subprocess_has_no_traceback(images, tmp_path):
    _, files = images
    proc = _run_cli(
        "--config-file", TINY_CONFIG, "--input", files[0], "--text", "cat",
        "--output", str(tmp_path / "o.png"), "--opts", "MODEL.BOGUS", "1",
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "demo.py: error: invalid config override: Non-existent key: MODEL.BOGUS"
    assert not (tmp_path / "o.png").exists()
