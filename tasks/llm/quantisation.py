"""Int8 matrix products that keep each row to itself, for Gemma on CPUs without native bfloat16.

There Gemma's float32 linear layers are bound by arithmetic when they read many tokens (the
judge, a prompt's prefill) and by reading 400 MB of weights per step when they read few
(decoding). Int8 (FBGEMM, on any x86-64 with AVX2) doubles the first's throughput and quarters
the second's traffic. torch's dynamic quantisation scales the activations by the whole batch,
so one outlier token coarsens every other and a row's result depends on its batch mates; here
each row of activations is scaled by its own peak and each row of weights by its own. Against
float32 on the judge's scores (NIST chunks, 8 questions x 10 candidates) the mean Spearman
correlation per query is 0.95; an earlier measurement of per-batch scaling, on a draw of its
own, gave 0.43 (BENCHMARKS.md).

Bits: 8 for activations, 7 for weights. AVX2's int8 product adds pairs of u8 x s8 products in
16 bits, which saturate unless 2 x 255 x 63 < 2^15; of the two operands, the activations (with
Gemma's outlier channels) need the finer grid more than the weights, which were 4- and 6-bit in
the GGUF to begin with.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

#: Quantisation levels on each side of zero.
ACTIVATION_LEVELS = 127
WEIGHT_LEVELS = 63
#: quint8's zero point for activations scaled to [-1, 1]: 128 +- 127 fills 1..255.
_ZERO_POINT = 128


def available() -> bool:
    """Whether FBGEMM, torch's x86 int8 library, serves this CPU (any x86-64 with AVX2)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def pack(weight: torch.Tensor) -> Any:
    """FBGEMM's packed int8 copy of a (out, in) weight, one scale per output row."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=1) / WEIGHT_LEVELS).clamp(min=1e-12).double()
    zeros = torch.zeros(len(weight), dtype=torch.long)
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        with warnings.catch_warnings():
            # torch 2.13 marks the quantised tensor types deprecated; they still work, and their
            # replacement (torchao) is not one of this project's dependencies.
            warnings.simplefilter("ignore")
            quantised = torch.quantize_per_channel(weight, scales, zeros, 0, torch.qint8)
            return torch.ops.quantized.linear_prepack(quantised, None)
    finally:
        torch.backends.quantized.engine = previous


def product(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """x @ weight.T in int8 with float32 output, each row of `x` scaled by its own peak, so a
    row's result is the same alone or in any batch."""
    rows = x.reshape(-1, x.shape[-1]).float()
    peak = torch.linalg.vector_norm(rows, float("inf"), dim=-1, keepdim=True).clamp(min=1e-12)
    out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        (rows / peak).contiguous(), 1 / ACTIVATION_LEVELS, _ZERO_POINT, packed
    )
    return (out * peak).reshape(*x.shape[:-1], -1)


class Int8Linear(torch.nn.Module):
    """A linear layer computing through `product`; its float32 weights are not kept."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = pack(linear.weight)
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = product(x, self.packed)
        return out if self.bias is None else out + self.bias


def int8_linear_layers(model: torch.nn.Module, keep: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace, in place, every `torch.nn.Linear` of `model` not named in `keep` by an
    `Int8Linear`; the number replaced."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name not in keep:
                setattr(module, name, Int8Linear(child))
                replaced += 1
    return replaced
