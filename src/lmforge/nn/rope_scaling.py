"""RoPE frequency scaling for contexts longer than pretraining saw: Llama 3.1's "llama3" rule.

RoPE rotates feature pair i by position * f_i. Llama 3.1 stretches a 8K-token model to 128K by
dividing the *low* frequencies (long wavelengths, which never completed a turn in pretraining)
by `factor`, keeping the high frequencies (short wavelengths, which carry local order) as they
are, and blending linearly in between:

    wavelength > L / low_freq_factor    ->  f / factor
    wavelength < L / high_freq_factor   ->  f
    otherwise  s = (L / wavelength - low) / (high - low);  (1 - s) f / factor + s f

with L = original_max_position_embeddings (the pretraining context)."""

from __future__ import annotations

import math

import torch


def llama3_frequencies(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                       high_freq_factor: float, original_max_position: int) -> torch.Tensor:
    """inv_freq (hd/2,) -> the scaled frequencies (hd/2,), same dtype."""
    low_wavelen = original_max_position / low_freq_factor
    high_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # (hd/2,)
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)
