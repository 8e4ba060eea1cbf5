"""Where each layer's channels sit in the coordinator's flat per-channel arrays.

All statistics of a run sit in flat per-channel arrays, the layers side by
side, so that taking a report or computing every metric is a few vectorized
operations however many layers a model has.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """Where each layer's channels sit in a flat per-channel array.

    Layer ``i`` owns ``channels[i]`` consecutive entries starting at ``offsets[i]``.
    """

    names: tuple[str, ...] = ()
    channels: tuple[int, ...] = ()

    @cached_property
    def size(self) -> int:
        return sum(self.channels)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        starts = [0]
        for c in self.channels[:-1]:
            starts.append(starts[-1] + c)
        return tuple(starts) if self.channels else ()

    @cached_property
    def channel_counts(self) -> dict[str, int]:
        return dict(zip(self.names, self.channels, strict=True))

    @cached_property
    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    @cached_property
    def layer_of_channel(self) -> Tensor:
        """``(C,)``: the layer index of every channel."""
        return torch.repeat_interleave(
            torch.arange(len(self.names)), torch.tensor(self.channels, dtype=torch.long)
        )

    @cached_property
    def offset_index(self) -> Tensor:
        """``(L,)``: ``offsets`` as an index tensor."""
        return torch.tensor(self.offsets, dtype=torch.long)

    def at_layer_starts(self, per_channel: Tensor) -> Tensor:
        """``(..., C) -> (..., L)``: each layer's first channel (for values that are
        the same over a layer's channels, such as counts)."""
        return per_channel[..., self.offset_index]

    def per_channel(self, per_layer: Tensor) -> Tensor:
        """``(..., L) -> (..., C)``: each layer's value repeated over its channels."""
        return per_layer.index_select(-1, self.layer_of_channel)

    def layer_mean(self, per_channel: Tensor) -> Tensor:
        """``(..., C) -> (..., L)``: the mean over each layer's channels."""
        sums = per_channel.new_zeros((*per_channel.shape[:-1], len(self.names)))
        sums.index_add_(-1, self.layer_of_channel, per_channel)
        return sums / torch.tensor(self.channels, dtype=per_channel.dtype)

    def slice(self, name: str) -> slice:
        i = self.index[name]
        return slice(self.offsets[i], self.offsets[i] + self.channels[i])

    def extended(self, other: Layout) -> Layout:
        """This layout with ``other``'s unknown layers appended."""
        new = [(n, c) for n, c in zip(other.names, other.channels, strict=True) if n not in self.index]
        if not new:
            return self
        return Layout(self.names + tuple(n for n, _ in new), self.channels + tuple(c for _, c in new))

    def positions(self, other: Layout) -> tuple[Tensor, Tensor]:
        """Indices in this layout of ``other``'s layers ``(L_other,)`` and channels
        ``(C_other,)``; every layer of ``other`` must be here."""
        layers = torch.tensor([self.index[n] for n in other.names], dtype=torch.long)
        starts = self.offset_index[layers]
        within = torch.arange(other.size) - other.offset_index[other.layer_of_channel]
        return layers, starts[other.layer_of_channel] + within
