"""What a calibration run keeps in memory besides activations: the plan for a big model.

Read from what setup.py builds: the model's weights; with ``distill_weight`` > 0 a frozen copy
of them (the teacher); for every trainable parameter its gradient and AdamW's two moments (in
the parameter's dtype, as ``torch.optim.AdamW`` keeps them) and a float32 EMA shadow (ema.py).
``trainable="all"`` trains every parameter (the paper); ``"routers"`` only the routers.
Activations depend on the batch, the resolution and gradient checkpointing, and are not
counted: this is the floor a run needs, not its peak.

Example:
    >>> plan = memory_plan(params=10**9, router_params=10**6, weight_bytes=2)
    >>> round(plan["all"] / 2**30, 1), round(plan["routers"] / 2**30, 1)
    (11.2, 1.9)
"""

from __future__ import annotations

EMA_BYTES = 4  # the EMA shadow is float32 whatever the weights are (ema.py)


def memory_plan(
    params: int, router_params: int, weight_bytes: int = 2, teacher: bool = False
) -> dict[str, int]:
    """Bytes a calibration run holds for weights, teacher, gradients, AdamW and EMA.

    Args:
        params: parameters of the converted model (routers included).
        router_params: parameters of its routers.
        weight_bytes: bytes per parameter (2: bf16 or fp16 weights, 4: float32).
        teacher: a frozen copy of the weights to distil from (``distill_weight`` > 0).

    Returns:
        ``{"all": bytes, "routers": bytes}``, one per setting of ``trainable``.

    Example:
        >>> memory_plan(100, 10, weight_bytes=4)["routers"]  # 400 + 10 x (4 + 8 + 4)
        560
    """
    held = params * weight_bytes * (2 if teacher else 1)

    def train(n: int) -> int:  # gradient + AdamW's two moments, and the EMA shadow
        return n * 3 * weight_bytes + n * EMA_BYTES

    return {"all": held + train(params), "routers": held + train(router_params)}
