"""tools/gpu_check.py on a machine without CUDA: its arguments, configs and the clear refusal.

The CUDA path itself (AMP training, paper-config timing) needs a GPU and is not run here;
it ran once, on an H200 (BENCHMARKS.md, section 3).
"""
import os
import runpy
import subprocess
import sys

import pytest
from detectron2.utils.events import EventStorage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "gpu_check.py")
# The script's globals (not run as __main__).
gpu_check = runpy.run_path(TOOL, run_name="gpu_check")


def test_refuses_clearly_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, even on a machine that has one
    done = subprocess.run([sys.executable, TOOL, "--iters", "5"], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == gpu_check["NO_CUDA_EXIT"]
    assert "no CUDA device" in done.stderr and "nothing to check" in done.stderr
    assert done.stdout == ""


def test_arguments_and_the_configs_it_would_run(tmp_path):
    args = gpu_check["get_parser"]().parse_args([])
    assert (args.iters, args.data_root, args.text_encoder) == (300, "datasets", "bert-base-uncased")
    args = gpu_check["get_parser"]().parse_args(["--iters", "200", "--text-encoder", "bundled-minilm"])

    tiny = gpu_check["tiny_train_cfg"](args, str(tmp_path))
    assert tiny.MODEL.DEVICE == "cuda" and tiny.SOLVER.AMP.ENABLED
    assert tiny.SOLVER.MAX_ITER == 200 and tiny.OUTPUT_DIR == str(tmp_path)
    assert tiny.DATASETS.TEST == ("refsynth_unc_val",)

    paper = gpu_check["paper_cfg"](args)
    assert paper.MODEL.TIMM.ARCH.startswith("swin_base") and paper.MODEL.TIMM.WEIGHTS == ""
    assert paper.MODEL.TEXT_ENCODER.NAME == "bundled-minilm" and paper.INPUT.IMAGE_SIZE == 480


def test_steady_step_time_leaves_the_warm_up_out():
    with EventStorage(0) as storage:
        for it, seconds in enumerate([1.5, 1.2, 1.1, 0.3, 0.28, 0.31, 0.29, 0.27]):
            storage.iter = it
            storage.put_scalar("time", seconds)
    assert gpu_check["steady_step_seconds"](storage, 8) == pytest.approx(0.285)  # median of the last 4
    assert gpu_check["steady_step_seconds"](storage, 1) == 0.27  # at least one step
