"""`train_net.py --eval-only` loads MODEL.WEIGHTS as strictly as the predictor and the demo:
one loader (vipa_d2.engine.checkpoint.load_weights) refuses a mismatch, listing the keys."""
import os

import pytest
import torch
from detectron2.modeling import build_model

from common import INSTANT_TEST_CONFIG, import_train_net, make_cfg, train_net_args
from vipa_d2 import VIPAPredictor
from vipa_d2.engine import AtomicDetectionCheckpointer, WeightsError, load_weights

train_net = import_train_net()
pytestmark = pytest.mark.usefixtures("single_thread", "synthetic_datasets_root")


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    """A checkpoint of the tiny model with one key missing and one unexpected key added."""
    cfg = make_cfg(config_file=INSTANT_TEST_CONFIG)
    folder = tmp_path_factory.mktemp("weights")
    AtomicDetectionCheckpointer(build_model(cfg), str(folder)).save("good")
    checkpoint = torch.load(folder / "good.pth", map_location="cpu", weights_only=True)
    missing = next(k for k in checkpoint["model"] if k.startswith("head.transformer_decoder."))
    del checkpoint["model"][missing]
    checkpoint["model"]["head.veg.unused.weight"] = torch.zeros(1)
    torch.save(checkpoint, folder / "bad.pth")
    return str(folder / "bad.pth"), missing, cfg


def _eval_only(output_dir, *flags, opts=()):
    return train_net.main(train_net_args(output_dir, "--eval-only", *flags, opts=opts))


def test_eval_only_refuses_a_mismatched_checkpoint_like_the_predictor(mismatched, tmp_path):
    bad, missing, cfg = mismatched
    with pytest.raises(WeightsError) as from_eval:
        _eval_only(tmp_path / "eval", opts=["MODEL.WEIGHTS", bad])
    message = str(from_eval.value)
    assert "bad.pth" in message and missing in message and "head.veg.unused.weight" in message
    assert "1 missing keys" in message and "1 unexpected keys" in message
    cfg = cfg.clone()
    cfg.MODEL.WEIGHTS = bad
    with pytest.raises(WeightsError) as from_predictor:
        VIPAPredictor(cfg)
    assert str(from_predictor.value) == message


def test_eval_only_resume_loads_the_recorded_checkpoint_strictly(mismatched, tmp_path):
    bad, missing, _ = mismatched
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(bad, out / "model_0000009.pth")
    (out / "last_checkpoint").write_text("model_0000009.pth")
    # --resume: the recorded checkpoint wins over MODEL.WEIGHTS (Detectron2's rule), strictly.
    with pytest.raises(WeightsError, match=f"model_0000009.pth.*{missing}"):
        _eval_only(out, "--resume")


def _shifted(state):
    """``state`` with every float tensor moved by 1: a load, even half of one, shows."""
    return {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}


def test_a_refused_file_leaves_the_model_as_it_was_and_ddp_names_load(mismatched, tmp_path):
    # The docstring's promise (checked before any weight is copied) and the "module." prefix
    # of files saved from DDP: neither was tested (test review, session 53).
    bad, _, cfg = mismatched
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = torch.load(bad, map_location="cpu", weights_only=True)
    torch.save({**checkpoint, "model": _shifted(checkpoint["model"])}, tmp_path / "bad_shifted.pth")
    with pytest.raises(WeightsError, match="does not match the model"):
        load_weights(model, str(tmp_path / "bad_shifted.pth"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    good = _shifted(model.state_dict())
    torch.save({"model": {"module." + k: v for k, v in good.items()}}, tmp_path / "from_ddp.pth")
    load_weights(model, str(tmp_path / "from_ddp.pth"))
    assert all(torch.equal(good[k], v) for k, v in model.state_dict().items())


def test_a_file_that_holds_no_weights_is_refused_naming_it(mismatched, tmp_path):
    # Session 42's bad-input review: these gave AttributeError from deep in the loader, or
    # "cannot read the checkpoint: " with nothing after it.
    model = build_model(mismatched[2])
    torch.save([1, 2], tmp_path / "list.pth")
    torch.save({"model": [1, 2]}, tmp_path / "model_list.pth")
    torch.save({"model": {3: torch.zeros(1)}}, tmp_path / "int_keys.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    cases = {
        "list.pth": r"weights as a mapping of parameter names to tensors \(under 'model'\), got \[1, 2\]",
        "model_list.pth": r"got \[1, 2\]",
        "int_keys.pth": r"got \{3: tensor",
        "empty.pth": r"cannot read the checkpoint \(EOFError\); expected a file written by torch.save",
    }
    for name, pattern in cases.items():
        with pytest.raises(WeightsError, match=f"MODEL.WEIGHTS=.*{name}: .*{pattern}"):
            load_weights(model, str(tmp_path / name))


def test_training_refuses_weights_of_which_nothing_matches(mismatched, tmp_path):
    # Training loads MODEL.WEIGHTS leniently (fine-tuning from part of a model), but a file
    # none of whose names the model has would leave it all at random, exit 0, and say so
    # only in ~300 warning lines.
    good = torch.load(os.path.join(os.path.dirname(mismatched[0]), "good.pth"), map_location="cpu", weights_only=True)
    torch.save({"model": {"detector." + k: v for k, v in good["model"].items()}}, tmp_path / "other.pth")
    model = build_model(mismatched[2])
    # What DefaultTrainer.resume_or_load calls with MODEL.WEIGHTS, on the trainer's checkpointer.
    with pytest.raises(WeightsError, match=r"other\.pth: none of its \d+ weights loaded into the model .*detector\.backbone\."):
        AtomicDetectionCheckpointer(model).resume_or_load(str(tmp_path / "other.pth"), resume=False)
    # Part of the model (here its backbone) still loads, as for fine-tuning.
    part = {k: v for k, v in good["model"].items() if k.startswith("backbone.")}
    torch.save({"model": part}, tmp_path / "backbone.pth")
    AtomicDetectionCheckpointer(model).resume_or_load(str(tmp_path / "backbone.pth"), resume=False)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in part.items())


def test_fine_tuning_from_a_part_of_a_model_keeps_the_other_encoder_pretrained(mismatched, tmp_path):
    # Helper review (session 46): with MODEL.WEIGHTS set, both encoders were built for the
    # checkpoint to fill, so a backbone-only file left the text encoder at random.
    cfg = mismatched[2].clone()
    cfg.MODEL.TIMM.WEIGHTS = "bundled"
    pretrained = build_model(cfg).state_dict()
    for part, other in (("backbone.", "text_encoder."), ("text_encoder.", "backbone.")):
        weights = {k: v + 1 for k, v in pretrained.items() if k.startswith(part) and v.is_floating_point()}
        path = str(tmp_path / f"{part}pth")
        torch.save({"model": weights}, path)
        cfg.MODEL.WEIGHTS = path
        model = build_model(cfg)
        AtomicDetectionCheckpointer(model).resume_or_load(path, resume=False)  # as the trainer does
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in weights.items()), part
        kept = [k for k in pretrained if k.startswith(other)]
        assert kept and all(torch.equal(loaded[k], pretrained[k]) for k in kept), other
