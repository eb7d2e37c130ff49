"""Helpers for tests/test_models_*.py: cheap random materialisation of real-size models."""
import math

import torch

_POOL = {}


def _pool(dtype):
    if dtype not in _POOL:
        g = torch.Generator().manual_seed(1234)
        _POOL[dtype] = torch.randn(1 << 22, generator=g).to(dtype)
    return _POOL[dtype]


def materialise(module, dtype=torch.bfloat16, salt=0):
    """meta -> CPU, filling every float tensor with distinct pseudo-random values
    (slices of one random pool at varying offsets, scaled by 1/sqrt(fan_in)); fast."""
    module.to_empty(device="cpu")
    torch.nn.Module.to(module, dtype=dtype)
    pool = _pool(dtype)
    P = pool.numel()
    with torch.no_grad():
        for i, (name, t) in enumerate(sorted(module.state_dict(keep_vars=True).items())):
            if name.endswith("position_ids"):
                t.copy_(torch.arange(t.shape[-1]).expand_as(t))
                continue
            if not t.is_floating_point():
                continue
            n = t.numel()
            off = (i * 7919 + salt * 104729) % P
            flat = t.view(-1)
            done = 0
            while done < n:
                take = min(n - done, P - off)
                flat[done:done + take].copy_(pool[off:off + take])
                done += take
                off = (off + take * 31 + 17) % P
            if t.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                t.mul_(0.1).add_(1.0)
            else:
                fan_in = math.prod(t.shape[1:]) if t.ndim > 1 else 1
                t.mul_(1.0 / math.sqrt(fan_in) if t.ndim > 1 else 0.02)
    # buffers registered as non-persistent (position_ids) are not in state_dict in new transformers
    for name, b in module.named_buffers():
        if name.endswith("position_ids"):
            b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    module.eval()
    return module
