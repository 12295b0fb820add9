"""Every YAML under configs/ merges into a config with the VIPA keys."""
import glob
import os
import re
import subprocess
import sys

import pytest
from common import CONFIGS_DIR, REPO_ROOT, TINY_CONFIG, import_train_net, load_script, make_cfg, train_net_args
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from vipa_d2 import ConfigError, add_vipa_config, get_vipa_cfg
from vipa_d2.config import OWN_KEYS_HINT, import_config_functions
from vipa_d2.modeling.head import KV_SOURCES

CONFIGS = sorted(glob.glob(os.path.join(CONFIGS_DIR, "**", "*.yaml"), recursive=True))


def test_configs_found():
    names = {os.path.relpath(p, REPO_ROOT) for p in CONFIGS}
    assert "configs/refcoco/vipa_swin_base_bert_base.yaml" in names
    assert "configs/synthetic/vipa_tiny_cpu.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO_ROOT))
def test_config_merges(path):
    cfg = make_cfg(config_file=path)
    assert cfg.MODEL.META_ARCHITECTURE == "VIPA"
    assert cfg.MODEL.VIPA.KV_SOURCE in KV_SOURCES
    assert cfg.MODEL.VIPA.FUSION in ("none", "late", "early")


def test_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{CONFIGS[0]}"\nMODEL:\n  VIPA:\n    NOT_A_KEY: 1\n')
    cfg = make_cfg()
    with pytest.raises(KeyError, match="NOT_A_KEY"):
        cfg.merge_from_file(str(bad))


def test_get_vipa_cfg_names_what_does_not_merge(tmp_path):
    bad, gone, broken = tmp_path / "bad.yaml", tmp_path / "gone.yaml", tmp_path / "broken.yaml"
    bad.write_text(f'_BASE_: "{gone}"\n')
    broken.write_text("MODEL: [\n")
    cases = [
        ((str(broken), ()), f"invalid config file {broken}: while parsing"),
        ((str(bad), ()), f"invalid config file {bad}: [Errno 2] No such file or directory: '{gone}'"),
        ((str(gone), ()), f"invalid config file {gone}: Config file '{gone}' does not exist"),
        ((TINY_CONFIG, ("MODEL.BOGUS", "1")), "invalid config override: Non-existent key: MODEL.BOGUS"),
        ((TINY_CONFIG, ("SOLVER.BASE_LR", "1")), "invalid config override: Type mismatch"),
        ((TINY_CONFIG, ("SEED",)), "config overrides must be KEY VALUE pairs, got an odd number: ['SEED']"),
        # A string was taken letter by letter (Python-API review, session 55).
        ((TINY_CONFIG, "SEED 3"), "config overrides must be a list of KEY VALUE items, got the string 'SEED 3'"),
    ]
    # A checkpoint given as the config file: a UnicodeDecodeError from inside before.
    checkpoint = tmp_path / "model_final.pth"
    checkpoint.write_bytes(b"\x80\x02PK\x03\x04 not text")
    cases += [((str(checkpoint), ()), f"invalid config file {checkpoint}: not UTF-8 text (invalid start byte at byte 0); "
                                      "expected a YAML config (a checkpoint goes to MODEL.WEIGHTS)"),
              # A run folder given for its config: said not to exist before.
              ((str(tmp_path), ()), f"invalid config file {tmp_path}: a folder, not a YAML file (a run's is "
                                    f"{tmp_path / 'config.yaml'})")]
    loop, listed = tmp_path / "loop.yaml", tmp_path / "listed.yaml"
    loop.write_text(f'_BASE_: "{loop}"\n')
    listed.write_text("- MODEL\n")
    split = {"name": "mine", "refer_root": "/r", "dataset": "d", "split_by": "unc", "split": "train", "image_root": "/i"}
    cases += [
        ((TINY_CONFIG, ("DATASETS.REFER_SPLITS", repr([{"name": "mine"}]))),
         "DATASETS.REFER_SPLITS[0]: missing keys ['refer_root', 'dataset', 'split_by', 'split', 'image_root'], unknown keys []"),
        ((TINY_CONFIG, ("DATASETS.REFER_SPLITS", repr([split, {**split, "splitby": "unc"}]))),
         "DATASETS.REFER_SPLITS[1]: missing keys [], unknown keys ['splitby']"),
        ((TINY_CONFIG, ("DATASETS.REFER_SPLITS", repr([{**split, "generalized": "yes"}]))),
         "DATASETS.REFER_SPLITS[0].generalized: expected a bool, got 'yes'"),
        ((TINY_CONFIG, ("DATASETS.REFER_SPLITS", repr([{**split, "invalid": "ignore"}]))),
         "DATASETS.REFER_SPLITS[0].invalid: 'ignore', expected one of"),
        ((TINY_CONFIG, ("DATASETS.REFER_SPLITS", repr(["mine"]))), "DATASETS.REFER_SPLITS[0]: expected a mapping"),
        # Sizes that torch or PIL would refuse deep inside, without the key.
        ((TINY_CONFIG, ("MODEL.VIPA.HIDDEN_DIM", "-5")), "MODEL.VIPA.HIDDEN_DIM=-5: expected an integer >= 1"),
        ((TINY_CONFIG, ("INPUT.IMAGE_SIZE", "0")), "INPUT.IMAGE_SIZE=0: expected an integer >= 1"),
        ((TINY_CONFIG, ("INPUT.MAX_TEXT_LEN", "2")), "INPUT.MAX_TEXT_LEN=2: expected an integer >= 3"),
        ((TINY_CONFIG, ("MODEL.PIXEL_MEAN", "[127.5]")), "MODEL.PIXEL_MEAN=[127.5]: expected 3 values"),
        # Detectron2 would unpack a 3-item entry only after the whole training run.
        ((TINY_CONFIG, ("TEST.EXPECTED_RESULTS", "[['refsynth_unc_val/refer', 'oIoU', 90.0]]")),
         "TEST.EXPECTED_RESULTS[0]=['refsynth_unc_val/refer', 'oIoU', 90.0]: expected [task, metric, value, tolerance >= 0]"),
        ((TINY_CONFIG, ("TEST.EXPECTED_RESULTS", "[['v/refer', 'oIoU', '90', 1.0]]")), "TEST.EXPECTED_RESULTS[0]="),
        # Detectron2 keys the referring pipeline would have ignored.
        ((TINY_CONFIG, ("DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler")),
         "DATALOADER.SAMPLER_TRAIN='RepeatFactorTrainingSampler': the referring pipeline does not read it; "
         "it uses the trainer's own resumable sampler"),
        ((TINY_CONFIG, ("INPUT.MIN_SIZE_TEST", "480")), "INPUT.MIN_SIZE_TEST=480: the referring pipeline does not read it; it uses INPUT.IMAGE_SIZE"),
        ((TINY_CONFIG, ("INPUT.CROP.ENABLED", "True")), "INPUT.CROP.ENABLED=True: the referring pipeline does not read it"),
        ((str(loop), ()), f"invalid config file {loop}: its _BASE_ chain comes back to a file it has read"),
        ((str(listed), ()), f"invalid config file {listed}: expected a mapping of config keys at the top level"),
        # A YAML blank or a None override (yacs lets None replace any value), and names read
        # only by a loader, the evaluator or the optimizer: one line here, not a traceback
        # after the model or the training (config review, session 47).
        ((TINY_CONFIG, ("INPUT.IMAGE_SIZE", "None")), "INPUT.IMAGE_SIZE=None: expected an integer >= 1"),
        ((TINY_CONFIG, ("MODEL.VIPA.VEG.RATIO", "None")), "MODEL.VIPA.VEG.RATIO=None: expected a value like its default, 0.3"),
        ((TINY_CONFIG, ("MODEL.PIXEL_STD", "None")), "MODEL.PIXEL_STD=None: expected 3 values"),
        ((TINY_CONFIG, ("TEST.EXPECTED_RESULTS", "None")), "TEST.EXPECTED_RESULTS=None: expected a list of"),
        ((TINY_CONFIG, ("TEST.EVAL_RESOLUTION", "Original")),
         "TEST.EVAL_RESOLUTION='Original': expected one of ('original', 'input')"),
        ((TINY_CONFIG, ("INPUT.RESIZE_MODE", "keep-ratio")), "INPUT.RESIZE_MODE='keep-ratio': expected one of"),
        ((TINY_CONFIG, ("INPUT.RANDOM_FLIP", "vertical")), "INPUT.RANDOM_FLIP='vertical': expected one of"),
        ((TINY_CONFIG, ("SOLVER.OPTIMIZER", "LION")), "SOLVER.OPTIMIZER='LION': expected one of ('ADAMW', 'SGD')"),
        # Solver values found only once the model was built, or after the training, or taken
        # (a negative clip value is gradient ascent); engine review, session 53.
        ((TINY_CONFIG, ("TEST.IMS_PER_BATCH", "0")), "TEST.IMS_PER_BATCH=0: expected an integer >= 1"),
        ((TINY_CONFIG, ("SOLVER.CHECKPOINT_PERIOD", "0")), "SOLVER.CHECKPOINT_PERIOD=0: expected an integer >= 1"),
        ((TINY_CONFIG, ("SOLVER.MAX_ITER", "0")), "SOLVER.MAX_ITER=0: expected an integer >= 1"),
        ((TINY_CONFIG, ("TEST.BEST_METRIC_MODE", "min")), "TEST.BEST_METRIC_MODE='min' with TEST.BEST_METRIC empty"),
        ((TINY_CONFIG, ("SOLVER.MAX_ITER", "-5")), "SOLVER.MAX_ITER=-5: expected an integer >= 1"),
        ((TINY_CONFIG, ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "-1.0")),
         "SOLVER.CLIP_GRADIENTS.CLIP_VALUE=-1.0: expected a number > 0"),
        ((TINY_CONFIG, ("SOLVER.BASE_LR", "0.0")), "SOLVER.BASE_LR=0.0: expected a number > 0"),
        ((TINY_CONFIG, ("SOLVER.WEIGHT_DECAY_NORM", "-0.5")), "SOLVER.WEIGHT_DECAY_NORM=-0.5: expected a number >= 0"),
        ((TINY_CONFIG, ("SOLVER.WEIGHT_DECAY_BIAS", "-0.5")),
         "SOLVER.WEIGHT_DECAY_BIAS=-0.5: expected a number >= 0 (or None)"),
        ((TINY_CONFIG, ("SOLVER.CHECKPOINT_MAX_KEEP", "-3")), "SOLVER.CHECKPOINT_MAX_KEEP=-3: expected a number >= 0"),
        ((TINY_CONFIG, ("TEST.EVAL_PERIOD", "-100")), "TEST.EVAL_PERIOD=-100: expected a number >= 0"),
        ((TINY_CONFIG, ("SOLVER.BETAS", "(0.9,)")), "SOLVER.BETAS=(0.9,): expected 2 numbers in [0, 1)"),
        ((TINY_CONFIG, ("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model")),
         "SOLVER.CLIP_GRADIENTS.CLIP_TYPE='full_model': expected one of ('value', 'norm')"),
        ((TINY_CONFIG, ("SOLVER.LR_SCHEDULER_NAME", "WarmupCosine")), "SOLVER.LR_SCHEDULER_NAME='WarmupCosine': expected "
         "one of ('WarmupMultiStepLR', 'WarmupCosineLR', 'WarmupStepWithFixedGammaLR')"),
        ((TINY_CONFIG, ("SOLVER.WARMUP_METHOD", "cosine")), "SOLVER.WARMUP_METHOD='cosine': expected one of"),
    ]
    # Files a merge would read wrong or answer with a Python error, named with the file.
    files = {
        "twice.yaml": ("MODEL:\n  VIPA:\n    HIDDEN_DIM: 64\nSEED: 1\nMODEL:\n  WEIGHTS: ''\n",
                       "line 5: MODEL is given a second time (first at line 1); the second would replace the first"),
        "empty.yaml": ("# nothing yet\n", "it is empty; expected a mapping of config keys"),
        "blank_section.yaml": ("MODEL:\n  # VIPA:\n  #   HIDDEN_DIM: 64\n", "MODEL: expected a section of keys, got None"),
        "base_number.yaml": ("_BASE_: 3\n", "_BASE_: expected a config file name or a list of them, got 3"),
    }
    for name, (text, message) in files.items():
        (tmp_path / name).write_text(text)
        cases.append(((str(tmp_path / name), ()), f"invalid config file {tmp_path / name}: {message}"))
    # ... in any file of the _BASE_ chain, named by that file.
    (tmp_path / "leaf.yaml").write_text('_BASE_: "twice.yaml"\n')
    cases.append(((str(tmp_path / "leaf.yaml"), ()), f"invalid config file {tmp_path / 'twice.yaml'}: line 5"))
    for args, message in cases:
        with pytest.raises(ConfigError) as e:
            get_vipa_cfg(*args)
        assert str(e.value).startswith(message), str(e.value)


def test_a_config_file_is_read_as_data_not_run(tmp_path):
    # Detectron2 falls back to yaml.unsafe_load when safe_load refuses a file: a !!python
    # tag would run (here: create a file) before any check of the merged values.
    ran = tmp_path / "ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'_BASE_: "{TINY_CONFIG}"\nOUTPUT_DIR: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ["{ran}"]]\n')
    with pytest.raises(ConfigError, match=f"invalid config file {evil}: could not determine a constructor"):
        get_vipa_cfg(str(evil))
    assert not ran.exists()


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


def _leaves(node, prefix=""):
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_add_vipa_config_only_adds_keys():
    # Every Detectron2 key holds a marker first: add_vipa_config must leave all of them
    # (VIPA's values of core keys live in configs/Base-VIPA.yaml).
    cfg = get_cfg()
    core = dict(_leaves(cfg))
    for key in core:
        node = cfg
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = ("marker", key)
    add_vipa_config(cfg)
    changed = [k for k, v in _leaves(cfg) if k in core and v != ("marker", k)]
    assert not changed


def add_project_config(cfg):
    """A project's own keys, as Detectron2 projects add them."""
    cfg.MODEL.PROJECT_LOSS = CN()
    cfg.MODEL.PROJECT_LOSS.WEIGHT = 1.0


def test_project_config_functions_add_keys_its_files_set(tmp_path):
    leaf = tmp_path / "project_leaf.yaml"
    leaf.write_text(f"_BASE_: {TINY_CONFIG}\nMODEL:\n  PROJECT_LOSS:\n    WEIGHT: 0.5\n")
    with pytest.raises(ConfigError, match="PROJECT_LOSS"):
        get_vipa_cfg(str(leaf))
    assert get_vipa_cfg(str(leaf), add_configs=[add_project_config]).MODEL.PROJECT_LOSS.WEIGHT == 0.5
    overridden = get_vipa_cfg(str(leaf), ["MODEL.PROJECT_LOSS.WEIGHT", "0.25"], [add_project_config])
    assert overridden.MODEL.PROJECT_LOSS.WEIGHT == 0.25


def test_the_tools_read_a_projects_keys_through_config_function(tmp_path, monkeypatch):
    # demo.py, app.py, visualize_data.py, model_cost.py and slim_checkpoint.py could not read
    # a config with keys of one's own (extension review, session 53): --config-function.
    (tmp_path / "myproj_config.py").write_text(
        "from detectron2.config import CfgNode\n\n\n"
        "def add_myproj_config(cfg):\n    cfg.MODEL.MYPROJ = CfgNode()\n    cfg.MODEL.MYPROJ.WEIGHT = 1.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    leaf = tmp_path / "mine.yaml"
    leaf.write_text(f"_BASE_: {TINY_CONFIG}\nMODEL:\n  MYPROJ:\n    WEIGHT: 0.25\n")
    demo = load_script("demo/demo.py")
    with pytest.raises(demo.DemoError, match=r"Non-existent config key: MODEL.MYPROJ \(a key of your own project\? .*"
                                             "--config-function MODULE:FUNCTION"):
        demo.setup_cfg(str(leaf), [])
    spec = "myproj_config:add_myproj_config"
    args = demo.get_parser().parse_args(["--config-file", str(leaf), "--config-function", spec, "--input", "x.jpg",
                                         "--output", "o", "--text", "the cup"])
    assert demo.setup_cfg(args.config_file, [], args.config_function).MODEL.MYPROJ.WEIGHT == 0.25
    model_cost = load_script("tools/model_cost.py")  # its arguments load the config when parsed
    assert model_cost.parse_args(["--config-file", str(leaf), "--config-function", spec]).config_function == [spec]
    for bad, problem in {"myproj_config": "expected MODULE:FUNCTION", "no_such_module:f": "cannot import 'no_such_module'",
                         "myproj_config:nothing": "myproj_config has no function 'nothing'"}.items():
        with pytest.raises(ConfigError, match=f"--config-function '{bad}': {problem}"):
            import_config_functions([bad])


def test_the_hint_names_exactly_the_scripts_that_take_config_function():
    # The refusal of an unknown key lists them: it had said "the tools that read configs",
    # which main_job.py and study.py do without the option (docs review, session 56).
    scripts = glob.glob(os.path.join(REPO_ROOT, "tools", "*.py")) + glob.glob(os.path.join(REPO_ROOT, "demo", "*.py"))
    for path in scripts:
        stem = os.path.basename(path)[: -len(".py")]
        with open(path, encoding="utf-8") as f:
            takes = "add_config_function_option(" in f.read()
        assert bool(re.search(rf"\b{stem}\b", OWN_KEYS_HINT)) == takes, stem


def test_train_net_reads_the_trainers_config_functions(tmp_path, monkeypatch):
    # train_net.py's one place for them, used in every process it starts (setup) and before
    # (the one-line refusal of a config that does not merge).
    train_net = import_train_net()
    args = train_net_args(tmp_path, opts=["MODEL.PROJECT_LOSS.WEIGHT", "0.5"])
    with pytest.raises(ConfigError, match="PROJECT_LOSS"):
        train_net.load_config(args)
    monkeypatch.setattr(train_net.Trainer, "config_functions", (add_project_config,))
    assert train_net.load_config(args).MODEL.PROJECT_LOSS.WEIGHT == 0.5


def test_retired_speed_switches_merge_with_a_warning(tmp_path, caplog):
    # Always on now (VIPA.set_speedups turns them off): an old YAML still means the same model.
    old = tmp_path / "old.yaml"
    old.write_text(
        f'_BASE_: "{os.path.join(REPO_ROOT, "configs/synthetic/vipa_tiny_cpu.yaml")}"\n'
        "MODEL:\n  TIMM:\n    FOLD_BN: False\n  VIPA:\n    TRIM_TEXT_PADDING: False\n    FUSED_ATTENTION: False\n"
    )
    cfg = get_cfg()
    add_vipa_config(cfg)
    with caplog.at_level("WARNING"):
        cfg.merge_from_file(str(old))
    for key in ("MODEL.TIMM.FOLD_BN", "MODEL.VIPA.TRIM_TEXT_PADDING", "MODEL.VIPA.FUSED_ATTENTION"):
        assert f"Deprecated config key (ignoring): {key}" in caplog.text
    assert "FOLD_BN" not in cfg.MODEL.TIMM and "TRIM_TEXT_PADDING" not in cfg.MODEL.VIPA


@pytest.mark.parametrize(
    "old, new",
    [("MODEL.VIPA.CHANNELS_LAST", "MODEL.CHANNELS_LAST"), ("MODEL.VIPA.COMPILE_BACKBONE", "TEST.COMPILE_BACKBONE")],
)
def test_moved_runtime_keys_name_their_new_place(old, new):
    cfg = get_cfg()
    add_vipa_config(cfg)
    with pytest.raises(KeyError, match=f"{old} was renamed to {new}"):
        cfg.clone().merge_from_list([old, "True"])


def test_refer_splits_from_a_yaml_file_as_the_readme_writes_them(tmp_path):
    leaf = tmp_path / "mine.yaml"
    leaf.write_text(
        f'_BASE_: "{TINY_CONFIG}"\n'
        "DATASETS:\n"
        "  REFER_SPLITS:\n"
        "    - {name: mydata_train, refer_root: /data/refer, dataset: mydata, split_by: unc, split: train, image_root: /data/images}\n"
        "    - {name: mydata_val, refer_root: /data/refer, dataset: mydata, split_by: unc, split: val, image_root: /data/images, generalized: true}\n"
        '  TRAIN: ("mydata_train",)\n'
    )
    cfg = get_vipa_cfg(str(leaf))
    assert [e["name"] for e in cfg.DATASETS.REFER_SPLITS] == ["mydata_train", "mydata_val"]
    assert cfg.DATASETS.REFER_SPLITS[1]["generalized"] is True and cfg.DATASETS.TRAIN == ("mydata_train",)
    cfg.freeze()
    assert "mydata_val" in cfg.dump()  # what default_setup writes to OUTPUT_DIR/config.yaml
