"""TEST.EVAL_PERIOD with the real trainer: model_best.pth holds the best val oIoU, across --resume."""
import logging
import os
from datetime import timedelta

import pytest
import torch

from common import INSTANT_TEST_VAL as VAL
from common import captured_log, import_train_net, train_net_args
from detectron2.utils import comm
from vipa_d2 import ConfigError
from vipa_d2.engine import BestMetricCheckpointer, WeightsError, best_metric_name
from vipa_d2.engine.process_group import launch_ranks, release_process_groups

train_net = import_train_net()
pytestmark = pytest.mark.usefixtures("synthetic_datasets_root")
EVAL_EVERY = ["TEST.EVAL_PERIOD", "2", "SOLVER.MAX_ITER", "4"]


def _best_hook(trainer):
    found = [h for h in trainer._hooks if isinstance(h, BestMetricCheckpointer)]
    assert len(found) == 1
    return found[0]


def test_model_best_records_the_best_val_oiou_and_survives_resume(tmp_path):
    cfg = train_net.setup(train_net_args(tmp_path, opts=EVAL_EVERY))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()

    name = best_metric_name(VAL)
    assert name == f"{VAL}/refer/oIoU"
    history = trainer.storage.history(name).values()
    # Evaluated after the 2nd iteration (storage iteration 1) and after training (iteration 4).
    assert [it for _, it in history] == [1, 4]
    best_value, best_iter = max(history, key=lambda v: v[0])
    assert (_best_hook(trainer).best_metric, _best_hook(trainer).best_iter) == (best_value, best_iter)

    saved = torch.load(os.path.join(tmp_path, "model_best.pth"), map_location="cpu", weights_only=True)
    hook = _best_hook(trainer)
    assert saved["best_metric"] == {"name": name, "mode": "max", "value": best_value, "iteration": best_iter,
                                    "run": hook.state_dict()["run"]}
    assert saved["iteration"] == best_iter
    assert saved["model"].keys() == trainer.model.state_dict().keys()

    # A resumed run starts from the recorded best, not from None.
    resumed = train_net.Trainer(train_net.setup(train_net_args(tmp_path, opts=EVAL_EVERY + ["SOLVER.MAX_ITER", "6"])))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 4
    assert (_best_hook(resumed).best_metric, _best_hook(resumed).best_iter) == (best_value, best_iter)
    # ... and one resumed with another metric or mode starts anew (engine review, session 58:
    # oIoU's best was kept for Prec@0.9, which never beat it, and model_best.pth stayed).
    for other in (["TEST.BEST_METRIC", f"{VAL}/refer/Prec@0.9"], ["TEST.BEST_METRIC", name, "TEST.BEST_METRIC_MODE", "min"]):
        anew = train_net.Trainer(train_net.setup(train_net_args(tmp_path, opts=EVAL_EVERY + other)))
        anew.resume_or_load(resume=True)
        assert (_best_hook(anew).best_metric, _best_hook(anew).best_iter) == (None, None), other
    # The model_best.pth record is taken when its run is the resumed one (an evaluation after
    # the last checkpoint), not when it is another run's (one started anew in this folder).
    state = {**_best_hook(resumed).state_dict(), "best_metric": None, "best_iter": None}
    for run, taken in ((state["run"], (best_value, best_iter)), ("another run", (None, None))):
        _best_hook(resumed).load_state_dict({**state, "run": run})
        assert (_best_hook(resumed).best_metric, _best_hook(resumed).best_iter) == taken, run

    # A better score replaces model_best.pth, whose trainer state already holds the new best
    # (what a resume from it restores).
    better = best_value + 10.0
    trainer.storage.put_scalar(name, better, smoothing_hint=False)
    hook._best_checking()
    saved = torch.load(os.path.join(tmp_path, "model_best.pth"), map_location="cpu", weights_only=True)
    assert saved["best_metric"]["value"] == better == hook.best_metric
    assert saved["trainer"]["hooks"][type(hook).__qualname__]["best_metric"] == better
    # A worse one does not.
    trainer.storage.put_scalar(name, better - 1.0, smoothing_hint=False)
    hook._best_checking()
    assert hook.best_metric == better

    # An unreadable model_best.pth stops the resume (which restores the hook's state) with
    # its name, not a deep traceback.
    with open(os.path.join(tmp_path, "model_best.pth"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(WeightsError, match="model_best.pth: cannot read its best_metric record to resume"):
        hook.load_state_dict(hook.state_dict())


def test_no_best_checkpointer_without_periodic_evaluation(tmp_path):
    opts = ["TEST.EVAL_PERIOD", "0", "TEST.BEST_METRIC", f"{VAL}/refer/mIoU"]
    with captured_log("vipa_d2.engine.trainer", logging.WARNING) as seen:
        trainer = train_net.Trainer(train_net.setup(train_net_args(tmp_path, opts=opts)))
    assert not any(isinstance(h, BestMetricCheckpointer) for h in trainer._hooks)
    # A metric named for nothing is said to be unread (it was silently).
    assert any(f"TEST.BEST_METRIC '{VAL}/refer/mIoU' is not read" in message for _, message in seen), seen


def test_the_best_checkpoint_follows_the_metric_a_config_names(tmp_path):
    # model_best followed the first test set's refer/oIoU only, whatever an evaluator of
    # one's own computes (extension review, session 53).
    opts = EVAL_EVERY + ["TEST.BEST_METRIC", f"{VAL}/refer/mIoU", "TEST.BEST_METRIC_MODE", "min"]
    hook = _best_hook(train_net.Trainer(train_net.setup(train_net_args(tmp_path, opts=opts))))
    assert hook._val_metric == f"{VAL}/refer/mIoU" and hook._compare(1.0, 2.0) and not hook._compare(2.0, 1.0)


@pytest.mark.parametrize("metric, opts, problem", [
    ("refsynth_unc_vall/refer/oIoU", [], f"is not a metric of a set evaluated every TEST.EVAL_PERIOD \\({VAL}\\)"),
    (f"{VAL}/refer", [], "expected '<set>/<section>/<metric>'"),
    (f"{VAL}/refer/", [], "expected '<set>/<section>/<metric>'"),
    (f"{VAL}/shuffled/refer/oIoU", [], "is not a metric of a set"),  # the control does not run
    # The flipped pass runs after the training only: no best to keep.
    (f"{VAL}_TTA/refer/oIoU", ["TEST.AUG.ENABLED", "True"], "the flipped pass, '<set>_TTA', runs after the training only"),
])
def test_a_best_metric_of_no_periodically_evaluated_set_is_refused_before_training(tmp_path, monkeypatch, metric, opts,
                                                                                    problem):
    cfg = train_net.setup(train_net_args(tmp_path, opts=EVAL_EVERY + opts + ["TEST.BEST_METRIC", metric]))
    # ... before the model is built (minutes for a large one; review, session 58).
    monkeypatch.setattr(train_net.Trainer, "build_model", classmethod(lambda cls, cfg: pytest.fail("model built")))
    with pytest.raises(ConfigError, match=f"^TEST.BEST_METRIC: '{metric}' .*{problem}"):
        train_net.Trainer(cfg)


def test_a_best_metric_is_not_read_where_nothing_keeps_the_best(tmp_path):
    # --eval-only of a run's config on another set: setup() refused the key it does not read
    # (diff review, session 55). The control's set is evaluated periodically and allowed.
    opts = ["DATASETS.TEST", "('refsynth_unc_testA',)", "TEST.BEST_METRIC", f"{VAL}/refer/oIoU"]
    train_net.setup(train_net_args(tmp_path, "--eval-only", opts=EVAL_EVERY + opts))
    opts = ["TEST.SHUFFLED_EXPRESSION_CONTROL", "True", "TEST.BEST_METRIC", f"{VAL}/shuffled/refer/mIoU"]
    hook = _best_hook(train_net.Trainer(train_net.setup(train_net_args(tmp_path, opts=EVAL_EVERY + opts))))
    assert hook._evaluated_set == f"{VAL}/shuffled"
    # The default key is not checked: an evaluator of one's own may report no refer/oIoU.
    assert _best_hook(train_net.Trainer(train_net.setup(train_net_args(tmp_path, opts=EVAL_EVERY))))._evaluated_set is None


def test_a_best_metric_the_evaluation_does_not_compute_stops_at_the_first(tmp_path):
    # A typo in the metric or the section: Detectron2's hook warned at each evaluation,
    # saved no model_best.pth, and the run ended with status 0 (extension review, session 55).
    opts = EVAL_EVERY + ["TEST.BEST_METRIC", f"{VAL}/refer/oIoUU"]
    trainer = train_net.Trainer(train_net.setup(train_net_args(tmp_path, opts=opts)))
    trainer.resume_or_load(resume=False)
    with pytest.raises(ConfigError, match=rf"TEST.BEST_METRIC: '{VAL}/refer' has no metric 'oIoUU'; it has "
                                          r"Prec@0.5, .*, mIoU, oIoU$"):
        trainer.train()
    assert trainer.storage.iter == 1  # the first evaluation, after the second iteration
    assert not os.path.exists(os.path.join(tmp_path, "model_best.pth"))
    hook = _best_hook(trainer)
    hook._val_metric = f"{VAL}/refr/oIoU"
    with pytest.raises(ConfigError, match=f"TEST.BEST_METRIC: '{VAL}' has no section 'refr'; it has refer, "
                                          "refer_by_type, retrieval$"):
        hook._best_checking()


def _main_recording_config_errors(args, record_dir):
    """train_net.main in a launched rank, its ConfigError written to rank<k>.txt rather than
    raised (a rank that raised would end the other before it could write)."""
    try:
        train_net.main(args)
    except ConfigError as e:
        with open(os.path.join(record_dir, f"rank{comm.get_rank()}.txt"), "w") as f:
            f.write(str(e))
    finally:
        release_process_groups()


def test_a_best_metric_the_evaluation_does_not_compute_stops_every_rank(tmp_path):
    # Raised on rank 0 alone, it left rank 1 in the next iteration's all-reduce: on other
    # machines, until the process group's timeout (diff review, session 55).
    opts = ["TEST.EVAL_PERIOD", "1", "SOLVER.MAX_ITER", "2", "TEST.BEST_METRIC", f"{VAL}/refer/oIoUU"]
    args = train_net_args(tmp_path / "run", "--num-gpus", "2", opts=opts)
    launch_ranks(_main_recording_config_errors, 2, dist_url=args.dist_url, args=(args, str(tmp_path)), device="cpu",
                 timeout=timedelta(seconds=60))
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith(f"TEST.BEST_METRIC: '{VAL}/refer' has no metric 'oIoUU'")
