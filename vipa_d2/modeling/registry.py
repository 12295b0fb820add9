"""Looking up the module a config names in one of the registries (Detectron2's or ours)."""
from detectron2.utils.registry import Registry


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
