"""Options of ``retfm federated run``: the federation, and each site's local work as the stage's own config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from retfm.adapt.config import FinetuneConfig
from retfm.config import Options
from retfm.pretrain.config import LoraOptions, PretrainConfig
from retfm.synth.config import SynthTrainConfig


class FederatedSite(Options):
    """One site of a simulated federation: its data, and its rows' ``site`` value when sites share a manifest."""

    name: str = Field(..., min_length=1)
    data: str = Field(..., description="ingest folder or manifest file holding the site's images")
    rows: str | None = Field(None, description="the manifest's site value of this site's rows (null: all rows)")


# strategy name -> its class in flwr.serverapp.strategy (retfm.federated.apps builds it)
STRATEGY_CLASSES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam", "fedmedian": "FedMedian",
                    "fedtrimmedavg": "FedTrimmedAvg", "krum": "Krum", "multikrum": "MultiKrum", "bulyan": "Bulyan"}


PRIVATE_STRATEGIES = ("fedavg", "fedprox")  # a plain mean of clipped updates: what the noise is calibrated for


class FederatedPrivacy(Options):
    """Site-level differential privacy of a federation (see docs/federated.md)."""

    clip_norm: float = Field(1.0, gt=0, description="L2 bound of a site's update per round (all tensors it sends "
                                                    "as one vector)")
    noise_multiplier: float = Field(1.0, gt=0, description="noise std on the sum of the updates, in clip_norms")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta of the reported (epsilon, delta); below 1/sites")


class FederatedConfig(Options):
    """Options of ``retfm federated run`` (see docs/federated.md)."""

    data: str | None = Field(None, description="one ingest folder or manifest: one site per value of its site column")
    sites: list[FederatedSite] | None = Field(None, description="or the sites one by one (several manifests)")
    task: Literal["pretrain", "finetune", "synth"] = Field("pretrain", description="what the sites train: pretrain "
                                                           "(the pretrain: objective), finetune (a classifier of "
                                                           "finetune.label) or synth (a conditional generator)")
    pretrain: dict | None = Field(None, description="task pretrain: retfm pretrain options of every site's local "
                                                    "work (objective, model, batch_size, blr, ...); data comes from "
                                                    "the sites")
    finetune: dict | None = Field(None, description="task finetune: retfm finetune options of every site's local "
                                                    "work (model, weights, label, adaptation, blr, ...) and classes, "
                                                    "the label's values in the classifier's order; data comes from "
                                                    "the sites")
    synth: dict | None = Field(None, description="task synth: retfm synth train options of every site's local work "
                                                 "(label, cond, size, block_out_channels, lr, ...) and classes, the "
                                                 "condition values; data comes from the sites")
    rounds: int = Field(3, ge=1)
    local_steps: int = Field(10, ge=1, description="optimiser steps per site and round")
    strategy: Literal[tuple(STRATEGY_CLASSES)] = "fedavg"
    strategy_options: dict = Field(default_factory=dict, description="keyword arguments of the Flower strategy, "
                                                                     "e.g. proximal_mu, beta, num_malicious_nodes")
    evaluate_label: str | None = Field(None, description="label probed at every site after every round "
                                                         "(null: no evaluation)")
    transfer: Literal["fp32", "fp16"] = Field("fp32", description="precision of the weights sites send back")
    transfer_params: Literal["full", "lora"] = Field("full", description="full: every trainable weight travels; "
                                                     "lora: the backbone stays frozen at the shared start, only "
                                                     "LoRA adapters and the objective's head train and travel")
    lora: LoraOptions = Field(default_factory=LoraOptions, description="adapters of transfer_params: lora")
    dp: FederatedPrivacy | None = Field(None, description="site-level differential privacy (null: off)")
    max_abs_weight: float = Field(1e4, gt=0, description="a reply with a weight beyond this (or NaN/Inf) is "
                                                         "rejected before aggregation")
    timeout: float = Field(3600, gt=0, description="seconds the coordinator waits for a round's replies")
    cpus_per_site: float = Field(1, gt=0, description="simulation: CPU cores reserved for each site")

    @field_validator("pretrain", "finetune", "synth")
    @classmethod
    def _check_local_options(cls, value, info: ValidationInfo):
        """A task's block is checked when the config loads, as the sites' options are built from it."""
        if value is not None:
            LOCAL_OPTIONS[info.field_name](value)
        return value

    @model_validator(mode="after")
    def _check_task(self):
        given = {"pretrain": self.pretrain, "finetune": self.finetune, "synth": self.synth}
        if given[self.task] is None or any(v is not None for task, v in given.items() if task != self.task):
            others = " or ".join(task for task in given if task != self.task)
            raise ValueError(f"task {self.task}: give {self.task} options, not {others}")
        if self.task == "pretrain":
            steps = self.rounds * self.local_steps
            if self.pretrain.get("steps", steps) != steps:
                raise ValueError(f"pretrain.steps: each site runs rounds x local_steps = {steps} steps in a "
                                 "federation; leave steps out")
            warmup = self.pretrain_config().warmup_steps
            if warmup >= steps:
                raise ValueError(f"pretrain.warmup_steps ({warmup}) must be below the {steps} steps each site runs "
                                 "(rounds x local_steps): set pretrain.warmup_steps")
        if self.task == "synth":
            if self.transfer_params == "lora":
                raise ValueError("task synth: every UNet weight travels; transfer_params lora is for task pretrain")
            if self.evaluate_label not in (None, self.synth["label"]):
                raise ValueError(f"task synth: the generator is conditioned on {self.synth['label']!r}; "
                                 "evaluate_label is that (each site's test denoising loss) or null")
        if self.task == "finetune":
            if self.transfer_params == "lora":
                raise ValueError("task finetune: what travels is what finetune.adaptation trains; for LoRA-only "
                                 "transfer set finetune.adaptation: lora (and finetune.lora_rank, ...)")
            label = self.finetune["label"]
            if self.evaluate_label not in (None, label):
                raise ValueError(f"task finetune: the classifier predicts {label!r}; evaluate_label is that or null")
        return self

    @field_validator("dp")
    @classmethod
    def _check_dp(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("strategy") not in PRIVATE_STRATEGIES:
            raise ValueError(f"differential privacy needs strategy {' or '.join(PRIVATE_STRATEGIES)} (the noise is "
                             f"calibrated to a plain mean of clipped updates), not {info.data.get('strategy')}")
        return value

    def pretrain_config(self) -> PretrainConfig:
        """The sites' pretraining options (``data`` is set per site; ``steps``, the length of the learning-rate
        schedule, is each site's whole share: rounds x local steps)."""
        return _pretrain_options({**self.pretrain, "steps": self.rounds * self.local_steps})

    def finetune_config(self) -> FinetuneConfig:
        """The sites' fine-tuning options (each site reads its own data)."""
        return _finetune_options(self.finetune)

    def synth_config(self) -> SynthTrainConfig:
        """The sites' generator options (each site reads its own data)."""
        return _synth_options(self.synth)

    def synth_conditions(self) -> dict[str, list]:
        """Task synth: the generator's condition values, {column: values} in the class embedding's order."""
        return _synth_conditions(self.synth_config(), self.synth["classes"])

    def classes(self) -> list[str]:
        """Task finetune: the label's classes, as strings, in the classifier's order."""
        return [str(c) for c in self.finetune["classes"]]

    def local_config(self) -> PretrainConfig | FinetuneConfig | SynthTrainConfig:
        """The options of a site's local work for the task."""
        return {"pretrain": self.pretrain_config, "finetune": self.finetune_config,
                "synth": self.synth_config}[self.task]()

    def local_options(self) -> dict:
        """Keyword options of a site's local work: ``classes`` (finetune), ``conditions`` (synth) or ``lora``
        (pretrain)."""
        if self.task == "synth":
            return {"conditions": self.synth_conditions()}
        return {"classes": self.classes()} if self.task == "finetune" else {"lora": self.lora_options()}

    def lora_options(self) -> LoraOptions | None:
        """The adapters when only LoRA weights travel, else None."""
        return self.lora if self.transfer_params == "lora" else None


def _pretrain_options(block: dict) -> PretrainConfig:
    """Task pretrain's ``pretrain:`` block as the sites' options: no data (each site reads its own) and no
    adapters (a federation's are ``lora:``)."""
    _refuse_site_data("pretrain", block, {"data", "sites"})
    _refuse_option("pretrain", block, "lora", "a federation's adapters are set by transfer_params: lora and lora:")
    return PretrainConfig.model_validate({**block, "data": ["site"]})


def _finetune_options(block: dict) -> FinetuneConfig:
    """Task finetune's ``finetune:`` block as the sites' options: no data or sites, and ``classes``, the label's
    values in the classifier's order."""
    _refuse_site_data("finetune", block, {"data", "train_sites", "test_sites"})
    classes = block.get("classes")
    if not isinstance(classes, list) or len({str(c) for c in classes}) != len(classes) or len(classes) < 2:
        raise ValueError("finetune.classes: the label's values in the classifier's order, at least two distinct "
                         "(every site trains and tests on these, whatever it holds)")
    return FinetuneConfig.model_validate({**_without_classes(block), "data": "site"})


def _synth_options(block: dict) -> SynthTrainConfig:
    """Task synth's ``synth:`` block as the sites' options: no data, no LoRA generator, and ``classes``, the
    condition values (see :func:`_synth_conditions`)."""
    _refuse_site_data("synth", block, {"data", "sites"})
    _refuse_option("synth", block, "base_model", "federated training of a LoRA generator is not built; each site "
                   "can train its own with retfm synth train --set base_model=...")
    options = SynthTrainConfig.model_validate({**_without_classes(block), "data": "site"})
    _synth_conditions(options, block.get("classes"))
    return options


LOCAL_OPTIONS = {"pretrain": _pretrain_options, "finetune": _finetune_options, "synth": _synth_options}


def _refuse_site_data(block: str, options: dict, keys: set[str]) -> None:
    """A federation's task options may not name data: each site trains on its own."""
    given = sorted(set(options) & keys)
    if given:
        raise ValueError(f"{block}.{f', {block}.'.join(given)}: the data come from the federation's sites; "
                         "leave them out")


def _refuse_option(block: str, options: dict, key: str, reason: str) -> None:
    """A task option a federation does not take."""
    if options.get(key) is not None:
        raise ValueError(f"{block}.{key}: {reason}")


def _without_classes(options: dict) -> dict:
    return {key: value for key, value in options.items() if key != "classes"}


def _synth_conditions(options: SynthTrainConfig, classes) -> dict[str, list]:
    """``synth.classes`` as {column: values}: a mapping of the label and each ``cond`` column to its values, or a
    list of the label's values when there is no ``cond``; each column's values distinct, at least one."""
    columns = [options.label, *options.cond]
    if isinstance(classes, list) and not options.cond:
        classes = {options.label: classes}
    if not isinstance(classes, dict) or list(classes) != columns:
        raise ValueError(f"synth.classes: the values of {', '.join(columns)} as a mapping in that order, e.g. "
                         f"{{{options.label}: [0, 1]}} (a list of {options.label}'s values when cond is empty): every "
                         "site and the coordinator build the same class embedding from them")
    for column, values in classes.items():
        if not isinstance(values, list) or not values or len(set(map(repr, values))) != len(values):
            raise ValueError(f"synth.classes.{column}: a list of distinct values, at least one")
    return classes

