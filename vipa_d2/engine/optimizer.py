"""Optimizer for VIPA: AdamW/SGD with per-encoder lr multipliers and no decay on norms,
biases and embeddings."""
import logging

import torch
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import reduce_param_groups

from .gradient_clipping import with_gradient_clipping

logger = logging.getLogger(__name__)

# SOLVER.OPTIMIZER's names (read case-blind).
OPTIMIZERS = ("ADAMW", "SGD")
# Parameter-name prefixes of the two pretrained encoders inside the VIPA meta-architecture.
BACKBONE_PREFIX = "backbone."
TEXT_ENCODER_PREFIX = "text_encoder."


def lr_multiplier(cfg, param_name: str) -> float:
    """Learning-rate factor of a parameter: by the encoder its full name belongs to, times
    SOLVER.BIAS_LR_FACTOR for a bias. (detectron2's own ``bias_lr_factor`` would set a
    bias's lr to BASE_LR x factor, dropping the encoder's multiplier.)"""
    factor = cfg.SOLVER.BIAS_LR_FACTOR if param_name.rsplit(".", 1)[-1] == "bias" else 1.0
    if param_name.startswith(BACKBONE_PREFIX):
        return cfg.MODEL.TIMM.LR_MULTIPLIER * factor
    if param_name.startswith(TEXT_ENCODER_PREFIX):
        return cfg.MODEL.TEXT_ENCODER.LR_MULTIPLIER * factor
    return factor


def embedding_parameters(model: torch.nn.Module) -> set:
    """Token/position embeddings: ``nn.Embedding`` weights, bare parameters named ``*embed*``,
    and the parameters a submodule lists in its ``no_weight_decay()`` (timm's convention,
    names relative to it: the backbone's Swin relative position bias tables)."""
    found = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.Embedding) or "embed" in name:
                found.add(param)
        listed = module.no_weight_decay() if callable(getattr(module, "no_weight_decay", None)) else ()
        found.update(param for name, param in module.named_parameters() if name in listed)
    return found


def get_vipa_optimizer_params(cfg, model: torch.nn.Module):
    """
    Param groups: lr = SOLVER.BASE_LR x (MODEL.TIMM.LR_MULTIPLIER for ``backbone.*``,
    MODEL.TEXT_ENCODER.LR_MULTIPLIER for ``text_encoder.*``); weight decay SOLVER.WEIGHT_DECAY
    except SOLVER.WEIGHT_DECAY_NORM on normalization layers, SOLVER.WEIGHT_DECAY_BIAS on biases
    (None: as weights, as in detectron2; Base-VIPA sets 0) and SOLVER.WEIGHT_DECAY_EMBED
    on embeddings (:func:`embedding_parameters`); a bias's lr is also scaled by
    SOLVER.BIAS_LR_FACTOR. Frozen parameters are left out.
    """
    groups = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        lr_factor_func=lambda name: lr_multiplier(cfg, name),
    )
    # detectron2 recognises norms by module type and biases by name but has no notion of
    # embeddings (their local name is just "weight"), so split those out here.
    embeddings = embedding_parameters(model)
    split = []
    for group in groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        for param in group["params"]:
            if param in embeddings:
                split.append({**hyper, "params": [param], "weight_decay": cfg.SOLVER.WEIGHT_DECAY_EMBED})
            else:
                split.append({**hyper, "params": [param]})
    return reduce_param_groups(split)


def build_vipa_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` ("ADAMW" or "SGD") over :func:`get_vipa_optimizer_params`,
    with detectron2's ``SOLVER.CLIP_GRADIENTS`` (per parameter, batched: gradient_clipping.py)."""
    params = get_vipa_optimizer_params(cfg, model)
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optimizer = with_gradient_clipping(cfg, torch.optim.AdamW)(
            params,
            lr=cfg.SOLVER.BASE_LR,
            betas=tuple(cfg.SOLVER.BETAS),
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
    elif name == "SGD":
        optimizer = with_gradient_clipping(cfg, torch.optim.SGD)(
            params,
            lr=cfg.SOLVER.BASE_LR,
            momentum=cfg.SOLVER.MOMENTUM,
            nesterov=cfg.SOLVER.NESTEROV,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}, got {cfg.SOLVER.OPTIMIZER!r}")
    n_params = sum(p.numel() for g in params for p in g["params"])
    logger.info(f"{name} over {len(params)} param groups, {n_params} trainable parameters")
    return optimizer
