"""TEST.EVAL_PERIOD with the real trainer: model_best.pth holds the best val oIoU, across --resume."""
import os

import pytest
import torch

from common import INSTANT_TEST_VAL as VAL
from common import import_train_net, train_net_args
from vipa_d2.engine import BestMetricCheckpointer, best_metric_name

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
    hook = _best_hook(trainer)
    assert (hook.best_metric, hook.best_iter) == (best_value, best_iter)

    saved = torch.load(os.path.join(tmp_path, "model_best.pth"), map_location="cpu", weights_only=True)
    assert saved["best_metric"] == {"name": name, "value": best_value, "iteration": best_iter}
    assert saved["iteration"] == best_iter
    assert saved["model"].keys() == trainer.model.state_dict().keys()

    # A resumed run starts from the recorded best, not from None.
    resumed = train_net.Trainer(train_net.setup(train_net_args(tmp_path, opts=EVAL_EVERY + ["SOLVER.MAX_ITER", "6"])))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 4
    assert (_best_hook(resumed).best_metric, _best_hook(resumed).best_iter) == (best_value, best_iter)

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
    with pytest.raises(RuntimeError, match="model_best.pth: cannot read its best_metric record to resume"):
        hook.load_state_dict(hook.state_dict())


def test_no_best_checkpointer_without_periodic_evaluation(tmp_path):
    trainer = train_net.Trainer(train_net.setup(train_net_args(tmp_path, opts=["TEST.EVAL_PERIOD", "0"])))
    assert not any(isinstance(h, BestMetricCheckpointer) for h in trainer._hooks)


def test_the_best_checkpoint_follows_the_metric_a_config_names(tmp_path):
    # model_best followed the first test set's refer/oIoU only, whatever an evaluator of
    # one's own computes (extension review, session 53).
    opts = EVAL_EVERY + ["TEST.BEST_METRIC", f"{VAL}/refer/mIoU", "TEST.BEST_METRIC_MODE", "min"]
    hook = _best_hook(train_net.Trainer(train_net.setup(train_net_args(tmp_path, opts=opts))))
    assert hook._val_metric == f"{VAL}/refer/mIoU" and hook._compare(1.0, 2.0) and not hook._compare(2.0, 1.0)
