"""Whether ``MODEL.DEVICE`` names a device this machine has: said in one line naming the key
before a model is built or a rank started, not as torch's error from inside ``model.to``."""
import torch

from ..errors import ConfigError


def check_device(device: str, processes: int = 1) -> None:
    """
    ConfigError unless ``device`` parses and this machine has it for ``processes`` ranks
    (``--num-gpus``). Launched CUDA ranks each take their own GPU (Detectron2's ``launch``
    makes GPU ``local_rank`` the current one), so several need ``"cuda"`` without an index
    and as many GPUs as ranks. Device types other than CUDA and MPS are left to torch.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:  # torch's message names no key
        raise ConfigError(f"MODEL.DEVICE={device!r} is not a device: expected e.g. 'cpu' or 'cuda'") from e
    if parsed.type == "cuda":
        # The paper configs keep Detectron2's default device, "cuda": on a machine without
        # a GPU that was torch's "Found no NVIDIA driver" from inside.
        if not torch.cuda.is_available():
            raise ConfigError(f"MODEL.DEVICE={device!r}, but torch finds no CUDA GPU here; set MODEL.DEVICE cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"MODEL.DEVICE={device!r}, but torch finds {count} CUDA GPU(s) here, "
                              f"cuda:0 to cuda:{count - 1}")
        if processes > 1 and parsed.index is not None:
            raise ConfigError(f"MODEL.DEVICE={device!r} with --num-gpus {processes}: each rank takes its own GPU, "
                              "so name none; set MODEL.DEVICE cuda")
        if processes > count:
            raise ConfigError(f"--num-gpus {processes} with MODEL.DEVICE={device!r}, but torch finds {count} CUDA "
                              "GPU(s) on this machine")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"MODEL.DEVICE={device!r}, but torch finds no MPS device (an Apple GPU) here; "
                          "set MODEL.DEVICE cpu")
