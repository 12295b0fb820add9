"""vipa_d2/engine/test_time_augmentation.py: the flip view swaps left/right words, its maps
come back unflipped, and its refusals (train_net.py's TTA runs are in test_train_net.py)."""
import copy

import pytest
import torch

from common import TINY_CONFIG, make_cfg
from vipa_d2.data.eval_resolution import build_test_mapper
from vipa_d2.engine import VIPAWithTTA
from vipa_d2.modeling.text_encoder import tokenize

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


def test_tta_needs_the_flip(predictor):
    cfg = make_cfg("TEST.AUG.FLIP", "False", config_file=TINY_CONFIG)
    with pytest.raises(ValueError, match="TEST.AUG.FLIP True"):
        VIPAWithTTA(cfg, predictor.model)
