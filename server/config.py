"""The federated run configuration: one pydantic model read once from Flower's run config (its defaults are the
project's defaults; pyproject's [tool.flwr.app.config] mirrors them and a test keeps the two equal)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from magnet_core.artefacts.run_record import fingerprint
from magnet_core.cohort.manifest import DEFAULT_MIN_COUNT, DEFAULT_SEED, MIN_COUNT_FLOOR
from magnet_core.federation.eval_screen import DEFAULT_ALPHA as EVAL_ALPHA
from magnet_core.federation.privacy import DEFAULT_MAX_BINS
from magnet_core.model.config import DEFAULT_PRESET, MAX_LABEL_TAU, MAX_PROTOTYPE_WEIGHT, Preset, get_preset
from magnet_core.protocol.messages import MAX_HISTOGRAM_BINS, MAX_PROXIMAL_MU


class RunConfigError(ValueError):
    """The run configuration is invalid, or does not match the run it should resume."""


class FederatedConfig(BaseModel):
    """Every knob of a federated run; Flower's kebab-case run-config keys map to these fields."""

    model_config = ConfigDict(extra="forbid")

    num_server_rounds: int = Field(20, ge=1, le=10_000)
    local_epochs: int = Field(10, ge=1, le=1000)
    preset: str = DEFAULT_PRESET
    aggregation: Literal["modality-aware", "fedavg"] = "modality-aware"
    robust: Literal["auto", "mean", "trimmed-mean", "median", "near-median"] = Field(
        "mean", description="coordinate-wise rule over the clipped updates: auto (the median of a block held by 3 or "
                            "more sites, the weighted mean below; the weighted mean under DP and secure aggregation), "
                            "the weighted mean, a trimmed mean (unweighted) or the median (unweighted); a round whose "
                            "sites cannot be trimmed is refused")
    trim: float = Field(0.2, ge=0, lt=0.5, description="trimmed-mean: drop b = floor(trim x sites) on each side; "
                                                        "needs b >= 1 (2b + 1 sites)")
    seed: int = Field(DEFAULT_SEED, ge=0, lt=2**31)
    min_sites: int = Field(2, ge=1, description="minimum sites per round (train and evaluate)")
    fraction_train: float = Field(1.0, gt=0, le=1)
    round_timeout: float = Field(600.0, gt=0, description="seconds to wait for replies in one round")
    straggler_grace: float = Field(30.0, ge=0, description="once min-sites replied, wait this long for the rest")
    norm_ratio: float = Field(10.0, gt=1, description="a step > this x the reference norm is large: rejected if it "
                                                       "also points away from the majority, else clipped")
    update_max_ratio: float = Field(0.5, gt=0, description="reject a step longer than this x the global norm")
    update_min_ratio: float = Field(1e-4, ge=0, description="reject a step shorter than this x the global norm")
    clip_factor: float = Field(1.0, ge=0, allow_inf_nan=False,
                               description="clip every accepted step to this x the lower median step norm of this and "
                                           "past rounds before weighting (0 = off; DP clips to dp-clip-norm)")
    update_screen: Literal["auto", "step", "gradient"] = Field(
        "auto", description="the coordinator's per-site update screen: step (local-Adam steps: a band against the "
                            "global model's norm, opposed-and-large rejection, clip-factor), gradient (fedsgd's "
                            "gradients: lower band only, no direction rule, gradient-clip-factor), or auto (gradient "
                            "for local-update='gradient', else step)")
    gradient_clip_factor: float = Field(1.0, ge=0, allow_inf_nan=False,
                                        description="gradient screen: clip every gradient to this x the lower median "
                                                    "gradient norm of this round (0 = off; DP clips to dp-clip-norm)")
    trust_weighting: bool = Field(False, description="with 3+ sites, scale each site's weight by its steps' agreement "
                                                     "with the others (raises the others' share; off under DP)")
    histogram_bins: int = Field(DEFAULT_MAX_BINS, ge=2, le=MAX_HISTOGRAM_BINS,
                                description="most score-histogram bins a site may release (sites cap it too)")
    eval_flag_alpha: float = Field(EVAL_ALPHA, ge=0, lt=1, description="flag a site whose evaluation has more "
                                   "correct predictions than the others' recall makes plausible (p < this; 0 = off)")
    eval_exclude_flagged: bool = Field(False, description="leave flagged sites out of the pooled (global) metric")
    test_graph: Literal["among-test", "attach-to-train", "isolated"] = Field(
        "among-test", description="test-graph rule of the sites' evaluation (reported in every result): among-test, "
        "attach-to-train, or isolated (no edge: no neighbour brings a site's label mix into a prediction)")
    min_count: int = Field(DEFAULT_MIN_COUNT, ge=MIN_COUNT_FLOOR,
                           description="k (simulation; a deployment takes it from the manifest)")
    # simulation: where sites come from (empty data-path = generated cohort)
    data_path: str = ""
    scenario: str = "iid-3"
    modalities: str = Field("", description="comma-separated subset of the data's modalities ('' = all)")
    # deployment: the consortium manifest (modalities, features, classes, enrolled sites)
    manifest: str = ""
    site_keys: str = Field("", description="deployment: a CSV of site name -> its node's OpenSSH public key (the PKI's "
                                          "registered_sites.csv) for enrolled sites whose [sites] entry has no "
                                          "public_key; a site's name is bound to the node holding its key")
    allow_unenrolled: bool = Field(False, description="deployment: accept a manifest without [sites] or without a "
                                                      "public key for every site; names are then taken from each "
                                                      "node's first reply (NOT bound to keys; the run record says so)")
    server_eval: bool = True
    out_dir: str = "runs/flwr-run"
    resume: bool = False
    overwrite: bool = Field(False, description="replace an existing run in out-dir instead of refusing")
    report: bool = Field(True, description="write out-dir/report.html after every round")
    # the signed model package written at the end (model.magnet): the coordinator's signing key and certificate
    # (`magnet-fl pki signing-key`: PKI/signing/model_signing.key and .crt); empty = no package
    signing_key: str = ""
    signing_cert: str = ""
    # secure aggregation (the coordinator learns only sums; per-site update checks then cannot run: sites clip)
    secagg: bool = Field(False, description="aggregate with secure aggregation (pairwise + self masks)")
    secagg_max_dropouts: int = Field(1, ge=0, description="sites that may drop after masking without losing the sum")
    secagg_clip_norm: float = Field(1.0, gt=0, description="under secure aggregation each site clips its update "
                                                          "to this norm (the coordinator cannot check norms)")
    secagg_graph: Literal["full", "neighbourhood"] = Field(
        "full", description="full: every site exchanges keys and shares with every other (SecAgg); neighbourhood: "
                            "with its neighbours in a graph every site derives from the round id and the site ids "
                            "(SecAgg+, magnet_core/federation/secagg_graph.py); full stays the default until the "
                            "neighbourhood graph has been measured in deployments (benchmarks/secagg_scaling.py "
                            "measures it in-process)")
    secagg_graph_degree: int = Field(0, ge=0, description="neighbourhood graph: neighbours per site (even); 0 = "
                                                          "secagg_graph.choose_degree(sites, 10 % dropout), which is "
                                                          "the complete graph below 30 sites")
    secagg_roster: str = Field("", description="the consortium roster (PKI/registered_sites.csv): authenticated "
                                               "secure aggregation (signed keys, shares and transcript; a dealer "
                                               "of bad shares is named and left out); empty = unauthenticated")
    # secure evaluation (magnet_core/federation/secure_eval.py): the sites' evaluation counts summed by secure
    # aggregation, k applied to the consortium's sums; no per-site metric exists (sites release none)
    secure_evaluation: bool = Field(False, description="pool the sites' evaluation counts through a secure sum "
                                                       "(the minimum count k then applies to the sums; no per-site "
                                                       "metrics); uses secagg-max-dropouts and secagg-roster")
    # differential privacy at site level: each site clips its update to dp-clip-norm (0 = off); the coordinator
    # averages the clipped updates with uniform weights per block and adds Gaussian noise of std
    # dp-noise-multiplier * dp-clip-norm / (sites averaged)
    dp_clip_norm: float = Field(0.0, ge=0)
    dp_noise_multiplier: float = Field(0.0, ge=0)
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) reported every round")
    dp_noise_seed: int = Field(-1, ge=-1, description="-1: noise from the OS (secret); >= 0: seeded, reproducible "
                                                      "(simulations only: whoever knows the seed can remove it)")
    # strategy beyond (modality-aware) FedAvg: FedProx's proximal term in the sites' local loss, and an adaptive
    # optimizer at the coordinator (FedAdam / FedYogi, Reddi et al. 2021) stepping along aggregate - global
    proximal_mu: float = Field(0.0, ge=0, le=MAX_PROXIMAL_MU, allow_inf_nan=False,
                               description="FedProx: sites add (mu / 2) ||w - w_global||^2 to their loss (0 = off)")
    # label skew: logit offsets from each site's own training-label counts inside its local cross-entropy (logit
    # adjustment / Balanced Softmax, FedLC; magnet_core.model.loss.label_offsets); the counts never leave the site
    label_adjustment: Literal["none", "logit-adjust", "fedlc"] = Field(
        "none", description="none, logit-adjust (Menon et al. 2021; tau 1 = Balanced Softmax) or fedlc (Zhang et "
                            "al. 2022)")
    label_tau: float = Field(0.0, ge=0, le=MAX_LABEL_TAU, allow_inf_nan=False,
                             description="strength tau of label-adjustment (0 = plain cross-entropy)")
    # class prototypes (FedProto, Tan et al. 2022): sites pull their fused embeddings towards the consortium's class
    # prototypes, which travel inside the model (magnet_core.model.prototypes), released only for classes >= k
    prototype_weight: float = Field(0.0, ge=0, le=MAX_PROTOTYPE_WEIGHT, allow_inf_nan=False,
                                    description="fedproto: weight lambda of the prototype term (0 = off)")
    # fedsgd (McMahan et al. 2017; with the centralized optimiser at the coordinator, Reddi et al. 2021): each site
    # returns one full-batch gradient step and the coordinator runs the preset's own Adam and schedule on their mean
    local_update: Literal["epochs", "gradient"] = Field(
        "epochs", description="epochs: sites train local-epochs of Adam; gradient: one full-batch step of size 1 "
                              "(the update is minus the site's gradient; needs local-epochs = 1)")
    server_optimizer: Literal["none", "adam", "yogi", "preset-adam"] = Field(
        "none", description="none: the aggregate is the new model; adam / yogi: a server step along it (server-lr, "
                            "betas, tau); preset-adam: the preset's training optimiser (Adam, its learning rate and "
                            "StepLR schedule counted in rounds, betas 0.9 / 0.999, eps 1e-8) along the mean update, "
                            "as centralized training steps along its gradient (server-lr, betas and tau unused)")
    server_lr: float = Field(0.01, gt=0, le=10, allow_inf_nan=False, description="server optimizer step size (eta)")
    server_beta1: float = Field(0.9, ge=0, lt=1, description="server optimizer first-moment decay")
    server_beta2: float = Field(0.99, ge=0, lt=1, description="server optimizer second-moment decay")
    server_tau: float = Field(1e-3, gt=0, le=1, allow_inf_nan=False,
                              description="server optimizer adaptivity (added to the root of the second moment)")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FederatedConfig":
        """From Flower's run config (kebab-case keys); a clear error names every bad key."""
        try:
            return cls.model_validate({k.replace("-", "_"): v for k, v in run_config.items()})
        except ValidationError as exc:
            bad = "; ".join(f"{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" if e["loc"]
                            else str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
            raise RunConfigError(f"invalid run config: {bad}") from None

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in self.model_dump().items()}

    # Settings that may change between a run and its resumption (how long to wait, where to write, how many
    # rounds in total); everything else defines the run.
    RESUMABLE_CHANGES: ClassVar[frozenset[str]] = frozenset({
        "num_server_rounds", "round_timeout", "straggler_grace", "out_dir", "resume", "overwrite", "min_sites",
        "fraction_train", "report", "signing_key", "signing_cert"})

    @model_validator(mode="after")
    def _dp_needs_the_mean(self) -> "FederatedConfig":
        if self.local_update == "gradient" and (self.local_epochs != 1 or self.prototype_weight > 0):
            raise ValueError("local-update='gradient' is one full-batch step per round: use local-epochs=1 and "
                             "prototype-weight=0")
        if self.local_update == "gradient" and (self.aggregation != "fedavg" or self.robust != "mean"):
            raise ValueError("local-update='gradient' (fedsgd) averages every site's gradient by its training "
                             "patients: use aggregation='fedavg' (per-modality weights would give a site that alone "
                             "holds a modality that encoder's whole step) and robust='mean' (a median drops honest "
                             "gradients of sites with a different label mix)")
        if self.local_update == "gradient" and self.server_optimizer == "none":
            raise ValueError("local-update='gradient' returns gradients, not trained weights: averaging them as the "
                             "new model is a gradient step of size 1; use server-optimizer='preset-adam' (fedsgd)")
        if self.screen == "gradient" and (self.local_update != "gradient" or self.trust_weighting):
            raise ValueError("the gradient update screen (update-screen='gradient', or 'auto' with "
                             "local-update='gradient') judges gradients and weights every accepted one by its "
                             "patients: local-update='epochs' and trust-weighting need update-screen='step'")
        if self.prototype_weight > 0 and (self.secagg or self.dp_clip_norm > 0):
            raise ValueError("prototype-weight > 0 (fedproto) aggregates in the clear only: its class prototypes would "
                             "share the update's clip (and DP noise) with the weights, and a secure sum hides them "
                             "from the coordinator's prototype check; use secagg=false and dp-clip-norm=0")
        if self.dp_clip_norm > 0 and self.robust not in ("mean", "auto"):
            raise ValueError("differential privacy bounds each site's influence on a mean: use robust='mean' (or "
                             "'auto', which is the mean under DP)")
        if self.secagg and self.robust not in ("mean", "auto"):
            raise ValueError("secure aggregation reveals only the sum: robust aggregation needs individual updates "
                             "(use robust='mean' or 'auto', which is the mean under secure aggregation)")
        if self.secagg_roster and not (self.secagg or self.secure_evaluation):
            raise ValueError("secagg-roster authenticates secure aggregation: set secagg=true (or "
                             "secure-evaluation=true) too")
        if self.secagg_graph == "neighbourhood" and self.dp_clip_norm > 0:
            raise ValueError("secagg-graph='neighbourhood' with DP: the distributed noise is calibrated to the "
                             "complete graph's threshold; use secagg-graph='full' with dp-clip-norm > 0")
        if self.secagg_graph_degree and (self.secagg_graph != "neighbourhood" or self.secagg_graph_degree % 2):
            raise ValueError("secagg-graph-degree needs secagg-graph='neighbourhood' and must be even")
        return self

    @property
    def screen(self) -> str:
        """The update screen the coordinator applies: 'step' or 'gradient' (``update_screen`` resolved)."""
        if self.update_screen != "auto":
            return self.update_screen
        return "gradient" if self.local_update == "gradient" else "step"

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k not in self.RESUMABLE_CHANGES}

    def fingerprint(self) -> str:
        return fingerprint(self.identity())


def preset_of(cfg: FederatedConfig) -> Preset:
    """The run's preset, its model carrying the class-prototype buffers when the run shares prototypes (every site
    builds the same model from the round config it is sent)."""
    return get_preset(cfg.preset, prototypes=cfg.prototype_weight > 0)
