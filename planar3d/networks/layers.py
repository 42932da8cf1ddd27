"""Axis-aware 3D layer helpers: kernels, dilations and pools expressed relative to the plane axis."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Triple = Tuple[int, int, int]


def along_plane(plane_value: int, in_plane_value: int, plane_axis: int) -> Triple:
    """A 3-tuple holding ``plane_value`` at ``plane_axis`` and ``in_plane_value`` elsewhere.

    Example:
        >>> along_plane(1, 3, plane_axis=2)
        (3, 3, 1)
    """
    values = [in_plane_value] * 3
    values[plane_axis] = plane_value
    return tuple(values)  # type: ignore[return-value]


def same_padding(kernel: Triple, dilation: Triple = (1, 1, 1)) -> Triple:
    """Symmetric padding that keeps the size for odd kernels."""
    for k in kernel:
        if k % 2 == 0:
            raise ValueError(f"symmetric 'same' padding needs odd kernel sizes, got {kernel}")
    return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))  # type: ignore[return-value]


def conv3d(in_channels: int, out_channels: int, kernel: Triple, dilation: Triple = (1, 1, 1)) -> nn.Conv3d:
    """A stride-1 conv3d that keeps the spatial size ("same" padding, odd or even kernels)."""
    if all(k % 2 == 1 for k in kernel):
        conv_class = OneChannelConv3d if in_channels == 1 else nn.Conv3d
        return conv_class(in_channels, out_channels, kernel, padding=same_padding(kernel, dilation), dilation=dilation)
    return EvenSameConv3d(in_channels, out_channels, kernel, dilation)


class OneChannelConv3d(nn.Conv3d):
    """A conv3d on a one-channel input (the stem) that takes oneDNN's fast path in CPU inference.

    With one input channel PyTorch's CPU convolution falls back to ``slow_conv3d``, whose output
    is channels-first, so the next conv also pays a copy of it into channels_last_3d (for the
    64-channel stem output of a 1 mm head, over 1 GB written). With a second input channel of
    zeros and zero weights for it the sum is the same, and oneDNN's blocked kernel computes it
    straight into channels_last_3d: measured on 2 CPU cores for a 96x128x128 input, 140 ms
    instead of about 450 ms (slow conv, bias broadcast and layout copy). Only CPU inference
    in channels_last_3d (as :func:`planar3d.inference.prepare_for_inference` sets it) takes this
    path: the parameters and every other path are those of ``nn.Conv3d``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        fast_path = (
            input.device.type == "cpu" and not torch.is_grad_enabled() and input.shape[1] == 1
            and self.weight.is_contiguous(memory_format=torch.channels_last_3d)
        )
        if not fast_path:
            return self._conv_forward(input, self.weight, self.bias)
        layout = torch.channels_last_3d
        two_channels = F.pad(input, (0, 0, 0, 0, 0, 0, 0, 1)).contiguous(memory_format=layout)
        weight = F.pad(self.weight, (0, 0, 0, 0, 0, 0, 0, 1)).contiguous(memory_format=layout)
        return self._conv_forward(two_channels, weight, self.bias)


def conv_of_concatenation(conv: nn.Conv3d, parts: List[torch.Tensor]) -> torch.Tensor:
    """``conv(torch.cat(parts, dim=1))`` without writing the concatenation.

    A convolution is linear in its input channels, so it is the sum of the convolutions of each
    part with its slice of the weights (the bias added once): the same result to float
    rounding. Inference uses it where the concatenation would be the largest tensor written.
    """
    channels = sum(int(part.shape[1]) for part in parts)
    if not parts or channels != conv.in_channels:
        raise ValueError(f"parts hold {channels} channels, the conv takes {conv.in_channels}")
    result: Optional[torch.Tensor] = None
    start = 0
    for part in parts:
        stop = start + part.shape[1]
        if isinstance(conv, EvenSameConv3d):
            part = F.pad(part, conv.far_extra)
        bias = conv.bias if result is None else None
        if _pointwise_as_matmul(conv, part):
            term = pointwise_conv_as_matmul(part, conv.weight[:, start:stop], bias)
        else:
            term = conv._conv_forward(part, conv.weight[:, start:stop], bias)
        result = term if result is None else result.add_(term)
        start = stop
    return result


def pointwise_conv_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A 1x1x1 conv3d as one matrix product over the channels: ``(N, C, D, H, W)`` with weight
    ``(O, C, 1, 1, 1)`` gives ``(N, O, D, H, W)``, the same numbers as ``F.conv3d`` (to rounding).

    On a channels_last_3d input the channels are the innermost axis, so the product reads the
    tensor once in place and its result is channels_last_3d too. Used on CUDA for the network's
    head (one output channel over 96 or 32 at full resolution): measured on an H200 for a
    176x256x256 head in bf16, 0.56 ms against cuDNN's 5.21 ms (``docs/prediction.md``); on the
    CPU oneDNN's conv is faster (22 against 37 ms for a 88x128x128 input on 2 cores), so it is
    not used there.
    """
    out = torch.matmul(x.permute(0, 2, 3, 4, 1), weight.reshape(weight.shape[0], weight.shape[1]).t())
    if bias is not None:
        out = out.add_(bias.to(out.dtype)) if not out.requires_grad else out + bias.to(out.dtype)
    return out.permute(0, 4, 1, 2, 3)


def _pointwise_as_matmul(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    """Whether :func:`conv_of_concatenation` computes ``conv`` on ``x`` with
    :func:`pointwise_conv_as_matmul`: a 1x1x1 kernel, stride 1, no padding or groups, on a CUDA
    tensor in channels_last_3d (where it was measured faster)."""
    return (x.is_cuda and tuple(conv.kernel_size) == (1, 1, 1) and tuple(conv.stride) == (1, 1, 1)
            and tuple(conv.padding) == (0, 0, 0) and conv.groups == 1
            and x.is_contiguous(memory_format=torch.channels_last_3d))


#: Devices where inference computes a conv followed by a ReLU as one fused call
#: (:func:`fused_conv_relu`). CUDA only: cuDNN fuses the bias and the ReLU into the convolution's
#: epilogue, where eager PyTorch writes and reads the full-resolution output twice more (a bias add,
#: then the ReLU). Measured on an H200 for a 64->64 planar conv at 176x256x256 in bf16: 2.35 ms
#: fused against 5.06 ms eager; the published network's whole-head pass 43.5 -> 33.6 ms
#: (docs/prediction.md). On the CPU oneDNN already adds the bias in the conv, and its fused
#: conv + ReLU (``torch.ops.mkldnn._convolution_pointwise``) gave the 1 mm head's pass 14.9 /
#: 14.3 s against 15.1 / 14.3 s eager (2 cores): not used.
FUSED_CONV_RELU_DEVICES: Tuple[str, ...] = ("cuda",)


def _cudnn_conv_relu(x, weight, bias, stride, padding, dilation, groups):
    """``relu(conv3d(x, weight) + bias)`` as one cuDNN call (tests replace it to run on the CPU)."""
    return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)


def fuses_conv_relu(x: torch.Tensor) -> bool:
    """Whether a conv + ReLU on ``x`` runs as :func:`fused_conv_relu`: inference (no autograd:
    the fused call has no backward) on a device of :data:`FUSED_CONV_RELU_DEVICES`, outside
    ``torch.compile`` (which fuses by itself)."""
    return (x.device.type in FUSED_CONV_RELU_DEVICES and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def fused_conv_relu(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``relu(conv(x))`` in one call, for any conv of :func:`conv3d` (even kernels and the
    one-channel stem included): the same numbers to rounding (the fused call rounds once, eager
    bf16 rounds after the conv and again after the bias). Under autocast it runs in autocast's
    dtype, as ``conv`` would; the output is channels_last_3d. The stem is not padded with zero
    channels as on the CPU (:class:`OneChannelConv3d`): on an H200 that made the whole-head pass
    slower, 39.9 ms at 8 channels against 33.4 ms at 1."""
    weight, bias = conv.weight, conv.bias
    if isinstance(conv, EvenSameConv3d):
        x = F.pad(x, conv.far_extra)
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    layout = torch.channels_last_3d
    x = x.to(dtype).contiguous(memory_format=layout)
    weight = weight.to(dtype).contiguous(memory_format=layout)
    bias = None if bias is None else bias.to(dtype)
    return _cudnn_conv_relu(x, weight, bias, tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


def run_conv_relu_pairs(block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` with every conv that a ReLU follows computed by :func:`fused_conv_relu`
    (the caller checks :func:`fuses_conv_relu`)."""
    modules = list(block)
    index = 0
    while index < len(modules):
        module = modules[index]
        follower = modules[index + 1] if index + 1 < len(modules) else None
        if isinstance(module, nn.Conv3d) and isinstance(follower, nn.ReLU):
            x = fused_conv_relu(module, x)
            index += 2
        else:
            x = module(x)
            index += 1
    return x


class EvenSameConv3d(nn.Conv3d):
    """A stride-1 conv3d keeping the size for even kernels, as ``padding="same"`` computes it.

    ``padding="same"`` splits an odd total padding ``d * (k - 1)`` with the smaller half at the
    near end and pads the input by one more plane at the far end itself, warning about the
    copy on every call. Here the symmetric (near) part is the conv's own padding and only the
    far-end remainder is an explicit ``F.pad``: the same numbers (tested), no warning, and the
    same parameters (``weight``, ``bias``), so checkpoints of either load into the other. The
    remaining copy is of the deepest decoder level's input only (1/8 of the resolution per
    axis); by arithmetic (not timed) it costs about 1 % of that conv's own time, while computing
    one extra output plane and cropping it instead would cost 1/P of the conv for P planes at
    that level (P = 2 for a 16-plane training slab), so the copy stays.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Triple, dilation: Triple = (1, 1, 1)):
        totals = [int(d) * (int(k) - 1) for k, d in zip(kernel, dilation)]
        near = tuple(t // 2 for t in totals)
        super().__init__(in_channels, out_channels, kernel, padding=near, dilation=dilation)
        far_extra: List[int] = []
        for axis in (2, 1, 0):  # F.pad lists the last axis first
            far_extra += [0, totals[axis] - 2 * near[axis]]
        self.far_extra = far_extra

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(F.pad(input, self.far_extra), self.weight, self.bias)


def activation(name: str) -> nn.Module:
    """``"relu"`` or ``"elu"`` (the authors' batch-norm variants use ELU)."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "elu":
        return nn.ELU(inplace=True)
    raise ValueError(f"activation must be 'relu' or 'elu', got {name!r}")


#: Devices where inference normalises a channels_last_3d input with
#: :func:`instance_norm_channels_last` instead of PyTorch's instance norm, which normalises an
#: instance as a batch of N x C channels and returns channels-first, so the next conv copies it
#: back. CUDA: in an H200 profile of the default network's training step copy-like elementwise
#: kernels took 30 % of the GPU time, and its whole-head pass took 117 ms against 44 ms for the
#: same network without norm (41 ms with a first in-place version; docs/prediction.md). CPU
#: (2 cores, fp32, 32 channels at 176x232x160): the norm 968 -> 902 ms and the next conv on its
#: output 898 -> 570 ms; the default network's whole-head pass 43.0 -> 34.2 s. In blocks of
#: voxels (:data:`CPU_NORM_BLOCK_VOXELS`), with the ReLU, over the conv's output: one norm 113 ms
#: on one core, and ``predict``'s model step for the 1 mm head 18.7-20.7 -> 14.1-14.5 s.
CHANNELS_LAST_INSTANCE_NORM_DEVICES: Tuple[str, ...] = ("cpu", "cuda")


class InstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` (the same parameters, state dict and results to rounding) whose
    inference on a device of :data:`CHANNELS_LAST_INSTANCE_NORM_DEVICES` reads a channels_last_3d
    input in place (:func:`instance_norm_channels_last`). Training keeps PyTorch's kernels and
    their backward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.normalizes_in_place(input):
                return instance_norm_channels_last(input, self.weight, self.bias, self.eps)
            return super().forward(input)
        # TorchScript (the network's inputs are always batched 5D tensors)
        self._check_input_dim(input)
        return self._apply_instance_norm(input)

    @torch.jit.unused
    def normalizes_in_place(self, input: torch.Tensor) -> bool:
        """Whether :meth:`forward` takes :func:`instance_norm_channels_last` for ``input``:
        inference on a device of :data:`CHANNELS_LAST_INSTANCE_NORM_DEVICES`, a channels_last_3d input."""
        return (input.device.type in CHANNELS_LAST_INSTANCE_NORM_DEVICES and not torch.is_grad_enabled()
                and not self.track_running_stats and input.dim() == 5 and input.shape[1] == self.num_features
                and not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last_3d)
                and not torch.compiler.is_compiling())

    @torch.jit.unused
    def relu_in_place(self, input: torch.Tensor) -> torch.Tensor:
        """``relu(self(input))`` written over ``input`` (which the caller no longer needs), where
        :meth:`normalizes_in_place`; otherwise the two modules' usual results."""
        if self.normalizes_in_place(input):
            return instance_norm_channels_last(input, self.weight, self.bias, self.eps, out=input, relu=True)
        return torch.relu_(self(input))


#: Voxels of a channels_last_3d instance the CPU normalises at a time (:func:`instance_norm_channels_last`):
#: a block of 16384 x C float32 values (2 MiB at 32 channels) stays in cache between the steps on it.
CPU_NORM_BLOCK_VOXELS = 16384


def instance_norm_channels_last(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                                eps: float, out: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """Instance norm of a channels_last_3d 5D tensor without a copy into another layout, into
    ``out`` (``x`` itself: in place; default a new tensor of ``x``'s dtype and layout), followed
    by a ReLU when ``relu``; returns ``out``.

    The variance is computed from the centred values (two passes), never as the mean square
    less the squared mean: where most voxels hold one value (the conv's bias over a
    skull-stripped scan's background) the mean is many standard deviations from zero, and that
    difference cancels. (It did: a first version changed a trained model's patient26 Dice from
    0.406 to 0.348 on the CPU.) Autocast is off inside: it would compute the reductions on a
    float32 copy.

    - **CPU**: a channels_last_3d instance is a (voxels x C) matrix. It is read in blocks of
      :data:`CPU_NORM_BLOCK_VOXELS` voxels three times: their sums (the mean), the squares of
      their centred values (in float32, in a cache-sized buffer), then scale, shift and ReLU
      written block by block. PyTorch's ``var_mean`` (Welford) took 1.3 s on one core for 32
      channels at 176x232x160, these two reductions 0.07 s.
    - **CUDA**: float32 and float64: ``torch.var_mean``, then one ``x * scale + shift``. Lower
      precisions (bf16): the mean accumulated in float32, the centred values written once in
      ``x``'s dtype, their mean square in float32, then scaled and shifted in place.
    """
    if out is None:
        out = torch.empty_like(x)
    with torch.autocast(x.device.type, enabled=False):
        if x.device.type == "cpu":
            if not out.is_contiguous(memory_format=torch.channels_last_3d):
                # the blocks are views of out's memory; another layout would write to a copy
                raise ValueError(f"instance_norm_channels_last: out must be channels_last_3d, got strides {out.stride()}")
            for instance, target in zip(x, out):
                _instance_norm_blocks(instance, target, weight, bias, eps, relu)
            return out
        return _instance_norm_whole(x, weight, bias, eps, out, relu)


def _instance_norm_whole(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                         out: torch.Tensor, relu: bool) -> torch.Tensor:
    """:func:`instance_norm_channels_last` on CUDA, called with autocast off: whole-tensor
    reductions and one elementwise pass (device-agnostic, so the CPU tests run it too)."""
    dims = (2, 3, 4)
    if x.dtype in (torch.float32, torch.float64):
        variance, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
        centred = None
    else:
        mean = x.mean(dims, keepdim=True, dtype=torch.float32)
        centred = torch.sub(x, mean, out=out)  # computed in float32, rounded once
        count = x.shape[2] * x.shape[3] * x.shape[4]
        variance = torch.linalg.vector_norm(centred, 2, dims, keepdim=True, dtype=torch.float32).square_().div_(count)
    scale = variance.float().add_(eps).rsqrt_()
    if weight is not None:
        scale = scale * weight.float().view(1, -1, 1, 1, 1)
    if centred is None:
        shift = -mean.float() * scale
        if bias is not None:
            shift = shift + bias.float().view(1, -1, 1, 1, 1)
        torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype), out=out)
    else:
        shift = bias.float().view(1, -1, 1, 1, 1) if bias is not None else torch.zeros_like(scale)
        # in float32, rounded once into the centred tensor's dtype and layout
        torch.addcmul(shift, centred, scale, out=out)
    return out.relu_() if relu else out


def _instance_norm_blocks(instance: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                          bias: Optional[torch.Tensor], eps: float, relu: bool) -> None:
    """One channels_last_3d instance (C, D, H, W) normalised into ``target`` in blocks of voxels
    (:func:`instance_norm_channels_last`, CPU)."""
    channels = instance.shape[0]
    voxels = instance.permute(1, 2, 3, 0).reshape(-1, channels)  # a view: channels are innermost
    rows = target.permute(1, 2, 3, 0).view(-1, channels)  # written through: must be a view
    count = voxels.shape[0]
    compute = torch.promote_types(instance.dtype, torch.float32)  # float32, or float64 for float64
    buffer = torch.empty(min(CPU_NORM_BLOCK_VOXELS, count), channels, dtype=compute)
    blocks = voxels.split(CPU_NORM_BLOCK_VOXELS)
    total = torch.zeros(channels, dtype=torch.float64)  # the block sums added in float64
    for block in blocks:
        total += (block if block.dtype == compute else buffer[: len(block)].copy_(block)).sum(0)
    mean = (total / count).to(compute)
    squares = torch.zeros(channels, dtype=torch.float64)
    for block in blocks:
        centred = torch.sub(block, mean, out=buffer[: len(block)])
        squares += centred.mul_(centred).sum(0)
    scale = (squares / count).add_(eps).rsqrt_().to(compute)
    if weight is not None:
        scale *= weight.to(compute)
    shift = -mean * scale
    if bias is not None:
        shift += bias.to(compute)
    for block, row_block in zip(blocks, rows.split(CPU_NORM_BLOCK_VOXELS)):
        if row_block.dtype == compute:
            torch.addcmul(shift, block, scale, out=row_block)
            if relu:
                row_block.clamp_(min=0)
        else:  # in float32, rounded once into the target's dtype (bf16)
            result = torch.addcmul(shift, block, scale, out=buffer[: len(block)])
            row_block.copy_(result.clamp_(min=0) if relu else result)


def normalization(name: str | None, channels: int) -> nn.Module:
    """``None`` (as published), ``"batch"`` or ``"instance"`` normalisation."""
    if name is None or name == "none":
        return nn.Identity()
    if name == "batch":
        return nn.BatchNorm3d(channels)
    if name == "instance":
        return InstanceNorm3d(channels, affine=True)
    raise ValueError(f"norm must be None, 'batch' or 'instance', got {name!r}")


class BlockMaxPool3d(nn.Module):
    """Max-pool with kernel = stride, deterministic on CUDA when determinism is requested.

    CUDA's ``max_pool3d`` backward has no deterministic kernel, so with
    ``torch.use_deterministic_algorithms(True)`` PyTorch refuses it. Windows that tile the
    input (kernel = stride, sizes divisible, which :class:`PlanarResUNet` guarantees by padding)
    can instead be computed as a reshape and ``amax``: the same forward values exactly, and a
    backward without atomics (ties share the gradient equally instead of going to one voxel).
    That path is taken on CUDA when ``deterministic`` is set (see
    ``PlanarResUNet.use_deterministic_pooling``); elsewhere the usual kernel runs.
    """

    def __init__(self, kernel: Triple, deterministic: bool = False):
        super().__init__()
        self.kernel = tuple(int(k) for k in kernel)
        self.deterministic = deterministic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deterministic and x.is_cuda:
            return block_max_pool(x, self.kernel)
        return F.max_pool3d(x, self.kernel, self.kernel)


def block_max_pool(x: torch.Tensor, kernel: Tuple[int, int, int]) -> torch.Tensor:
    """Max over non-overlapping ``kernel`` blocks as reshape + ``amax`` (sizes must divide)."""
    n, c, d, h, w = x.shape
    kd, kh, kw = kernel
    return x.reshape(n, c, d // kd, kd, h // kh, kh, w // kw, kw).amax(dim=(3, 5, 7))
