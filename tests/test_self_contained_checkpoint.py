"""MODEL.WEIGHTS is all a trained model needs: encoders built from configs, the text encoder's
config and tokenizer read from the checkpoint, offline, with an empty hub cache."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from common import CONFIGS_DIR, REPO_ROOT, TINY_CONFIG
from vipa_d2 import add_vipa_config
from vipa_d2.engine import AtomicDetectionCheckpointer, WeightsError
from vipa_d2.modeling.text_encoder import CHECKPOINT_FILES_KEY, build_tokenizer

# A paper-family config (Swin-T: the property is the same as Swin-B's, whose build is tested
# in test_configs_zoo.py, at a third of the time); 96 px keeps the architecture (windows are
# padded) where 480 px is slow on CPU.
PAPER = os.path.join(CONFIGS_DIR, "refcoco", "vipa_swin_tiny_bert_base.yaml")
SMALL_INPUT = ["MODEL.DEVICE", "cpu", "INPUT.IMAGE_SIZE", "96"]
# The paper config names hub weights (timm's Swin, bert-base-uncased) that tests cannot
# fetch: the checkpoint is made from a model with a random backbone and the bundled MiniLM
# (BERT's uncased vocabulary) in bert-base's place. Loading uses the paper config unchanged.
SUBSTITUTES = ["MODEL.TIMM.WEIGHTS", "", "MODEL.TEXT_ENCODER.NAME", "bundled-minilm"]
TEXTS = ["the café table", "the left one"]
# The weights of a hand-made checkpoint: one text-encoder name, so that the encoder is rebuilt
# from the checkpoint's files (one without holds no text encoder: NAME's pretrained one loads).
TEXT_ENCODER_WEIGHT = {"text_encoder.model.weight": torch.zeros(1)}

pytestmark = pytest.mark.usefixtures("single_thread")

# Run in a fresh process: the hub's offline switch and cache folder are read at import time.
_LOAD_AND_PREDICT = r"""
import json, sys
import numpy as np
from detectron2.config import get_cfg
from vipa_d2 import VIPAPredictor, add_vipa_config
config, weights, texts, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
cfg = get_cfg()
add_vipa_config(cfg)
cfg.merge_from_file(config)
cfg.merge_from_list(json.loads(sys.argv[5]) + ["MODEL.WEIGHTS", weights])
predictor = VIPAPredictor(cfg)
image = np.random.default_rng(0).integers(0, 256, (80, 112, 3), dtype=np.uint8)
results = predictor(image, texts)
np.savez(out, *[r["prob"] for r in results])
"""


def _cfg(config, *opts):
    cfg = get_cfg()
    add_vipa_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(list(opts))
    return cfg


def _offline_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "HUGGINGFACE_"))}
    cache = tmp_path / "empty_hf_home"
    cache.mkdir()
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(cache), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def test_paper_checkpoint_loads_and_predicts_offline_with_an_empty_cache(tmp_path):
    from vipa_d2 import VIPAPredictor

    cfg = _cfg(PAPER, *SMALL_INPUT, *SUBSTITUTES)
    torch.manual_seed(0)
    predictor = VIPAPredictor(cfg)  # random weights: the model saved and predicted with
    AtomicDetectionCheckpointer(predictor.model, str(tmp_path)).save("model_final")
    weights = str(tmp_path / "model_final.pth")
    saved = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    assert {"config.json", "tokenizer_config.json", "vocab.txt"} <= set(saved[CHECKPOINT_FILES_KEY])

    out = str(tmp_path / "probs.npz")
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_PREDICT, PAPER, weights, json.dumps(TEXTS), out, json.dumps(SMALL_INPUT)],
        capture_output=True, text=True, env=_offline_env(tmp_path), cwd=str(tmp_path), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Nothing was fetched: the empty cache stays empty.
    assert not any(files for _, _, files in os.walk(tmp_path / "empty_hf_home"))

    # The same probabilities as the model that was saved (same weights, same tokenizer).
    image = np.random.default_rng(0).integers(0, 256, (80, 112, 3), dtype=np.uint8)
    expected = predictor(image, TEXTS)
    with np.load(out) as got:
        for i, r in enumerate(expected):
            np.testing.assert_allclose(got[f"arr_{i}"], r["prob"], atol=1e-5)


def test_checkpoint_without_text_encoder_files_and_no_local_name_is_refused_clearly(tmp_path):
    cfg = _cfg(TINY_CONFIG, *SMALL_INPUT, "MODEL.TIMM.WEIGHTS", "")
    torch.save({"model": TEXT_ENCODER_WEIGHT}, tmp_path / "old.pth")
    name = "no-such-org/no-such-text-encoder"
    cfg.merge_from_list(["MODEL.WEIGHTS", str(tmp_path / "old.pth"), "MODEL.TEXT_ENCODER.NAME", name])
    with pytest.raises(FileNotFoundError) as e:
        build_model(cfg)
    message = str(e.value)
    assert "old.pth" in message and f"MODEL.TEXT_ENCODER.NAME={name!r}" in message
    assert CHECKPOINT_FILES_KEY in message and "local directory" in message
    # The tokenizer follows the same rule, with the same message.
    with pytest.raises(FileNotFoundError, match="MODEL.TEXT_ENCODER.NAME"):
        build_tokenizer(cfg)


def test_checkpoint_files_win_over_the_configured_name(tmp_path):
    # An older checkpoint (no files entry) still loads through a local NAME; a new one
    # carries its files, which are used even when NAME names something unavailable.
    cfg = _cfg(TINY_CONFIG, *SMALL_INPUT, "MODEL.TIMM.WEIGHTS", "", "MODEL.VIPA.HIDDEN_DIM", "64")
    model = build_model(cfg)
    AtomicDetectionCheckpointer(model, str(tmp_path)).save("new")
    cfg.merge_from_list(["MODEL.WEIGHTS", str(tmp_path / "new.pth"), "MODEL.TEXT_ENCODER.NAME", "not/available"])
    rebuilt = build_model(cfg)
    assert rebuilt.text_encoder.files == model.text_encoder.files
    assert build_tokenizer(cfg).tokenize("the café") == build_tokenizer(_cfg(TINY_CONFIG)).tokenize("the café")


def test_checkpoint_files_are_read_once_per_file_version(tmp_path, monkeypatch):
    # The model, the tokenizer and every loader's mapper ask for the files: the checkpoint
    # is unpickled once, until the file at that path is replaced.
    from vipa_d2.modeling import text_encoder
    from vipa_d2.utils import checkpoint_file

    reads = []
    load = checkpoint_file.torch_load_checkpoint
    monkeypatch.setattr(checkpoint_file, "torch_load_checkpoint", lambda *a, **k: reads.append(a[0]) or load(*a, **k))
    path = tmp_path / "files.pth"
    config = {"config.json": torch.tensor(list(b'{"v": 1}'), dtype=torch.uint8)}
    torch.save({"model": TEXT_ENCODER_WEIGHT, CHECKPOINT_FILES_KEY: config}, path)
    cfg = _cfg(TINY_CONFIG, "MODEL.WEIGHTS", str(path))
    first = text_encoder.text_encoder_files(cfg)
    first["config.json"] = b"changed by a caller"  # a copy: the next caller gets the file's
    assert text_encoder.text_encoder_files(cfg) == {"config.json": b'{"v": 1}'} and len(reads) == 1
    torch.save({"model": TEXT_ENCODER_WEIGHT, CHECKPOINT_FILES_KEY: {"config.json": torch.tensor(list(b'{"v": 22}'), dtype=torch.uint8)}}, path)
    assert text_encoder.text_encoder_files(cfg) == {"config.json": b'{"v": 22}'} and len(reads) == 2


@pytest.mark.parametrize(
    "entry, problem",
    [
        ({"../evil.json": torch.zeros(1, dtype=torch.uint8), "config.json": torch.zeros(1, dtype=torch.uint8)}, "'../evil.json'"),
        ({"config.json": torch.zeros(2)}, "'config.json'"),
        ({"vocab.txt": torch.zeros(1, dtype=torch.uint8)}, "including 'config.json'"),
        # transformers would name only the temporary folder the files are read from.
        ({"config.json": torch.tensor(list(b"{not json"), dtype=torch.uint8)}, "config.json is not valid JSON"),
        ({"config.json": torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)}, "config.json holds list, expected an object"),
    ],
)
def test_malformed_files_entry_is_refused(tmp_path, entry, problem):
    torch.save({"model": TEXT_ENCODER_WEIGHT, CHECKPOINT_FILES_KEY: entry}, tmp_path / "odd.pth")
    cfg = _cfg(TINY_CONFIG, *SMALL_INPUT, "MODEL.TIMM.WEIGHTS", "", "MODEL.WEIGHTS", str(tmp_path / "odd.pth"))
    # A checkpoint's problem, not the config's: train_net.py's build_model passes it on as is.
    with pytest.raises(WeightsError, match="odd.pth") as e:
        build_tokenizer(cfg)
    assert problem in str(e.value) and CHECKPOINT_FILES_KEY in str(e.value)


def test_a_legacy_format_checkpoint_is_not_looked_into_and_says_so(tmp_path, caplog):
    # Which modules it holds is not read (the encoders are built for it to fill), so a
    # backbone-only file in this format would leave the text encoder random: the log says so.
    from vipa_d2.utils.checkpoint_file import checkpoint_outline

    path = str(tmp_path / "legacy.pth")
    torch.save({"model": {"backbone.weight": torch.zeros(1)}}, path, _use_new_zipfile_serialization=False)
    with caplog.at_level("WARNING", logger="vipa_d2"):
        assert checkpoint_outline(path) is None
    assert f"MODEL.WEIGHTS={path} is not in torch.save's zip format" in caplog.text
    zipped = str(tmp_path / "zipped.pth")
    torch.save({"model": {"backbone.weight": torch.zeros(1)}}, zipped)
    assert checkpoint_outline(zipped).modules == {"backbone"}
    # A file that is no checkpoint at all gets its read error when loaded, not this warning
    # first (checkpoints review, session 48).
    caplog.clear()
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with caplog.at_level("WARNING", logger="vipa_d2"):
        assert checkpoint_outline(str(empty)) is None
    assert "zip format" not in caplog.text
