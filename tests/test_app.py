"""demo/app.py served on loopback and called through its HTTP API, as a user's script would."""
import importlib.util
import os
import socket
import subprocess
import sys

import gradio_client
import numpy as np
import pytest
from PIL import Image

from common import PREDICTOR_OPTS, REPO_ROOT, TINY_CONFIG, read_rgb
from vipa_d2.utils.visualizer import draw_overlay, draw_relevance_figure


APP = os.path.join(REPO_ROOT, "demo", "app.py")
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
def sample(records, tmp_path_factory):
    """One synthetic image (as a PNG file, so the upload is lossless) and two of its expressions."""
    path = str(tmp_path_factory.mktemp("upload") / "upload.png")
    Image.open(records[0]["file_name"]).convert("RGB").save(path)
    return path, [records[0]["sentence"]["raw"], records[-1]["sentence"]["raw"]]


@pytest.fixture(scope="module")
def client(app_module, predictor):
    app = app_module.build_app(predictor)
    port = _free_port()
    app.launch(server_name=LOOPBACK, server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield gradio_client.Client(f"http://{LOOPBACK}:{port}/", verbose=False, analytics_enabled=False)
    finally:
        app.close()


def test_api_returns_the_predictors_masks_relevance_and_tokens(app_module, client, predictor, sample):
    path, texts = sample
    overlays, figures, table, details = client.predict(
        gradio_client.handle_file(path), "\n".join(texts) + "\n\n", api_name="/" + app_module.API_NAME
    )
    image = read_rgb(path)
    expected = predictor(image, texts)
    assert [d["expression"] for d in details] == texts  # blank lines are no expressions
    assert len(overlays) == len(figures) == len(texts)
    for text, result, overlay, figure, info in zip(texts, expected, overlays, figures, details):
        # The served pictures are exactly the ones drawn from the predictor's own result.
        np.testing.assert_array_equal(read_rgb(overlay["image"]), draw_overlay(image, result, text))
        np.testing.assert_array_equal(read_rgb(figure["image"]), draw_relevance_figure(image, result, text))
        assert overlay["caption"] == text
        assert info["mask_pixels"] == int(result["mask"].sum())
        assert info["confidence"] == pytest.approx(result["confidence"], abs=1e-4)
        assert info["no_target_score"] == pytest.approx(result["no_target_score"], abs=1e-4)
        words = [c["word"] for c in info["retrieved"]]
        assert words == ["[CLS]"] + predictor.tokenizer.tokenize(text)
        assert [c["tokens"] for c in info["retrieved"]] == [int(c["tokens"].sum()) for c in result["retrieved"]]
        assert all(c["tokens"] > 0 for c in info["retrieved"])
        for cue, got in zip(result["retrieved"], info["retrieved"]):
            assert got["on_mask_percent"] == pytest.approx(
                app_module.share_on_mask(cue, result["mask"]), abs=0.05
            )
    # The page's table: one row per (expression, word), the same numbers.
    rows = [[d["expression"], c["word"], c["tokens"], c["on_mask_percent"]] for d in details for c in d["retrieved"]]
    assert table["headers"] == app_module.WORD_TABLE_HEADERS
    assert [[r[0], r[1], int(r[2]), float(r[3])] for r in table["data"]] == rows
    # The two expressions get different answers: the text reaches the model.
    assert not np.array_equal(read_rgb(overlays[0]["image"]), read_rgb(overlays[1]["image"]))


def test_api_refuses_blank_expressions_with_a_message(app_module, client, sample):
    with pytest.raises(gradio_client.exceptions.AppError, match="at least one referring expression"):
        client.predict(gradio_client.handle_file(sample[0]), " \n ", api_name="/" + app_module.API_NAME)
    # A line of no words (invisible characters): the predictor's refusal, as a message.
    with pytest.raises(gradio_client.exceptions.AppError, match=r"Referring expression #1: .* has no letter or digit"):
        client.predict(gradio_client.handle_file(sample[0]), "the cup\n\u200b", api_name="/" + app_module.API_NAME)


def test_uploads_are_read_as_the_predictor_reads_files(app_module, client, predictor, sample, tmp_path):
    # Gradio's own RGB conversion made a 16-bit image all white (segmented without a word)
    # and handed a GIF over as palette indices (a bare "Error"); web demo review, session 47.
    path, texts = sample
    gray16 = tmp_path / "gray16.png"
    Image.fromarray((np.asarray(Image.open(path).convert("L")).astype(np.uint16) * 257)).save(gray16)
    with pytest.raises(gradio_client.exceptions.AppError, match="Cannot use this image: .*16-bit"):
        client.predict(gradio_client.handle_file(str(gray16)), texts[0], api_name="/" + app_module.API_NAME)
    gif = tmp_path / "upload.gif"
    Image.open(path).convert("P").save(gif)
    _, _, _, details = client.predict(gradio_client.handle_file(str(gif)), texts[0], api_name="/" + app_module.API_NAME)
    expected = predictor(str(gif), texts[0])
    assert details[0]["mask_pixels"] == int(expected["mask"].sum()) > 0 and details[0]["truncated"] is False


def test_details_say_which_expressions_the_model_read_in_part(app_module, client, predictor, sample):
    path, texts = sample
    long = " ".join(["the shape"] * predictor.max_text_len)
    _, _, _, details = client.predict(
        gradio_client.handle_file(path), f"{texts[0]}\n{long}", api_name="/" + app_module.API_NAME
    )
    assert [d["truncated"] for d in details] == [False, True]
    assert predictor.cut_expressions([texts[0], long]) == {1: len(predictor.tokenizer(long)["input_ids"])}


def test_share_on_mask(app_module):
    tokens = np.zeros((2, 2), bool)
    tokens[0, 0] = tokens[1, 1] = True  # two retrieved tokens of a 2x2 grid on a 4x4 image
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True  # covers the first token only
    assert app_module.share_on_mask({"tokens": tokens}, mask) == pytest.approx(50.0)
    assert app_module.share_on_mask({"tokens": np.zeros((2, 2), bool)}, mask) == 0.0
    # The image spans 1.5 x 2 tokens (the last row reaches past its edge): pixel rows 0-2 lie
    # in the first token row, row 3 in the second. A mask on the first token's 6 pixels
    # covers 6 of the 8 retrieved ones (stretching the grid would say 4 of 8).
    upper = np.zeros((4, 4), bool)
    upper[:3, :2] = True
    assert app_module.share_on_mask({"tokens": tokens, "extent": (1.5, 2.0)}, upper) == pytest.approx(75.0)
    assert app_module.share_on_mask({"tokens": tokens}, upper) == pytest.approx(50.0)


def test_serves_on_loopback_by_default(app_module):
    args = app_module.get_parser().parse_args(["--config-file", TINY_CONFIG, "MODEL.DEVICE", "cpu"])
    assert args.host == LOOPBACK and args.trailing_opts == ["MODEL.DEVICE", "cpu"]
    # ... and --opts, as README and demo.py have it.
    args = app_module.get_parser().parse_args(["--config-file", TINY_CONFIG, "--opts", "TEST.AUG.ENABLED", "True"])
    assert args.opts == ["TEST.AUG.ENABLED", "True"] and args.trailing_opts == []


def test_a_port_in_use_is_one_line(app_module, capsys):
    # Gradio's OSError came as a traceback (helper review, session 58).
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--config-file", TINY_CONFIG, "--port", str(port), *PREDICTOR_OPTS, "MODEL.WEIGHTS", ""]
        assert app_module.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"app.py: error: --host {LOOPBACK} --port {port}: ") and "port" in err[40:], err


def test_without_gradio_the_script_says_so_in_one_line():
    # A user without the "demo" extra got a ModuleNotFoundError traceback (session 58's list).
    blocked = "import runpy, sys; sys.modules['gradio'] = None; sys.argv = ['app.py', '--help']; " \
              f"runpy.run_path({APP!r}, run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 1, done
    assert done.stderr.strip().splitlines() == [
        "app.py: error: the web demo needs Gradio (import of gradio halted; None in sys.modules); "
        "install it with pip install -e '.[demo]'"
    ], done.stderr
