"""Every YAML under configs/: merges, names registered datasets, holds only its changes, builds."""
import functools
import glob
import os

import pytest
import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

import vipa_d2  # noqa: F401  (registers the datasets)
from vipa_d2 import add_vipa_config
from vipa_d2.modeling.text_encoder import build_tokenizer, tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
# Built offline and small: random backbone weights, the bundled MiniLM in place of a hub
# text encoder (BERT-base is not available offline), a tiny input.
OFFLINE_OPTS = ["MODEL.DEVICE", "cpu", "MODEL.TIMM.WEIGHTS", "", "MODEL.TEXT_ENCODER.NAME", "bundled-minilm"]
BUILD_SIZE = 64
# Every built-in dataset family has a config (vipa_d2/data/builtin.py).
REAL_DATASET_LEAVES = {
    "refcoco": "configs/refcoco/vipa_swin_base_bert_base.yaml",
    "refcoco+": "configs/refcoco+/vipa_swin_base_bert_base.yaml",
    "refcocog_umd": "configs/refcocog/vipa_swin_base_bert_base_umd.yaml",
    "refcocog_google": "configs/refcocog/vipa_swin_base_bert_base_google.yaml",
    "grefcoco": "configs/grefcoco/vipa_swin_base_bert_base.yaml",
    "refclef": "configs/referit/vipa_swin_base_bert_base.yaml",
}
SWIN_B_22K = "swin_base_patch4_window12_384.ms_in22k"


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


@functools.lru_cache(maxsize=None)
def _merged(path: str) -> CfgNode:
    # Read once per file: these tests merge each file several times (PyYAML's pure-Python
    # loader takes ~30 ms a file), and callers get their own clone.
    cfg = get_cfg()
    add_vipa_config(cfg)
    cfg.merge_from_file(path)
    return cfg


def load(path: str, opts=()) -> CfgNode:
    cfg = _merged(path).clone()
    cfg.merge_from_list(list(opts))
    return cfg


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _value(cfg: CfgNode, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("path", CONFIGS, ids=rel)
def test_config_names_registered_datasets(path):
    cfg = load(path)
    registered = set(DatasetCatalog.list())
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        assert name in registered, f"{rel(path)}: dataset {name!r} is not registered"


@pytest.mark.parametrize("path", CONFIGS, ids=rel)
def test_config_resumes_with_the_same_draws(path):
    # README promises a resumed GPU run the same batches and draws: with Detectron2's SEED -1
    # each launch drew a new seed (GPU review, session 55: the paper configs had it).
    assert load(path).SEED >= 0, rel(path)


@pytest.mark.parametrize("path", [p for p in CONFIGS if "_BASE_" in open(p).read()], ids=rel)
def test_config_holds_only_its_changes(path):
    """No key of a YAML with a _BASE_ repeats the value its chain already gives, whether a
    YAML of the chain sets it or the code's default does. (Base-VIPA.yaml, the root, spells
    out the paper's values on purpose.)"""
    with open(path) as f:
        own = yaml.safe_load(f)
    base_path = os.path.join(os.path.dirname(path), own.pop("_BASE_"))
    base, merged = load(base_path), load(path)
    repeated = [k for k, _ in _flatten(own) if _value(merged, k) == _value(base, k)]
    assert not repeated, f"{rel(path)} repeats its base's values for {repeated}"


def test_every_builtin_dataset_has_a_paper_config():
    for family, leaf in REAL_DATASET_LEAVES.items():
        cfg = load(os.path.join(ROOT, leaf))
        assert cfg.MODEL.TIMM.ARCH == SWIN_B_22K and cfg.MODEL.TEXT_ENCODER.NAME == "bert-base-uncased"
        assert cfg.INPUT.IMAGE_SIZE == 480
        assert all(name.startswith(family) for name in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST), leaf
    small_leaf = "configs/refcoco/vipa_swin_tiny_bert_base.yaml"
    outputs = [load(os.path.join(ROOT, p)).OUTPUT_DIR for p in [*REAL_DATASET_LEAVES.values(), small_leaf]]
    assert len(set(outputs)) == len(outputs), "two configs write to the same OUTPUT_DIR"
    small = load(os.path.join(ROOT, small_leaf))
    assert small.MODEL.TIMM.ARCH.startswith("swin_tiny") and small.MODEL.TIMM.ARCH.endswith(".ms_in22k")


# The published method's leaves, on a model base of their own, and the dataset base whose
# datasets each names (a YAML has one base).
PAPER_METHOD_BASE = "configs/Base-VIPA-Swin-B-PaperMethod.yaml"
PAPER_METHOD_LEAVES = {
    "configs/refcoco/vipa_swin_base_bert_base_paper_method.yaml": "configs/refcoco/Base-RefCOCO.yaml",
    "configs/refcoco+/vipa_swin_base_bert_base_paper_method.yaml": "configs/refcoco+/Base-RefCOCO+.yaml",
    "configs/refcocog/vipa_swin_base_bert_base_paper_method.yaml": "configs/refcocog/Base-RefCOCOg.yaml",
    "configs/referit/vipa_swin_base_bert_base_paper_method.yaml": "configs/referit/Base-ReferIt.yaml",
}


def test_the_published_methods_leaves_name_their_datasets_bases_datasets():
    # Config review, session 59: only RefCOCO had the method as published, on a leaf.
    assert sorted(rel(p) for p in CONFIGS if p.endswith("_paper_method.yaml")) == sorted(PAPER_METHOD_LEAVES)
    method = load(os.path.join(ROOT, PAPER_METHOD_BASE))
    for leaf, dataset_base in PAPER_METHOD_LEAVES.items():
        cfg, data = load(os.path.join(ROOT, leaf)), load(os.path.join(ROOT, dataset_base))
        assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == (data.DATASETS.TRAIN, data.DATASETS.TEST), leaf
        assert repr(cfg.MODEL) == repr(method.MODEL) and repr(cfg.INPUT) == repr(method.INPUT), leaf
    # Issue 16's model changes off, and VIPA.md's losses only.
    vipa = method.MODEL.VIPA
    assert not (vipa.VEG.POSITION_IN_VALUES or vipa.VEG.CUE_IDENTITY or vipa.VEG.CENTRE_WORDS)
    assert vipa.PIXEL_DECODER.TRANSFORMER_LAYERS == 0 and not vipa.PIXEL_DECODER.COORDINATES
    assert not (vipa.DECODER.NULL_KV or vipa.DECODER.KV_KERNEL)
    assert vipa.LOSS.CONTRASTIVE_CUES == "all" and vipa.LOSS.NO_TARGET_WEIGHT == 0
    assert method.MODEL.TIMM.ARCH == SWIN_B_22K and method.INPUT.RANDOM_FLIP == "none"


def _model_key(cfg: CfgNode) -> str:
    # Configs that differ only outside MODEL / INPUT build the same model: build it once.
    # (Every config has the defaults' keys in the defaults' order: equal reprs, equal values.)
    return repr(cfg.MODEL) + repr(cfg.INPUT)


def _distinct_models():
    seen = {}
    for path in CONFIGS:
        cfg = load(path, OFFLINE_OPTS + ["INPUT.IMAGE_SIZE", BUILD_SIZE])
        seen.setdefault(_model_key(cfg), (rel(path), cfg))
    return list(seen.values())


MODELS = _distinct_models()


@pytest.mark.parametrize("name,cfg", MODELS, ids=[name for name, _ in MODELS])
def test_config_builds_and_predicts(name, cfg, single_thread):
    model = build_model(cfg).eval()
    arch = cfg.MODEL.TIMM.ARCH.split(".")[0]
    assert type(model.backbone).__name__ == cfg.MODEL.BACKBONE.NAME
    image = torch.randint(0, 256, (3, BUILD_SIZE, BUILD_SIZE), dtype=torch.uint8)
    tokens = tokenize(build_tokenizer(cfg), ["the dog on the left"], cfg.INPUT.MAX_TEXT_LEN)
    sample = {"image": image, "height": 50, "width": 70}
    sample.update(input_ids=tokens["input_ids"][0], attention_mask=tokens["attention_mask"][0])
    with torch.no_grad():
        out = model([sample])[0]
    assert out["ref_seg"].shape == (50, 70), f"{name} ({arch})"
    assert torch.isfinite(out["ref_seg"]).all()
