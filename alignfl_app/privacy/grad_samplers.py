"""Opacus extensions: per-sample gradients of the layers Opacus has no fast rule for (registered on import)."""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn


@register_grad_sampler(nn.ConvTranspose2d)
def conv_transpose2d_grad_sample(
    layer: nn.ConvTranspose2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a ConvTranspose2d (Opacus has none; its functorch fallback is slow).

    ``dW[ci, co, a, b] = sum_p x[ci, p] * g[co, s p - pad + (a, b)]``: unfold the output gradient with the
    layer's kernel, stride and padding, then one batched matmul with the input.
    """
    if layer.groups != 1 or layer.dilation != (1, 1) or layer.output_padding != (0, 0):
        raise NotImplementedError("DP supports ConvTranspose2d with groups=1, dilation=1, output_padding=0 only")
    x = activations[0].to(backprops.dtype)
    n, cin = x.shape[:2]
    cout, (kh, kw) = layer.out_channels, layer.kernel_size
    cols = nn.functional.unfold(backprops, (kh, kw), padding=layer.padding, stride=layer.stride)
    ret = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = torch.bmm(x.reshape(n, cin, -1), cols.transpose(1, 2)).view(n, cin, cout, kh, kw)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum(dim=(2, 3))
    return ret
