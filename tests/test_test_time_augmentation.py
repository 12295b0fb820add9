"""vipa_d2/engine/test_time_augmentation.py: the flip view swaps left/right words, its maps
come back unflipped, and its refusals (train_net.py's TTA runs are in test_train_net.py)."""
import copy

import pytest
import torch

from detectron2.evaluation.evaluator import inference_context

from common import PREDICTOR_OPTS, TINY_CONFIG, make_cfg
from vipa_d2.data.eval_resolution import build_test_mapper
from vipa_d2.engine import VIPAWithTTA
from vipa_d2.engine.test_time_augmentation import average_views
from vipa_d2.modeling.meta_arch import REF_SEG_BEFORE_VETO
from vipa_d2.modeling.text_encoder import tokenize
from vipa_d2.predictor import VIPAPredictor

pytestmark = pytest.mark.usefixtures("single_thread")
SENTENCE = "the leftmost circle, left of the star"
SWAPPED = "the rightmost circle, right of the star"


@pytest.fixture(scope="module")
def tta_inputs(predictor, records):
    """The TTA model of the random predictor and two test-mode inputs, one naming a side."""
    tta = VIPAWithTTA(predictor.cfg, predictor.model).eval()
    mapper = build_test_mapper(predictor.cfg)
    sided = copy.deepcopy(records[0])
    sided["sentence"] = {**sided["sentence"], "raw": SENTENCE}
    return tta, [mapper(sided), mapper(records[1])]


def test_flipped_view_mirrors_the_image_and_swaps_side_words(tta_inputs, predictor):
    tta, inputs = tta_inputs
    view = tta.flipped(inputs[0])
    assert view["sentence"] == SWAPPED
    assert torch.equal(view["image"], inputs[0]["image"].flip(-1))
    expected = tokenize(predictor.tokenizer, [SWAPPED], predictor.cfg.INPUT.MAX_TEXT_LEN)
    assert torch.equal(view["input_ids"], expected["input_ids"][0])
    assert torch.equal(view["attention_mask"], expected["attention_mask"][0])
    assert not torch.equal(view["input_ids"], inputs[0]["input_ids"])


def test_outputs_are_flip_symmetric_means(tta_inputs, predictor):
    tta, inputs = tta_inputs
    with torch.no_grad():
        as_given = tta(inputs)
        mirrored = tta([tta.flipped(x) for x in inputs])
        plain = predictor.model(inputs)
    for a, b, p, x in zip(as_given, mirrored, plain, inputs):
        # The mean of a view and its mirror is the same for the mirrored input, flipped:
        # only if each view's maps are flipped back before averaging.
        for key in ("ref_seg", "relevance"):
            assert a[key].shape == (x["height"], x["width"])
            torch.testing.assert_close(a[key], b[key].flip(-1), rtol=0, atol=1e-5)
        torch.testing.assert_close(a["no_target_score"], b["no_target_score"], rtol=0, atol=1e-6)
        assert not torch.allclose(a["ref_seg"], p["ref_seg"])  # the flipped view counts
        # The retrieved tokens stay those of the view as given.
        assert torch.equal(a["retrieved"], p["retrieved"])


def test_an_evaluation_through_the_wrapper_leaves_the_model_in_its_mode(predictor):
    # A new wrapper was in training mode, which Detectron2's inference_context restores on
    # it, and so on the model it wraps (GPU review, session 59).
    tta = VIPAWithTTA(predictor.cfg, predictor.model)
    try:
        with inference_context(tta):
            pass
        assert not tta.training and not predictor.model.training
    finally:
        predictor.model.eval()


def test_predictor_averages_the_views_as_evaluation_does(tta_inputs, predictor, records):
    tta, inputs = tta_inputs
    flipping = VIPAPredictor(make_cfg(*PREDICTOR_OPTS, "TEST.AUG.ENABLED", "True", config_file=TINY_CONFIG))
    flipping.model.load_state_dict(predictor.model.state_dict())
    with torch.no_grad():
        expected = tta(inputs[:1])[0]
    got = flipping(records[0]["file_name"], SENTENCE)
    plain = predictor(records[0]["file_name"], SENTENCE)
    torch.testing.assert_close(torch.from_numpy(got["prob"]), expected["ref_seg"], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(got["relevance"]), expected["relevance"], rtol=0, atol=1e-6)
    assert got["no_target_score"] == pytest.approx(float(expected["no_target_score"]), abs=1e-6)
    assert (got["mask"] == (got["prob"] > predictor.mask_threshold)).all()
    assert not (got["prob"] == plain["prob"]).all()  # the mirrored view counts
    # The retrieved tokens are those of the image as given.
    for cue, plain_cue in zip(got["retrieved"], plain["retrieved"]):
        assert cue["word"] == plain_cue["word"] and (cue["tokens"] == plain_cue["tokens"]).all()


@pytest.mark.parametrize("flipped_score,vetoed", [(0.3, False), (0.7, True)])
def test_one_no_target_verdict_on_the_mean_score(flipped_score, vetoed):
    # The model empties a vetoed view's mask (keeping it as ref_seg_before_veto); averaging
    # the emptied mask would halve the other view's, so the views' probabilities before
    # any verdict are averaged and the verdict is taken again on the mean score.
    a, b = torch.rand(3, 5), torch.rand(3, 5)
    given = {"ref_seg": torch.zeros(3, 5), REF_SEG_BEFORE_VETO: a, "relevance": a, "no_target_score": torch.tensor(0.6)}
    flipped = {"ref_seg": b, "relevance": b, "no_target_score": torch.tensor(flipped_score)}
    merged = average_views(given, flipped, no_target_threshold=0.5)
    mean = (a + b.flip(-1)) / 2
    torch.testing.assert_close(merged["relevance"], mean)
    if vetoed:
        assert not merged["ref_seg"].any()
        torch.testing.assert_close(merged[REF_SEG_BEFORE_VETO], mean)
    else:
        torch.testing.assert_close(merged["ref_seg"], mean)
        assert REF_SEG_BEFORE_VETO not in merged


@pytest.mark.parametrize("build", [lambda cfg, model: VIPAWithTTA(cfg, model), lambda cfg, model: VIPAPredictor(cfg)])
def test_tta_needs_the_flip(predictor, build):
    cfg = make_cfg(*PREDICTOR_OPTS, "TEST.AUG.ENABLED", "True", "TEST.AUG.FLIP", "False", config_file=TINY_CONFIG)
    with pytest.raises(ValueError, match="TEST.AUG.FLIP True"):
        build(cfg, predictor.model)
