"""tools/main_job.py (``make train``) before its steps run: the run folder it may resume and
the keys each step sets. Its data step is in data/test_synthetic.py, its reading of the
evaluator's files in evaluation/test_referring_evaluation.py."""
import os

import pytest
from detectron2.engine import default_argument_parser

from common import load_script
from vipa_d2 import get_vipa_cfg

main_job = load_script("tools/main_job.py")


def test_main_job_refuses_an_output_folder_holding_another_configs_run(tmp_path):
    # --resume went on from (or only re-evaluated) the other run's weights, reported under
    # this config, and train_net.py wrote this config over the folder's (main-job review).
    out = tmp_path / "run"
    out.mkdir()
    (out / "last_checkpoint").write_text("model_final.pth")
    saved = get_vipa_cfg(main_job.DEFAULT_CONFIG, ["OUTPUT_DIR", str(out), "DATASETS.TEST", "()"])
    (out / "config.yaml").write_text(saved.dump())
    with pytest.raises(SystemExit) as e:
        main_job.main(["--output", str(out), "--data-root", str(tmp_path / "data"), "SOLVER.BASE_LR", "0.01"])
    assert str(e.value).startswith(f"[main_job] {out} holds the checkpoints of a run with another recipe, 1 key(s) "
                                   "differ (SOLVER.BASE_LR: 0.0003 there, 0.01 now)")
    assert not (tmp_path / "data").exists()  # said before anything is generated or trained


def test_main_job_steps_set_their_own_keys_after_the_overrides(tmp_path, monkeypatch):
    # With MODEL.WEIGHTS among the overrides (fine-tuning from a checkpoint), the evaluation
    # scored that checkpoint instead of the trained model_final.pth (tools review, session 52).
    steps = {}

    class Evaluated(Exception):
        pass

    def step(args_list, log_name, output, lock):  # train_net.py's arguments, not its run
        steps[log_name] = default_argument_parser().parse_args(args_list)
        if log_name == "eval_console.log":
            raise Evaluated
        return 0.0

    monkeypatch.setattr(main_job, "train_net_step", step)
    monkeypatch.setattr(main_job, "ensure_synthetic_data", lambda *args: 0.0)
    out, start = tmp_path / "run", str(tmp_path / "start.pth")
    # A config named from another folder than the repository, where the steps run: they
    # looked for it there (helper review, session 58).
    monkeypatch.chdir(os.path.dirname(os.path.dirname(main_job.DEFAULT_CONFIG)))
    with pytest.raises(Evaluated):
        main_job.main(["--config-file", os.path.relpath(main_job.DEFAULT_CONFIG), "--output", str(out),
                       "--data-root", str(tmp_path / "data"), "MODEL.WEIGHTS", start,
                       "OUTPUT_DIR", str(tmp_path / "elsewhere")])
    assert steps["train_console.log"].config_file == steps["eval_console.log"].config_file == main_job.DEFAULT_CONFIG
    train, evaluate = (get_vipa_cfg(a.config_file, a.opts) for a in (steps["train_console.log"], steps["eval_console.log"]))
    assert (train.MODEL.WEIGHTS, train.OUTPUT_DIR, train.DATASETS.TEST) == (start, str(out), ())
    assert (evaluate.MODEL.WEIGHTS, evaluate.OUTPUT_DIR) == (str(out / "model_final.pth"), str(out))
    assert steps["eval_console.log"].eval_only and steps["train_console.log"].resume


def test_main_job_refuses_a_negative_picture_count_before_any_step(tmp_path, capsys):
    # It failed after training and evaluation, in demo.py (tools review, session 56).
    with pytest.raises(SystemExit) as e:
        main_job.main(["--output", str(tmp_path / "run"), "--data-root", str(tmp_path / "data"), "--vis-images", "-1"])
    assert e.value.code == 2 and "--vis-images -1: expected 0 (no pictures) or more" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
