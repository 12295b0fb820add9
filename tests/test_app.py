"""demo/app.py served on loopback and called through its HTTP API, as a user's script would."""
import importlib.util
import os
import socket
import sys

import gradio_client
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from PIL import Image

from vipa_d2 import add_vipa_config
from vipa_d2.data import load_refer_dicts
from vipa_d2.data.synthetic import SynthConfig, write_benchmark
from vipa_d2.predictor import VIPAPredictor
from vipa_d2.utils.visualizer import draw_overlay, draw_relevance_figure


REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
APP = os.path.join(REPO, "demo", "app.py")
CONFIG = os.path.join(REPO, "configs", "synthetic", "vipa_tiny_cpu.yaml")
TINY_OPTS = ["MODEL.DEVICE", "cpu", "INPUT.IMAGE_SIZE", 96, "MODEL.VIPA.HIDDEN_DIM", 64, "MODEL.TIMM.WEIGHTS", ""]
LOOPBACK = "127.0.0.1"

pytestmark = pytest.mark.usefixtures("single_thread")


def _load_app():
    # app.py imports demo/demo.py as `demo`, the script's own folder being sys.path[0].
    sys.path.insert(0, os.path.dirname(APP))
    try:
        spec = importlib.util.spec_from_file_location("vipa_app", APP)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.dirname(APP))
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_module():
    return _load_app()


@pytest.fixture(scope="module")
def predictor():
    cfg = get_cfg()
    add_vipa_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(TINY_OPTS)
    torch.manual_seed(0)
    return VIPAPredictor(cfg)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """One synthetic image (as a PNG file, so the upload is lossless) and two of its expressions."""
    root = str(tmp_path_factory.mktemp("synth"))
    write_benchmark(root, 4, seed=0, cfg=SynthConfig(image_size=128), workers=1, progress=False)
    recs = load_refer_dicts(root, "refsynth", "unc", "val", f"{root}/refsynth/images")
    recs = [r for r in recs if r["file_name"] == recs[0]["file_name"]]
    path = os.path.join(root, "upload.png")
    Image.open(recs[0]["file_name"]).convert("RGB").save(path)
    return path, [recs[0]["sentence"]["raw"], recs[-1]["sentence"]["raw"]]


@pytest.fixture(scope="module")
def client(app_module, predictor):
    app = app_module.build_app(predictor)
    port = _free_port()
    app.launch(server_name=LOOPBACK, server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield gradio_client.Client(f"http://{LOOPBACK}:{port}/", verbose=False, analytics_enabled=False)
    finally:
        app.close()


def _read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_api_returns_the_predictors_masks_relevance_and_tokens(app_module, client, predictor, sample):
    path, texts = sample
    overlays, figures, details = client.predict(
        gradio_client.handle_file(path), "\n".join(texts) + "\n\n", api_name="/" + app_module.API_NAME
    )
    image = _read(path)
    expected = predictor(image, texts)
    assert [d["expression"] for d in details] == texts  # blank lines are no expressions
    assert len(overlays) == len(figures) == len(texts)
    for text, result, overlay, figure, info in zip(texts, expected, overlays, figures, details):
        # The served pictures are exactly the ones drawn from the predictor's own result.
        np.testing.assert_array_equal(_read(overlay["image"]), draw_overlay(image, result, text))
        np.testing.assert_array_equal(_read(figure["image"]), draw_relevance_figure(image, result, text))
        assert overlay["caption"] == text
        assert info["mask_pixels"] == int(result["mask"].sum())
        assert info["confidence"] == pytest.approx(result["confidence"], abs=1e-4)
        assert info["no_target_score"] == pytest.approx(result["no_target_score"], abs=1e-4)
        words = [c["word"] for c in info["retrieved"]]
        assert words == ["[CLS]"] + predictor.tokenizer.tokenize(text)
        assert [c["tokens"] for c in info["retrieved"]] == [int(c["tokens"].sum()) for c in result["retrieved"]]
        assert all(c["tokens"] > 0 for c in info["retrieved"])
    # The two expressions get different answers: the text reaches the model.
    assert not np.array_equal(_read(overlays[0]["image"]), _read(overlays[1]["image"]))


def test_api_refuses_blank_expressions_with_a_message(app_module, client, sample):
    with pytest.raises(gradio_client.exceptions.AppError, match="at least one referring expression"):
        client.predict(gradio_client.handle_file(sample[0]), " \n ", api_name="/" + app_module.API_NAME)


def test_serves_on_loopback_by_default(app_module):
    args = app_module.get_parser().parse_args(["--config-file", CONFIG, "MODEL.DEVICE", "cpu"])
    assert args.host == LOOPBACK and args.opts == ["MODEL.DEVICE", "cpu"]
