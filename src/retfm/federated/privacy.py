"""Site-level differential privacy of a federation: central DP with client-side clipping (Flower's pattern).

Each round every site clips its update (new - global weights, every tensor it sends as one vector) to L2 norm
``clip_norm`` (:func:`clip_update`); the coordinator averages the clipped updates of the sampled sites with equal
weights and adds Gaussian noise of std ``noise_multiplier * clip_norm / sampled sites`` to the mean, i.e.
``noise_multiplier * clip_norm`` on the sum. Noise, equal weighting and the privacy accountant are Flower's own:
:class:`flwr.serverapp.strategy.DifferentialPrivacyClientSideFixedClipping` around FedAvg/FedProx, with Flower's
``RdpAccountant`` (Google's dp-accounting underneath) composing one Gaussian release per aggregated round, with no
amplification by sampling, for neighbouring federations that differ by one whole site. The coordinator is trusted:
it sees each site's clipped update; what is private is every global model it releases (to the sites each round,
and at the end). The sites clip with :func:`clip_update` rather than Flower's ``fixedclipping_mod``, which clips
the finished reply in its own precision: it would widen fp16 replies back to fp32, and could not leave room for
the rounding to fp16.
"""

from __future__ import annotations

import math

import torch
from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from retfm.errors import RetfmError
from retfm.federated.config import FederatedPrivacy

CLIP_NORM_KEY = KEY_CLIPPING_NORM  # the ConfigRecord key by which Flower's wrapper tells sites the clip norm

Weights = dict[str, torch.Tensor]


def clip_update(new: Weights, old: Weights, clip_norm: float, dtype: torch.dtype) -> Weights:
    """``new`` as it goes on the wire in ``dtype``, its update from ``old`` (all tensors as one vector) scaled down
    to an L2 norm of at most ``clip_norm``; a smaller update is left as it is.

    The bound holds for the rounded weights: rounding to ``dtype`` moves a weight x by at most u|x| + e (u the
    unit roundoff, e half the smallest subnormal step), so the update is scaled to at most
    (clip_norm - u ||old|| - e sqrt(n)) / (1 + u), which leaves room for the worst case (in fp16: 2^-11 ||old||)."""
    update = {name: new[name].double() - old[name].double() for name in new}
    norm = math.sqrt(sum(float((u ** 2).sum()) for u in update.values()))
    old_norm = math.sqrt(sum(float((old[name].double() ** 2).sum()) for name in new))
    size = sum(u.numel() for u in update.values())
    info = torch.finfo(dtype)
    roundoff, subnormal = info.eps / 2, info.tiny * info.eps / 2
    rounding = roundoff * old_norm + subnormal * math.sqrt(size)
    bound = (clip_norm - rounding) / (1 + roundoff)
    if bound <= 0:
        raise RetfmError(f"dp.clip_norm {clip_norm:g} is below what rounding the weights to {dtype} can move them "
                         f"({rounding:.3g}); use transfer fp32 or a larger clip_norm")
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {name: (old[name].double() + scale * u).to(dtype) for name, u in update.items()}


def private_strategy(strategy: FedAvg, dp: FederatedPrivacy, sites: int) -> DifferentialPrivacyClientSideFixedClipping:
    """``strategy`` (FedAvg or FedProx weighting every site the same) wrapped by Flower's central-DP wrapper and
    its RDP accountant, for a federation of ``sites``."""
    if dp.delta >= 1 / sites:
        raise RetfmError(f"dp.delta {dp.delta:g} must be below 1/sites ({1 / sites:g} for {sites} sites): "
                         "a delta that large allows one site's data to leak outright")
    sampled = max(int(sites * strategy.fraction_train), strategy.min_train_nodes)  # FedAvg's own sample size
    accountant = RdpAccountant(PrivacyConfig(target_delta=dp.delta, population_size=sites,
                                             neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                             sampling_method=SamplingMethod.NO_AMPLIFICATION))
    try:
        return DifferentialPrivacyClientSideFixedClipping(strategy, dp.noise_multiplier, dp.clip_norm, sampled,
                                                          accountant=accountant)
    except ValueError as exc:
        raise RetfmError(f"dp: {exc}") from None


def privacy_spent(strategy: DifferentialPrivacyClientSideFixedClipping) -> dict:
    """The (epsilon, delta) spent so far and the number of noised releases it covers."""
    spent = strategy.privacy_spent()
    return {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases}
