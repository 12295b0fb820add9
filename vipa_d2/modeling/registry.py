"""Looking up the module a config names in one of the registries (Detectron2's or ours),
and naming what a registered backbone outputs."""
from typing import Dict

from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry

# The key that picks the outputs of the backbones a VIPA config is likely to name.
BACKBONE_OUTPUT_KEYS = {
    "VIPATimmBackbone": "MODEL.TIMM.OUT_FEATURES",
    "build_resnet_backbone": "MODEL.RESNETS.OUT_FEATURES",
}


def get_registered(registry: Registry, name: str, key: str):
    """
    ``registry``'s entry ``name``; ValueError naming the config ``key`` and what the registry
    holds when there is none (the registry's own KeyError names neither, and a module of
    one's own is most often missing because the file registering it was not imported).
    """
    if name not in registry:
        held = sorted(entry for entry, _ in registry)
        raise ValueError(
            f"{key} {name!r} is not in the {registry._name} registry (it holds {held}): register your module with "
            f"@{registry._name}_REGISTRY.register() in a file that is imported before the model is built"
        )
    return registry.get(name)


def backbone_outputs(cfg, input_shape: Dict[str, ShapeSpec]) -> str:
    """What the config's backbone outputs and the key that sets them, for a message naming a
    feature it lacks (the timm key said for a Detectron2 ResNet misled: extension review,
    session 60)."""
    name = cfg.MODEL.BACKBONE.NAME
    key = BACKBONE_OUTPUT_KEYS.get(name, "the backbone's own key")
    return f"MODEL.BACKBONE.NAME={name!r} outputs {sorted(input_shape)}, set by {key}"
