"""tools/gpu_check.py on a machine without CUDA: its arguments, configs and the clear refusal.

The CUDA path itself (AMP training, paper-config timing, the step profile) needs a GPU and is not run here;
it ran once, on an H200 (BENCHMARKS.md, section 3).
"""
import os
import runpy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import EventStorage

from common import REPO_ROOT
from vipa_d2.data.builtin import DATASETS_ENV

TOOL = os.path.join(REPO_ROOT, "tools", "gpu_check.py")
# The script's globals (not run as __main__).
gpu_check = runpy.run_path(TOOL, run_name="gpu_check")


def test_refuses_clearly_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, even on a machine that has one
    done = subprocess.run([sys.executable, TOOL, "--iters", "5"], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert done.returncode == gpu_check["NO_CUDA_EXIT"]
    assert "no CUDA device" in done.stderr and "nothing to check" in done.stderr
    assert done.stdout == ""


def test_iterations_below_one_are_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check["main"](["--iters", "0"])
    assert e.value.code == 2 and "--iters must be >= 1, got 0" in capsys.readouterr().err


def test_an_output_folder_holding_checkpoints_is_refused_before_anything_runs(tmp_path, capsys):
    # It trained into the folder from scratch: --output output/vipa_tiny_cpu replaced the
    # make-train model (tools review, session 52).
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    (tmp_path / "model_final.pth").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        gpu_check["main"](["--output", str(tmp_path)])
    assert e.value.code == 2
    assert f"--output {tmp_path} holds a run's checkpoints (last_checkpoint, model_final.pth)" in capsys.readouterr().err


def test_unreadable_benchmark_stats_are_one_line_before_anything_runs(tmp_path, capsys):
    for variant in ("refsynth", "grefsynth"):
        (tmp_path / variant).mkdir()
        (tmp_path / variant / "stats.json").write_text("[]")
    with pytest.raises(SystemExit) as e:
        gpu_check["main"](["--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(tmp_path / "refsynth" / "stats.json") in err and "Traceback" not in err


def test_a_text_encoder_it_cannot_load_is_refused_before_the_gpu_work(tmp_path, capsys, monkeypatch):
    # Offline, the default bert-base-uncased failed after the training and the profiles.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(gpu_check["main"].__globals__, "train_tiny", pytest.fail)
    with pytest.raises(SystemExit) as e:
        gpu_check["main"](["--data-root", str(tmp_path), "--text-encoder", str(tmp_path / "no_such_encoder")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert f"--text-encoder {tmp_path / 'no_such_encoder'}: cannot load its tokenizer" in err
    assert "use --text-encoder bundled-minilm" in err


def test_arguments_and_the_configs_it_would_run(tmp_path, monkeypatch):
    monkeypatch.delenv(DATASETS_ENV, raising=False)
    args = gpu_check["get_parser"]().parse_args([])
    assert (args.iters, args.data_root, args.text_encoder) == (300, "datasets", "bert-base-uncased")
    monkeypatch.setenv(DATASETS_ENV, str(tmp_path))  # Detectron2's variable, as the loaders read it
    assert gpu_check["get_parser"]().parse_args([]).data_root == str(tmp_path)
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


def test_step_profiler_covers_exactly_its_steps():
    # A real detectron2 trainer on a one-layer model: one addmm per forward.
    model = torch.nn.Linear(4, 1)

    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch):
            return {"loss": self.model(batch).square().mean()}

    batches = iter(lambda: torch.ones(2, 4), None)  # endless
    trainer = SimpleTrainer(Loss(), batches, torch.optim.SGD(model.parameters(), lr=0.1))
    profiler = gpu_check["StepProfiler"](start=2, steps=3)
    trainer.register_hooks([profiler])
    trainer.train(0, 7)
    forwards = sum(e.count for e in profiler._profile.key_averages() if e.key == "aten::addmm")
    assert forwards == 3  # iterations 2, 3, 4 and no other
    # No CUDA here: nothing launched, no kernel time (on a GPU these are the step's kernels).
    assert profiler.summary == {"launches": 0.0, "device_events": 0.0, "kernel_ms": 0.0}


def test_gpu_time_counts_each_kernel_once():
    # A CPU op's row carries the time of the kernels it launched, which have their own CUDA
    # rows: summing every row gave twice the GPU time (helper review, session 58).
    from torch.autograd import DeviceType

    launch, addmm, kernel = (SimpleNamespace(key=k, count=c, device_type=d, self_cuda_time_total=t)
                             for k, c, d, t in [("cudaLaunchKernel", 4, DeviceType.CPU, 0),
                                                ("aten::addmm", 4, DeviceType.CPU, 600),
                                                ("sgemm_kernel", 4, DeviceType.CUDA, 600)])
    summary = gpu_check["summarize_profile"]([launch, addmm, kernel], steps=2)
    assert summary == {"launches": 2.0, "device_events": 2.0, "kernel_ms": 0.3}


def test_profile_config_is_fp32_with_or_without_clipping(tmp_path):
    for clip in (True, False):
        cfg = gpu_check["profile_cfg"](str(tmp_path), clip)
        assert cfg.MODEL.DEVICE == "cuda" and not cfg.SOLVER.AMP.ENABLED
        assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED == clip and cfg.DATASETS.TEST == ()
        assert cfg.SOLVER.MAX_ITER == gpu_check["PROFILE_WARMUP"] + gpu_check["PROFILE_STEPS"]
