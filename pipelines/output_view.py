"""`OutputView`: the denoiser's output as a strategy sees it, and the guided prediction back in the denoiser's format.

Strategies combine predictions of the quantity the pipeline's CFG combines; some denoisers output something else
around it (Adapter fields):

- `guide_channels_of_input`: learned-sigma models (DiT, PixArt) output 2x the sample's channels; the strategy sees
  the first ones and the output keeps the conditional rest, as the pipelines' own CFG does;
- `negated_output`: Lumina 2 (and others) predict the negated velocity; the strategy sees it un-negated;
- `x0_velocity_floor`: PRX Pixel predicts x0 and steps with the velocity (x - x0) / max(t, floor); the strategy sees
  that velocity, and the guided velocity goes back to the x0 whose velocity it is.

Apart from the hook so that the conversions and their inverses sit side by side.
"""

from __future__ import annotations

import torch

from guidance.base import StepContext

from .adapters import Adapter


class OutputView:
    """One step's conversion: `to_strategy(preds)`, then `from_strategy(guided)` and `output(guided)`."""

    def __init__(self, adapter: Adapter, ctx: StepContext, cond: torch.Tensor, channels: int):
        """`cond`: the conditional prediction as the denoiser output it (its dtype and kept channels);
        `channels`: those of the sample (ctx.x), on the adapter's channel axis."""
        self.adapter, self.ctx, self.cond, self.channels = adapter, ctx, cond, channels
        self.x = self.t_x = None
        if adapter.x0_velocity_floor is not None:  # PRX Pixel: the velocity (x - x0) / max(t, floor)
            self.x = ctx.x.to(torch.promote_types(cond.dtype, torch.float32))
            self.t_x = torch.tensor(ctx.timestep, dtype=torch.float32, device=self.x.device).clamp(
                min=adapter.x0_velocity_floor)

    def to_strategy(self, preds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The branches' predictions as the strategy combines them."""
        a = self.adapter
        if a.guide_channels_of_input:
            preds = {k: v.narrow(a.channel_dim, 0, self.channels) for k, v in preds.items()}
        if a.negated_output:
            preds = {k: -v for k, v in preds.items()}
        if self.x is not None:
            preds = {k: (self.x - v.to(self.x.dtype)) / self.t_x for k, v in preds.items()}
        return preds

    def from_strategy(self, guided: torch.Tensor) -> torch.Tensor:
        """The strategy's guided prediction as the denoiser's guided channels, in the denoiser's dtype."""
        if self.x is not None:  # back to the x0 prediction whose velocity is the guided one
            guided = self.x - self.t_x * guided.to(self.x.dtype)
        return (-guided if self.adapter.negated_output else guided).to(self.cond.dtype)

    def output(self, guided: torch.Tensor) -> torch.Tensor:
        """`from_strategy`'s result with the channels the strategy does not guide (learned sigma), kept from the
        conditional prediction."""
        a, cond, channels = self.adapter, self.cond, self.channels
        d = a.channel_dim
        if a.guide_channels_of_input and cond.shape[d] > channels:  # DiT's learned-sigma channels, kept
            return torch.cat([guided, cond.narrow(d, channels, cond.shape[d] - channels)], dim=d)
        return guided
