"""Every YAML under configs/ merges into a config with the VIPA keys."""
import glob
import os
import subprocess
import sys

import pytest
from common import CONFIGS_DIR, REPO_ROOT, TINY_CONFIG, make_cfg

CONFIGS = sorted(glob.glob(os.path.join(CONFIGS_DIR, "**", "*.yaml"), recursive=True))


def test_configs_found():
    names = {os.path.relpath(p, REPO_ROOT) for p in CONFIGS}
    assert "configs/refcoco/vipa_swin_base_bert_base.yaml" in names
    assert "configs/synthetic/vipa_tiny_cpu.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO_ROOT))
def test_config_merges(path):
    cfg = make_cfg(config_file=path)
    assert cfg.MODEL.META_ARCHITECTURE == "VIPA"
    assert cfg.MODEL.VIPA.KV_SOURCE in ("visual_expression", "language")
    assert cfg.MODEL.VIPA.FUSION in ("none", "late", "early")


def test_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{CONFIGS[0]}"\nMODEL:\n  VIPA:\n    NOT_A_KEY: 1\n')
    cfg = make_cfg()
    with pytest.raises(KeyError, match="NOT_A_KEY"):
        cfg.merge_from_file(str(bad))


def test_invalid_refs_other_than_the_builtin_policy_is_refused_on_load(tmp_path):
    # The key stays so older configs merge; get_vipa_cfg (every entry point) refuses any
    # value but the built-in datasets' one fixed policy instead of ignoring it.
    old = tmp_path / "old.yaml"
    old.write_text(f'_BASE_: "{TINY_CONFIG}"\nDATASETS:\n  INVALID_REFS: "skip"\n')
    with pytest.raises(ValueError, match=r"DATASETS.INVALID_REFS='skip'.*invalid='skip'"):
        make_cfg(config_file=str(old))
    assert make_cfg("DATASETS.INVALID_REFS", "error").DATASETS.INVALID_REFS == "error"


def test_import_registers_everything_without_network():
    # A fresh interpreter in which any network connection raises: importing vipa_d2 must
    # still work and register the meta-architecture and the backbone.
    code = (
        "import socket\n"
        "def _no_net(*a, **k): raise RuntimeError('network access during import')\n"
        "socket.socket.connect = _no_net\n"
        "socket.create_connection = _no_net\n"
        "import vipa_d2\n"
        "from vipa_d2 import add_vipa_config\n"
        "from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY\n"
        "assert 'VIPATimmBackbone' in BACKBONE_REGISTRY\n"
        "assert 'VIPA' in META_ARCH_REGISTRY\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO_ROOT)
