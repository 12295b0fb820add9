"""
Detectron2's ``SOLVER.CLIP_GRADIENTS`` ("value" / "norm", each parameter on its own), done
in one batched pass over all gradients.

Detectron2 calls torch's clipper once per parameter. For the tiny VIPA's 408 trainable
tensors that is ~10,600 aten ops a step (2,900 batched): 25 ms of CPU time (8 batched), and
on a GPU roughly 2,000 of the ~10,600 kernel launches of a launch-bound step (an estimate;
BENCHMARKS.md, section 3). The same per-parameter arithmetic applied to all gradients at
once gives bitwise the same gradients (tests/test_gradient_clipping.py), so training is
unchanged.
"""
from typing import Dict, Iterable, List, Tuple, Type

import torch

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing; kept for equality.
NORM_EPS = 1e-6
CLIP_TYPES = ("value", "norm")
# Devices with torch foreach kernels; gradients elsewhere go one tensor at a time.
FOREACH_DEVICES = ("cpu", "cuda")


def _check_clip_type(clip_type: str) -> None:
    if clip_type not in CLIP_TYPES:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be one of {CLIP_TYPES}, got {clip_type!r}")


def _by_device_and_dtype(grads: Iterable[torch.Tensor]) -> List[List[torch.Tensor]]:
    groups: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    return list(groups.values())


@torch.no_grad()
def clip_each_gradient_(
    parameters: Iterable[torch.Tensor], clip_type: str, clip_value: float, norm_type: float = 2.0
) -> None:
    """
    In place, for every parameter with a gradient: "value" clamps it to
    ``[-clip_value, clip_value]``; "norm" scales it to a ``norm_type``-norm of at most
    ``clip_value`` (each parameter's norm on its own, as detectron2's per-parameter clipper).
    """
    _check_clip_type(clip_type)
    grads = [p.grad for p in parameters if p.grad is not None]
    for group in _by_device_and_dtype(grads):
        foreach = group[0].device.type in FOREACH_DEVICES  # one device per group
        if clip_type == "norm":
            _scale_to_norm(group, clip_value, norm_type, foreach)
        elif foreach:
            torch._foreach_clamp_min_(group, -clip_value)
            torch._foreach_clamp_max_(group, clip_value)
        else:
            for g in group:
                g.clamp_(-clip_value, clip_value)


def _scale_to_norm(grads: List[torch.Tensor], max_norm: float, norm_type: float, foreach: bool) -> None:
    if foreach:
        norms = torch.stack(torch._foreach_norm(grads, norm_type))
    else:
        norms = torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads])
    # clip_grad_norm_ of one tensor takes the norm of the one-element vector of its norms;
    # doing the same (one row per parameter) keeps the result bitwise torch's.
    totals = torch.linalg.vector_norm(norms.unsqueeze(1), norm_type, dim=1)
    coefs = torch.clamp(max_norm / (totals + NORM_EPS), max=1.0)
    if foreach:
        torch._foreach_mul_(grads, list(coefs.unbind(0)))
    else:
        for g, c in zip(grads, coefs.unbind(0)):
            g.mul_(c)


def with_gradient_clipping(cfg, optimizer_type: Type[torch.optim.Optimizer]) -> Type[torch.optim.Optimizer]:
    """
    ``optimizer_type`` itself when ``SOLVER.CLIP_GRADIENTS.ENABLED`` is off, else a subclass
    whose ``step`` first clips every parameter's gradient by ``SOLVER.CLIP_GRADIENTS``
    (what detectron2's ``maybe_add_gradient_clipping`` does, batched).
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return optimizer_type
    clip_type, clip_value, norm_type = clip.CLIP_TYPE, float(clip.CLIP_VALUE), float(clip.NORM_TYPE)
    _check_clip_type(clip_type)

    def step(self, closure=None):
        clip_each_gradient_(
            (p for group in self.param_groups for p in group["params"]), clip_type, clip_value, norm_type
        )
        return optimizer_type.step(self, closure)

    return type(f"{optimizer_type.__name__}WithGradientClip", (optimizer_type,), {"step": step})


__all__ = ["clip_each_gradient_", "with_gradient_clipping"]
