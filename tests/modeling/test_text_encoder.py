"""Text encoder and tokenizer, with the bundled MiniLM weights."""
import pytest
import torch
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

from common import make_cfg
from vipa_d2 import ConfigError
from vipa_d2.modeling.text_encoder import TextEncoder, build_tokenizer, resolve_text_encoder_path, tokenize

# Tiny random encoders of the families MODEL.TEXT_ENCODER.NAME may name, over the bundled
# MiniLM vocabulary (its tokenizer is saved next to them). Only BERT and RoBERTa have a pooler.
TINY_ENCODERS = {
    "bert": lambda vocab: BertModel(BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )),
    "distilbert": lambda vocab: DistilBertModel(DistilBertConfig(
        vocab_size=vocab, dim=32, n_layers=1, n_heads=2, hidden_dim=64
    )),
    # pad_token_id: RoBERTa numbers positions after the padding id, here MiniLM's 0.
    "roberta": lambda vocab: RobertaModel(RobertaConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        pad_token_id=0,
    )),
}


@pytest.fixture(scope="module")
def cfg():
    return make_cfg()


@pytest.fixture(scope="module")
def tokenizer(cfg):
    return build_tokenizer(cfg)


def test_truncation_keeps_cls_and_sep(tokenizer):
    long = "the small red circle to the left of the second blue square near the top " * 4
    enc = tokenize(tokenizer, [long, "cat"], max_len=12)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == (2, 12) and ids.dtype == torch.int64 and mask.dtype == torch.int64
    assert ids[0, 0] == tokenizer.cls_token_id and ids[0, -1] == tokenizer.sep_token_id
    assert mask[0].all()
    # Short expression: [CLS] cat [SEP] then padding, marked 0 in the attention mask.
    n = int(mask[1].sum())
    assert n == 3 and ids[1, n - 1] == tokenizer.sep_token_id
    assert (ids[1, n:] == tokenizer.pad_token_id).all() and (mask[1, n:] == 0).all()


def test_empty_expression_rejected(tokenizer):
    with pytest.raises(ValueError, match="non-empty"):
        tokenize(tokenizer, ["  "], max_len=8)


def test_encoder_shapes_follow_model(cfg, tokenizer):
    enc_model = TextEncoder(cfg).eval()
    assert enc_model.hidden_size == enc_model.model.config.hidden_size
    enc = tokenize(tokenizer, ["the red star", "a green square on the left"], max_len=10)
    with torch.no_grad():
        out = enc_model(**enc)
    assert out.shape == (2, 10, enc_model.hidden_size)
    assert torch.isfinite(out).all()
    # Padding does not leak into real tokens: the same sentence padded differently agrees.
    short = tokenize(tokenizer, ["the red star"], max_len=6)
    with torch.no_grad():
        out_short = enc_model(**short)
    n = int(short["attention_mask"].sum())
    torch.testing.assert_close(out_short[0, :n], out[0, :n], rtol=1e-4, atol=1e-4)


def test_path_resolution_errors(tmp_path):
    assert resolve_text_encoder_path("bert-base-uncased") == "bert-base-uncased"
    with pytest.raises(FileNotFoundError, match="not a directory"):
        resolve_text_encoder_path(str(tmp_path / "missing_model"))


def test_freeze_embeddings_trains_the_layers_only(cfg):
    c = cfg.clone()
    c.MODEL.TEXT_ENCODER.FREEZE_EMBEDDINGS = True
    enc = TextEncoder(c)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and not any(".embeddings." in n for n in trainable)
    assert all(not p.requires_grad for p in enc.model.embeddings.parameters())
    assert any(".encoder.layer." in n for n in trainable)


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_encoder_has_no_dropout_in_training(cfg, tokenizer, freeze):
    # Frozen: a fixed feature extractor, the same features for the same words at every step.
    c = cfg.clone()
    c.MODEL.TEXT_ENCODER.FREEZE = freeze
    enc = TextEncoder(c).train()
    tokens = tokenize(tokenizer, ["the small red circle"], c.INPUT.MAX_TEXT_LEN)
    with torch.no_grad():
        first, second = (enc(tokens["input_ids"], tokens["attention_mask"]) for _ in range(2))
    assert enc.training and torch.equal(first, second) == freeze


@pytest.mark.parametrize("family", sorted(TINY_ENCODERS))
def test_other_encoder_families(cfg, tokenizer, tmp_path, family):
    TINY_ENCODERS[family](tokenizer.vocab_size).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    c = cfg.clone()
    c.MODEL.TEXT_ENCODER.NAME = str(tmp_path)
    c.MODEL.TEXT_ENCODER.FREEZE_EMBEDDINGS = True
    enc = TextEncoder(c).eval()
    names = [n for n, _ in enc.named_parameters()]
    assert not any("pooler" in n for n in names)  # only the token features are used
    embeddings = [p for n, p in enc.named_parameters() if ".embeddings." in n]
    assert embeddings and not any(p.requires_grad for p in embeddings)
    tokens = tokenize(tokenizer, ["the red star"], max_len=6)
    with torch.no_grad():
        assert enc(**tokens).shape == (1, 6, 32)
    # Rebuilt from its own files, as from a checkpoint: the same parameters.
    rebuilt = TextEncoder(name=c.MODEL.TEXT_ENCODER.NAME, files=enc.files)
    assert [n for n, _ in rebuilt.named_parameters()] == names


def test_name_without_weights_is_a_config_error(cfg, tokenizer, tmp_path):
    TINY_ENCODERS["bert"](tokenizer.vocab_size).config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    c = cfg.clone()
    c.MODEL.TEXT_ENCODER.NAME = str(tmp_path)
    with pytest.raises(ConfigError, match=rf"MODEL\.TEXT_ENCODER\.NAME='{tmp_path}'.*model\.safetensors") as e:
        TextEncoder(c)
    # A hub name not in the cache (the suite is offline): transformers says it on two lines,
    # train_net.py prints the ConfigError's on one.
    c.MODEL.TEXT_ENCODER.NAME = "no-such-encoder-of-the-hub"
    with pytest.raises(ConfigError, match=r"MODEL\.TEXT_ENCODER\.NAME='no-such-encoder-of-the-hub'") as e:
        TextEncoder(c)
    assert "\n" not in str(e.value)
