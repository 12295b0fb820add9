"""Untrusted files are data, not code: REFER pickles and checkpoints that would run code are
refused before anything runs; MODEL.WEIGHTS_TRUSTED opts back in to full pickle."""

import collections
import os
import pickle
import subprocess
import sys

import pytest
import torch
from detectron2.solver import build_lr_scheduler

from common import REPO_ROOT, RunsCode, make_cfg
from vipa_d2.data.safe_pickle import ForbiddenPickleError, loads_plain_pickle
from vipa_d2.engine import (
    AtomicDetectionCheckpointer,
    UntrustedCheckpointError,
    WeightsOnlyCheckpointer,
)
from vipa_d2.predictor import WeightsError, load_weights


# ----------------------------------------------------------------------- REFER pickles
def test_plain_pickle_round_trip_and_refusal(tmp_path):
    data = [
        {
            "ref_id": 1,
            "sentences": [{"raw": "ça", "sent_id": 2}],
            "box": (1.5, None, True),
            "n": 2**70,
        }
    ]
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        assert loads_plain_pickle(pickle.dumps(data, protocol=protocol)) == data
    # Python 3 writes bytes with protocols < 3 as a call of _codecs.encode, so only from 3 on.
    assert loads_plain_pickle(pickle.dumps([b"x"], protocol=3)) == [b"x"]
    marker = str(tmp_path / "ran")
    with pytest.raises(ForbiddenPickleError, match=r"refers to the global os\.makedirs"):
        loads_plain_pickle(pickle.dumps([RunsCode(marker)]))
    assert not os.path.exists(marker)
    # Any class is refused, harmless or not.
    with pytest.raises(ForbiddenPickleError, match=r"collections\.OrderedDict"):
        loads_plain_pickle(pickle.dumps(collections.OrderedDict(a=1)))
    # ... and so is every builtin: a reader that let "builtins" through would run eval's code.
    for builtin, args in ((eval, (f"__import__('os').makedirs({marker!r})",)), (getattr, ("", "join"))):
        with pytest.raises(ForbiddenPickleError, match=rf"refers to the global builtins\.{builtin.__name__}"):
            loads_plain_pickle(pickle.dumps([_Calls(builtin, args)]))
    assert not os.path.exists(marker)


class _Calls:
    """Pickles as a call of ``function(*args)``."""

    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


_FORGED_MEMO = r"""
import importlib.util, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
spec = importlib.util.spec_from_file_location("safe_pickle", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
# PROTO 2, EMPTY_LIST, LONG_BINPUT 0xffffffff, STOP: the C unpickler sizes its memo array
# by the index (~64 GiB); a plain-data reader must not.
print(mod.loads_plain_pickle(b"\x80\x02]r\xff\xff\xff\xff."))
"""


def test_forged_memo_index_costs_no_memory():
    # In a 1 GiB subprocess that imports nothing but the module: a regression cannot take
    # pytest down with it.
    path = os.path.join(REPO_ROOT, "vipa_d2", "data", "safe_pickle.py")
    proc = subprocess.run(
        [sys.executable, "-c", _FORGED_MEMO, path], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]


# ------------------------------------------------------------------------- checkpoints
def _evil_checkpoint(path, marker):
    model = torch.nn.Linear(2, 2)
    torch.save({"model": model.state_dict(), "extra": RunsCode(marker)}, path)
    return model


def test_checkpoint_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    path, marker = str(tmp_path / "evil.pth"), str(tmp_path / "ran")
    model = _evil_checkpoint(path, marker)
    with pytest.raises(UntrustedCheckpointError) as e:
        WeightsOnlyCheckpointer(model).load(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(path + ": ")
    assert "os.makedirs" in message and "MODEL.WEIGHTS_TRUSTED" in message
    assert not os.path.exists(marker)
    # The predictor's loader refuses it the same way (as a WeightsError naming MODEL.WEIGHTS).
    with pytest.raises(WeightsError, match=r"MODEL.WEIGHTS=.*evil\.pth.*MODEL.WEIGHTS_TRUSTED"):
        load_weights(model, path)
    assert not os.path.exists(marker)

    # The documented opt-in: full pickle, which does run the file's code.
    WeightsOnlyCheckpointer(model, trusted=True).load(path)
    assert os.path.isdir(marker)


def test_a_file_that_is_no_checkpoint_is_not_sent_to_full_pickle(tmp_path):
    # A failed download's HTML page: unreadable as weights only and as full pickle alike, so
    # the error says what it is rather than suggesting MODEL.WEIGHTS_TRUSTED (tools review).
    path = tmp_path / "model_final.pth"
    path.write_bytes(b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n")
    with pytest.raises(WeightsError, match=r"cannot read the checkpoint \(UnpicklingError: neither a zip archive nor a "
                                           r"pickle \(Unsupported operand 60\)\); expected a file written by torch.save") as e:
        load_weights(torch.nn.Linear(2, 2), str(path))
    assert "WEIGHTS_TRUSTED" not in str(e.value)


def test_full_pickle_formats_need_the_opt_in(tmp_path):
    model = torch.nn.Linear(2, 2)
    for name in ("zoo.pkl", "pycls.pyth"):
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            pickle.dump({"model": {}}, f)
        with pytest.raises(
            UntrustedCheckpointError, match=r"\.pkl / \.pyth .*MODEL.WEIGHTS_TRUSTED"
        ):
            WeightsOnlyCheckpointer(model).load(path)


def test_trainer_state_round_trips_weights_only(tmp_path):
    # What the trainer checkpoints: model, optimizer (AdamW state), detectron2's scheduler,
    # iteration and hook state all load with weights_only=True.
    cfg = make_cfg("SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR", "SOLVER.MAX_ITER", "10")

    class Trainer:  # the state DefaultTrainer.state_dict() has
        def __init__(self, scheduler):
            self.scheduler, self.iteration = scheduler, 0

        def state_dict(self):
            return {
                "iteration": self.iteration,
                "hooks": {"LRScheduler": self.scheduler.state_dict()},
            }

        def load_state_dict(self, state):
            self.iteration = state["iteration"]
            self.scheduler.load_state_dict(state["hooks"]["LRScheduler"])

    def build():
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.99))
        scheduler = build_lr_scheduler(cfg, optimizer)
        return model, optimizer, scheduler, Trainer(scheduler)

    model, optimizer, scheduler, trainer = build()
    for _ in range(3):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    trainer.iteration = 3
    AtomicDetectionCheckpointer(model, str(tmp_path), optimizer=optimizer, trainer=trainer).save(
        "model_0000002"
    )

    model2, optimizer2, scheduler2, trainer2 = build()
    ckpt = AtomicDetectionCheckpointer(
        model2, str(tmp_path), optimizer=optimizer2, trainer=trainer2
    )
    ckpt.resume_or_load("", resume=True)
    assert trainer2.iteration == 3 and scheduler2.last_epoch == scheduler.last_epoch
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values())
    )
    state, state2 = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert all(torch.equal(state[k]["exp_avg"], state2[k]["exp_avg"]) for k in state)


def test_weights_trusted_is_a_documented_config_key():
    cfg = make_cfg()
    assert cfg.MODEL.WEIGHTS_TRUSTED is False
    with open(os.path.join(REPO_ROOT, "vipa_d2", "config.py")) as f:
        source = f.read()
    comment = source[: source.index("cfg.MODEL.WEIGHTS_TRUSTED")].rsplit("\n\n", 1)[-1]
    assert "weights_only" in comment and "trust" in comment


def test_backbone_weights_file_is_read_weights_only(tmp_path):
    from vipa_d2.modeling.backbone.weights import _read_checkpoint

    path, marker = str(tmp_path / "evil.pth"), str(tmp_path / "ran")
    _evil_checkpoint(path, marker)
    with pytest.raises(ValueError, match=r"MODEL.TIMM.WEIGHTS=.*evil\.pth.*weights-only"):
        _read_checkpoint(path)
    assert not os.path.exists(marker)
    # A plain state_dict still loads.
    torch.save({"model": torch.nn.Linear(2, 2).state_dict()}, path)
    assert set(_read_checkpoint(path)) == {"weight", "bias"}
