"""A site's own policy: a TOML file the hospital writes; every request is checked against it before any work, and
every refusal names the policy line it enforces. The coordinator sends requests, never policy."""

# The checks are pure functions of (policy, decoded request, what the site remembers, privacy spent); the caller
# (client/guard.py) holds the site's state lock, runs them, then commits the request to the site's memory.

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from magnet_core.cohort.manifest import DEFAULT_MIN_COUNT, DEFAULT_SEED, MIN_COUNT_FLOOR

POLICY_KEY = "site-policy"  # node config: path of the site's policy file (the SuperNode's command line, the site's)

# ------------------------------------------------------------------------------------------------ the policy


class Range(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    low: int
    high: int

    @model_validator(mode="before")
    @classmethod
    def _pair(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            if len(v) != 2:
                raise ValueError(f"a range is [low, high], got {list(v)}")
            return {"low": v[0], "high": v[1]}
        return v

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        return self

    def __contains__(self, value: int) -> bool:
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return f"[{self.low}, {self.high}]"


class SecureAggregation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    train: bool = Field(True, description="answer training only inside a secure sum (never a clear update)")
    evaluate: bool = Field(False, description="answer no clear evaluation: evaluate only inside a secure sum "
                           "(secure evaluation, evaluate.secagg: the counts masked, k applied to the consortium's "
                           "sum; a plain 'evaluate' is refused)")
    prepare: bool = Field(True, description="send preparation statistics only inside a secure sum")
    authenticated: bool = Field(False, description="take part only in authenticated secure sums (signed key adverts "
                                "checked against this site's roster, a signed transcript before unmasking); training "
                                "and preparation statistics outside one are refused. Absent from a file: false "
                                "(policies written before it); `site policy init` writes true")


class Privacy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_noise_multiplier: float = Field(1.0, ge=0, allow_inf_nan=False,
                                        description="train only with this site's own DP noise, multiplier >= this")
    epsilon_budget: float | None = Field(10.0, gt=0, allow_inf_nan=False,
                                         description="cumulative epsilon at delta per consortium, across runs "
                                                     "(inf in the file: no budget, no DP required by it)")
    delta: float = Field(1e-5, gt=0, lt=1)
    colluding_sites: int = Field(0, ge=0, description="sites assumed to collude with the coordinator: they give it "
                                 "their noise piece, and both shares of a site's secrets in a secure sum (the site "
                                 "then refuses a sum whose threshold t has 2t <= share holders + colluding sites)")
    accounting: Literal["rdp", "exact"] = Field("rdp", description="RDP (conservative) or exact GDP conversion")

    @field_validator("epsilon_budget", mode="before")
    @classmethod
    def _no_budget(cls, v: Any) -> Any:
        return None if isinstance(v, float) and v == math.inf else v


class Ranges(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: Range = Field(default_factory=lambda: Range(low=1, high=100))
    local_epochs: Range = Field(default_factory=lambda: Range(low=1, high=20))
    histogram_bins: Range = Field(default_factory=lambda: Range(low=2, high=20))


class Rounds(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    never_repeat: bool = Field(True, description="train once per round number, rounds rising, secure round ids once")
    train_once_per_model: bool = Field(True, description="never train twice from the same global model (by hash)")


class Evaluation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    only_current_round: bool = Field(True, description="evaluate only the round this site trained last, once")
    once_per_model: bool = Field(True, description="a model (sha256 of its weights) is evaluated at most once")
    next_train_from_evaluated: bool = Field(
        True, description="the next round must train from the model evaluated (the global model, not a probe)")
    max_per_consortium: int | None = Field(1000, ge=0, description="evaluations answered per consortium, all runs")


class Preparation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    split_seed: int = Field(DEFAULT_SEED, description="the seed of this site's own train/val/test split")
    split_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)
    use_split_file: bool = Field(True, description="preparation: the site's raw split.csv, when it has one, wins over "
                                 "the seed (the prepared folder's split.csv, written by the preparation, is the split "
                                 "the site then trains and evaluates on)")
    def split(self) -> dict[str, Any]:
        """This site's own split of its prepared data folder, as :func:`magnet_core.cohort.validation.
        load_site_cohort` takes it: the folder's split.csv when it has one (the preparation wrote it from these
        lines: ``use_split_file`` chose there between a raw split.csv and the seed, and the raw patients' own
        modalities grouped them), else ``split_seed`` and ``split_ratios``. The split it trains, validates and
        evaluates on, whatever a run's seed."""
        return dict(seed=self.split_seed, ratios=tuple(self.split_ratios), use_split_file=True)

    once_per_consortium: bool = Field(
        True, description="release preparation statistics (clear or secure) to a consortium once: only the very same "
        "request again (same participants, layout, split and thresholds, by hash) is answered, so a retry works; "
        "any other is refused (two sums over different sets of sites give one site's statistics by difference). "
        "A secure sum retried is checked by the enrolled names of its sites (the key book the site verified): the "
        "site masks its statistics only into a sum over exactly the sites of the sum it released, helps unmask only "
        "that sum, and masks into no second sum at all if it never saw the first one's unmasking")

    @model_validator(mode="after")
    def _ratios(self) -> "Preparation":
        r = self.split_ratios
        if min(r) < 0 or r[0] <= 0 or r[2] <= 0 or abs(sum(r) - 1) > 1e-9:
            raise ValueError(f"split_ratios must be train/val/test fractions summing to 1, got {list(r)}")
        return self


class SitePolicy(BaseModel):
    """What this site allows, whatever the coordinator asks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    consortium: str = Field(min_length=1, max_length=128, description="the consortium this policy is for")
    state_dir: str = Field("site-state", description="the site's own folder (audit log, privacy spent, memory); "
                                                     "relative to the policy file")
    min_count: int = Field(DEFAULT_MIN_COUNT, ge=MIN_COUNT_FLOOR, description="k: the site's own minimum count")
    release_class_prototypes: bool = Field(
        False, description="answer fedproto rounds: return, inside the update, the mean fused embedding of each class "
        "with at least k training patients (magnet_core.model.prototypes); false: such a round is refused")
    release_gradients: bool = Field(
        False, description="answer single-step rounds: fedsgd (local update 'gradient': one full-batch gradient "
        "step, whose update is this site's exact gradient at the model the coordinator sent) and, in the clear, one "
        "local epoch (a fresh Adam's one step: the gradient's signs, and its size where it is near Adam's eps). A "
        "coordinator that crafts that model can read more from one gradient than from epochs of local training "
        "(Fowl et al., ICLR 2022; Boenisch et al., EuroS&P 2023); false: such a round is refused")
    secure_aggregation: SecureAggregation = Field(default_factory=SecureAggregation)
    privacy: Privacy = Field(default_factory=Privacy)
    ranges: Ranges = Field(default_factory=Ranges)
    rounds: Rounds = Field(default_factory=Rounds)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    preparation: Preparation = Field(default_factory=Preparation)
    # where it came from (not part of the file): its path and the line of every key, for refusals
    source: str = Field("", exclude=True)
    lines: dict[str, int] = Field(default_factory=dict, exclude=True)

    def where(self, rule: str) -> str:
        """``<file> line N (rule = value)`` for a dotted rule name such as ``privacy.epsilon_budget``."""
        value: Any = self
        for part in rule.split("."):
            value = getattr(value, part)
        shown = str(value) if isinstance(value, Range) else repr(value)
        line = self.lines.get(rule)
        at = f"{self.source or 'site policy'}" + (f" line {line}" if line else " (default)" if self.source else "")
        return f"{at}: {rule} = {shown}"

    def state_path(self) -> Path:
        p = Path(self.state_dir).expanduser()
        return p if p.is_absolute() or not self.source else Path(self.source).parent / p


class PolicyError(ValueError):
    """A policy file that cannot be read; the message names the file, line or key."""


class PolicyRefusal(Exception):
    """A request refused by the site's policy: ``rule`` (dotted name), ``where`` (file and line), ``reason``."""

    def __init__(self, policy: SitePolicy, rule: str, reason: str):
        self.rule, self.reason, self.where = rule, reason, policy.where(rule)
        super().__init__(f"refused by site policy ({self.where}): {reason}")


_SECTION = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


def key_lines(text: str) -> dict[str, int]:
    """Line number (1-based) of every ``key = value`` of a TOML text, by dotted name (``section.key``)."""
    out, section = {}, ""
    for n, line in enumerate(text.splitlines(), 1):
        m = _SECTION.match(line)
        if m:
            section = m.group(1)
            continue
        m = _KEY.match(line)
        if m:
            out[f"{section}.{m.group(1)}" if section else m.group(1)] = n
    return out


def parse_policy(text: str, source: str = "") -> SitePolicy:
    """A policy from TOML text; PolicyError names the file, the line or the key and what is wrong."""
    name = source or "site policy"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{name}: not valid TOML ({exc})") from None
    lines = key_lines(text)
    try:
        return SitePolicy.model_validate({**raw, "source": source, "lines": lines})
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
            line = lines.get(key) or lines.get(key.rsplit(".", 1)[0])
            parts.append(f"{name}{f' line {line}' if line else ''}: {key or 'policy'}: {err['msg']}")
        raise PolicyError("; ".join(parts)) from None


def load_policy(path: str | Path) -> SitePolicy:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the site policy ({exc.strerror or exc})") from None
    return parse_policy(text, str(path.resolve()))


# ------------------------------------------------------------------------------------------------ requests


class SiteRequest(BaseModel):
    """What one coordinator message asks of the site, as the site decoded it (client/guard.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(description="the Flower message type: train, evaluate, train.secagg, query.prepare_stats, ...")
    run: int = Field(description="the Flower run id")
    round: int | None = None
    secure: bool = False
    local_epochs: int | None = None
    local_update: str | None = Field(None, description="training: epochs (local training) or gradient (fedsgd)")
    histogram_bins: int | None = None
    min_count: int | None = None
    prototype_weight: float | None = Field(None, description="training: > 0 asks for the class prototypes")
    run_seed: int | None = Field(None, description="training and evaluation: the run's seed")
    split_follows_run: bool = Field(True, description="training and evaluation: the site's patients are split by "
                                    "the run's seed (a simulated site); a deployed site (node config data-dir) splits "
                                    "by its own preparation lines instead (client/handlers.py own_split)")
    dp_noise_multiplier: float | None = Field(None, description="the site's own noise (distributed DP) if any")
    secagg_threshold: int | None = None
    secagg_holders: int | None = Field(None, description="secure sums, stage 0: the sites holding shares of one "
                                       "site's secrets (all sites; neighbourhood graph: a site and its neighbours)")
    secure_round_id: str | None = None
    model_sha256: str | None = None
    split_seed: int | None = None
    split_ratios: tuple[float, float, float] | None = None
    use_split_file: bool | None = None
    preparation_sha256: str | None = Field(None, description="preparation statistics: sha256 of what defines the "
                                           "release (client/guard.py preparation_digest)")
    participants: tuple[str, ...] | None = Field(None, description="preparation statistics: who the request says "
                                                 "takes part (simulated sites, secure-sum site ids)")
    authenticated: bool | None = Field(None, description="secure sums: stage 0, whether this site holds its roster and "
                                       "identity key (it signs and checks); a key book, whether every advert is signed")
    sum_round_id: str | None = Field(None, description="masking / unmasking: the secure sum the message belongs to")
    sum_sites: tuple[str, ...] | None = Field(None, description="masking: the sites whose shares this site holds "
                                              "(who can end up in the sum); unmasking: the survivors. Enrolled names "
                                              "from the key book the site checked (client/guard.py sum_sites)")

    @property
    def training(self) -> bool:
        return self.kind in ("train", "train.secagg")

    @property
    def evaluation(self) -> bool:
        return self.kind in ("evaluate", "evaluate.secagg")

    @property
    def preparation(self) -> bool:
        return self.kind in ("query.prepare_stats", "query.prepare_secagg", "query.prepare_apply")


class RunMemory(BaseModel):
    """What the site answered in one run."""

    model_config = ConfigDict(extra="forbid")

    trained_rounds: list[int] = Field(default_factory=list)
    evaluated_rounds: list[int] = Field(default_factory=list)
    last_evaluated_model: str | None = None


class PreparationRelease(BaseModel):
    """One kind of preparation statistics the site released to a consortium: what defined it."""

    model_config = ConfigDict(extra="forbid")

    request_sha256: str
    participants: list[str] = Field(default_factory=list)
    run: int
    answered: int = Field(1, description="times answered (the first and identical retries)")
    sums: list[str] = Field(default_factory=list, description="secure preparation: the round ids of the secure sums "
                            "this site started for it (stage 0 answered)")
    masked_with: list[str] | None = Field(None, description="the sites (enrolled names) that held shares of the first "
                                          "secure sum this site masked its statistics into")
    masked_round: str | None = Field(None, description="that sum's round id")
    survivors: list[str] | None = Field(None, description="the sites of the sum this site helped unmask: the one sum "
                                        "of its statistics the coordinator holds")


class ConsortiumMemory(BaseModel):
    """What the site answered to one consortium, across runs (kept in its state folder)."""

    model_config = ConfigDict(extra="forbid")

    runs: dict[str, RunMemory] = Field(default_factory=dict)
    trained_models: list[str] = Field(default_factory=list)
    evaluated_models: list[str] = Field(default_factory=list)
    secure_round_ids: list[str] = Field(default_factory=list)
    evaluations: int = 0
    preparations: dict[str, PreparationRelease] = Field(
        default_factory=dict, description="per message kind (query.prepare_stats / query.prepare_secagg)")

    def run(self, run: int) -> RunMemory:
        return self.runs.setdefault(str(run), RunMemory())

    def preparation_sum(self, round_id: str | None) -> PreparationRelease | None:
        """The preparation release whose secure sum ``round_id`` is, or None (a training or evaluation sum)."""
        return next((r for r in self.preparations.values() if round_id is not None and round_id in r.sums), None)


# ------------------------------------------------------------------------------------------------ checks


def check_secure(policy: SitePolicy, req: SiteRequest) -> None:
    sa = policy.secure_aggregation
    if req.training and sa.train and not req.secure:
        raise PolicyRefusal(policy, "secure_aggregation.train", "this site trains only inside a secure sum; a plain "
                            "'train' message would send its update in the clear")
    if req.evaluation and sa.evaluate and not req.secure:
        raise PolicyRefusal(policy, "secure_aggregation.evaluate", "this site releases no clear evaluation; it "
                            "evaluates only inside a secure sum (run with secure-evaluation=true)")
    if req.kind == "query.prepare_stats" and sa.prepare and not req.secure:
        raise PolicyRefusal(policy, "secure_aggregation.prepare", "this site sends preparation statistics only "
                            "through a secure sum; run the preparation with secagg=true")
    if sa.authenticated:
        if (req.training or req.kind == "query.prepare_stats") and not req.secure:
            raise PolicyRefusal(policy, "secure_aggregation.authenticated", "this site answers training and "
                                "preparation statistics only inside an authenticated secure sum; the request "
                                "would send them in the clear")
        if req.authenticated is False and req.kind == "query.secagg_share":
            raise PolicyRefusal(policy, "secure_aggregation.authenticated", "the key book holds key adverts without "
                                "an enrolled site's signature: this site takes part only in authenticated secure sums "
                                "(every other site's keys signed and checked against its own roster)")
        if req.authenticated is False:
            raise PolicyRefusal(policy, "secure_aggregation.authenticated", "this site takes part only in "
                                "authenticated secure sums, but holds no roster and identity key to sign and check "
                                "them with (the site worker's --secagg-roster / --identity-key)")


def check_threshold(policy: SitePolicy, req: SiteRequest) -> None:
    """The survivor list of an unmask request is not signed: a coordinator can tell some sites that a site survived
    (they reveal shares of its self-mask seed) and others that it dropped (shares of its mask key). Honest share
    holders reveal one of the two, colluding ones both, so the coordinator gets both, and that site's input, when
    2t <= holders + colluders. The site refuses such a sum at stage 0 for the colluders its policy assumes."""
    c, t, n = policy.privacy.colluding_sites, req.secagg_threshold, req.secagg_holders
    if c and t and n and 2 * t <= n + c:
        raise PolicyRefusal(policy, "privacy.colluding_sites", f"the secure sum's threshold t = {t} with {n} share "
                            f"holders and {c} colluding sites assumed: 2t <= {n} + {c}, so different survivor lists "
                            "sent to different sites could unmask one site's input; this site needs t > "
                            f"{(n + c) // 2} (fewer allowed dropouts)")


def check_ranges(policy: SitePolicy, req: SiteRequest) -> None:
    r = policy.ranges
    if (req.training or req.evaluation) and req.round is not None and req.round not in r.rounds:
        raise PolicyRefusal(policy, "ranges.rounds", f"round {req.round} is outside the allowed {r.rounds}")
    if req.local_epochs is not None and req.training and req.local_epochs not in r.local_epochs:
        raise PolicyRefusal(policy, "ranges.local_epochs",
                            f"{req.local_epochs} local epochs are outside the allowed {r.local_epochs}")
    if req.histogram_bins is not None and req.evaluation and req.histogram_bins not in r.histogram_bins:
        raise PolicyRefusal(policy, "ranges.histogram_bins",
                            f"{req.histogram_bins} histogram bins are outside the allowed {r.histogram_bins}")


def check_min_count(policy: SitePolicy, req: SiteRequest) -> None:
    releases_counts = req.evaluation or req.preparation or (req.training and bool(req.prototype_weight))
    if releases_counts and req.min_count is not None and req.min_count < policy.min_count:
        raise PolicyRefusal(policy, "min_count", f"the request asks for k = {req.min_count}, below this site's "
                            f"minimum count {policy.min_count} (the larger of the site's and the consortium's holds)")


def check_prototypes(policy: SitePolicy, req: SiteRequest) -> None:
    if req.training and req.prototype_weight and not policy.release_class_prototypes:
        raise PolicyRefusal(policy, "release_class_prototypes", f"the round asks for class prototypes (prototype "
                            f"weight {req.prototype_weight:g}): this site releases no per-class statistic of its "
                            "training patients")
    seed = policy.preparation.split_seed
    if req.training and req.prototype_weight and req.split_follows_run and req.run_seed is not None \
            and req.run_seed != seed:
        raise PolicyRefusal(policy, "preparation.split_seed", f"a class-prototype round at run seed {req.run_seed}: "
                            f"this site releases class means only over its own split (seed {seed}), so that two runs "
                            "never average two different sets of its patients (their difference would describe "
                            "the few patients between them)")


def check_gradients(policy: SitePolicy, req: SiteRequest) -> None:
    if not req.training or policy.release_gradients:
        return
    if req.local_update == "gradient":
        raise PolicyRefusal(policy, "release_gradients", "the round asks for one full-batch gradient step (fedsgd): "
                            "its update would be this site's exact gradient at a model the coordinator chose")
    if not req.secure and req.local_epochs == 1:
        raise PolicyRefusal(policy, "release_gradients", "one local epoch in the clear is one full-batch step of a "
                            "fresh Adam, whose update gives back the signs of this site's gradient at a model the "
                            "coordinator chose and, where the gradient is near Adam's eps (a crafted model can make it "
                            "so), its size; ask for 2 or more local epochs, or for a secure sum")


def check_rounds(policy: SitePolicy, req: SiteRequest, memory: ConsortiumMemory) -> None:
    rules = policy.rounds
    if rules.never_repeat and req.secure_round_id is not None and req.secure_round_id in memory.secure_round_ids:
        raise PolicyRefusal(policy, "rounds.never_repeat", f"secure round id {req.secure_round_id!r} was already "
                            "answered: a repeated secure sum without one site would reveal that site's input")
    if not req.training:
        return
    run = memory.runs.get(str(req.run), RunMemory())
    if rules.never_repeat and req.round is not None and run.trained_rounds:
        last = max(run.trained_rounds)
        if req.round in run.trained_rounds:
            raise PolicyRefusal(policy, "rounds.never_repeat", f"round {req.round} of run {req.run} was already "
                                "trained: this site answers each round once")
        if req.round < last:
            raise PolicyRefusal(policy, "rounds.never_repeat", f"round {req.round} of run {req.run} comes after "
                                f"round {last}: rounds only rise")
    if rules.train_once_per_model and req.model_sha256 in memory.trained_models:
        raise PolicyRefusal(policy, "rounds.train_once_per_model", f"this site already trained from the model "
                            f"{req.model_sha256[:16]}...: the same model twice would reveal its update by difference")


def check_privacy(policy: SitePolicy, req: SiteRequest, spent_with: float | None) -> None:
    """``spent_with``: epsilon this consortium would have spent after this round (None: no DP in the request)."""
    p = policy.privacy
    if not req.training:
        return
    needs_noise = p.min_noise_multiplier > 0 or p.epsilon_budget is not None
    if needs_noise and (req.dp_noise_multiplier is None or not req.secure):
        rule = "privacy.min_noise_multiplier" if p.min_noise_multiplier > 0 else "privacy.epsilon_budget"
        raise PolicyRefusal(policy, rule, "this site trains only with its own differential-privacy noise inside a "
                            "secure sum; the request "
                            + ("is not a secure round" if not req.secure else "asks for no noise"))
    z = req.dp_noise_multiplier
    if z is not None and z < p.min_noise_multiplier:
        raise PolicyRefusal(policy, "privacy.min_noise_multiplier",
                            f"the round's noise multiplier {z:g} is below this site's floor")
    if p.epsilon_budget is not None and spent_with is not None and not spent_with <= p.epsilon_budget:
        raise PolicyRefusal(policy, "privacy.epsilon_budget",
                            f"this round would bring consortium {policy.consortium!r} to epsilon "
                            f"{spent_with:.4g} at delta {p.delta:g}, beyond the site's budget across all runs")


def check_evaluation(policy: SitePolicy, req: SiteRequest, memory: ConsortiumMemory) -> None:
    ev = policy.evaluation
    run = memory.runs.get(str(req.run), RunMemory())
    if req.training and ev.next_train_from_evaluated and run.last_evaluated_model is not None \
            and req.model_sha256 != run.last_evaluated_model:
        raise PolicyRefusal(policy, "evaluation.next_train_from_evaluated",
                            f"the model sent for training ({str(req.model_sha256)[:16]}...) is not the global model "
                            f"this site evaluated last in run {req.run} ({run.last_evaluated_model[:16]}...)")
    if not req.evaluation:
        return
    if ev.max_per_consortium is not None and memory.evaluations >= ev.max_per_consortium:
        raise PolicyRefusal(policy, "evaluation.max_per_consortium",
                            f"this site already answered {memory.evaluations} evaluations of this consortium")
    if ev.only_current_round:
        current = max(run.trained_rounds) if run.trained_rounds else None
        if req.round in run.evaluated_rounds:
            raise PolicyRefusal(policy, "evaluation.only_current_round",
                                f"round {req.round} of run {req.run} was already evaluated: once per round")
        if current is None or req.round != current:
            raise PolicyRefusal(policy, "evaluation.only_current_round",
                                f"evaluation of round {req.round}, but the current round of run {req.run} is "
                                f"{current if current is not None else 'none (this site has not trained in it)'}")
    if ev.once_per_model and req.model_sha256 in memory.evaluated_models:
        raise PolicyRefusal(policy, "evaluation.once_per_model",
                            f"the model {str(req.model_sha256)[:16]}... was already evaluated by this site")


def check_preparation(policy: SitePolicy, req: SiteRequest, memory: ConsortiumMemory) -> None:
    if not req.preparation:
        return
    own = policy.preparation
    if req.split_seed is not None and req.split_seed != own.split_seed:
        raise PolicyRefusal(policy, "preparation.split_seed", f"the coordinator asks for split seed "
                            f"{req.split_seed}; this site prepares only from its own split")
    if req.split_ratios is not None and any(not math.isclose(a, b, abs_tol=1e-12)
                                            for a, b in zip(req.split_ratios, own.split_ratios)):
        raise PolicyRefusal(policy, "preparation.split_ratios", f"the coordinator asks for split ratios "
                            f"{list(req.split_ratios)}; this site prepares only from its own split")
    if req.use_split_file is not None and req.use_split_file != own.use_split_file:
        raise PolicyRefusal(policy, "preparation.use_split_file", f"the coordinator asks for use_split_file = "
                            f"{req.use_split_file}; this site prepares only from its own split")
    before = memory.preparations.get(req.kind)
    if own.once_per_consortium and req.preparation_sha256 is not None and before is not None \
            and req.preparation_sha256 != before.request_sha256:
        raise PolicyRefusal(policy, "preparation.once_per_consortium", f"this site already released its preparation "
                            f"statistics ({req.kind}) to consortium {policy.consortium!r} in run {before.run} for "
                            f"another request (sha256 {before.request_sha256[:16]}..., participants "
                            f"{before.participants}; now {req.preparation_sha256[:16]}..., participants "
                            f"{list(req.participants or ())}): a second release over other sites or settings would "
                            "give a site's statistics by difference; only the same request is answered again")


def _differs(a: list[str], b: list[str]) -> str:
    return ", ".join(repr(x) for x in sorted(set(a) ^ set(b)))


def check_preparation_sum(policy: SitePolicy, req: SiteRequest, memory: ConsortiumMemory) -> None:
    """A secure preparation sum retried (the same request, answered again at stage 0) must be over exactly the sites
    of the sum this site released: it masks its statistics only into a sum whose share holders are those sites, and
    helps unmask only a sum over them. Names, not secure-sum ids (the coordinator hands ids out)."""
    release = memory.preparation_sum(req.sum_round_id)
    if not policy.preparation.once_per_consortium or release is None or req.sum_sites is None:
        return
    rule, sites, rid = "preparation.once_per_consortium", sorted(req.sum_sites), req.sum_round_id
    if release.survivors is None:
        if release.masked_round not in (None, rid):
            raise PolicyRefusal(policy, rule, f"this site's masked statistics already went into secure sum "
                                f"{release.masked_round!r} over {release.masked_with}, whose unmasking it never saw: "
                                "the coordinator may have taken a sum of those sites with or without any of them, "
                                f"so this site masks its statistics into no second sum (now asked for {rid!r} over "
                                f"{sites})")
        return
    if sites == release.survivors:
        return
    step = "mask its statistics into" if req.kind == "query.secagg_mask" else "help unmask"
    raise PolicyRefusal(policy, rule, f"this site released its preparation statistics in the secure sum over "
                        f"{release.survivors}; asked to {step} secure sum {rid!r} over {sites}: the two sums "
                        f"differ by {_differs(sites, release.survivors)}, whose statistics their difference would "
                        "give; a retry is answered only over exactly the same sites")


def check_request(policy: SitePolicy, req: SiteRequest, memory: ConsortiumMemory, spent_with: float | None) -> None:
    """Every check, in the order a data-protection officer would read them; the first refusal is raised."""
    check_secure(policy, req)
    check_threshold(policy, req)
    check_ranges(policy, req)
    check_min_count(policy, req)
    check_prototypes(policy, req)
    check_gradients(policy, req)
    check_preparation(policy, req, memory)
    check_preparation_sum(policy, req, memory)
    check_rounds(policy, req, memory)
    check_evaluation(policy, req, memory)
    check_privacy(policy, req, spent_with)


def remember(memory: ConsortiumMemory, req: SiteRequest) -> None:
    """Record an accepted request (before it is answered: a failed answer still used its round)."""
    if req.secure_round_id is not None:
        memory.secure_round_ids.append(req.secure_round_id)
    run = memory.run(req.run)
    if req.preparation_sha256 is not None:
        before = memory.preparations.get(req.kind)
        if before is None:
            memory.preparations[req.kind] = PreparationRelease(
                request_sha256=req.preparation_sha256, participants=list(req.participants or ()), run=req.run)
        elif before.request_sha256 == req.preparation_sha256:
            before.answered += 1
        if req.secure_round_id is not None:
            memory.preparations[req.kind].sums.append(req.secure_round_id)
    release = memory.preparation_sum(req.sum_round_id)
    if release is not None and req.sum_sites is not None:  # recorded before answering: a failed step still counts
        if req.kind == "query.secagg_mask" and release.masked_with is None:
            release.masked_with, release.masked_round = sorted(req.sum_sites), req.sum_round_id
        if req.kind == "query.secagg_unmask" and release.survivors is None:
            release.survivors = sorted(req.sum_sites)
    if req.training:
        if req.round is not None:
            run.trained_rounds.append(req.round)
        if req.model_sha256:
            memory.trained_models.append(req.model_sha256)
        run.last_evaluated_model = None
    if req.evaluation:
        memory.evaluations += 1
        if req.round is not None:
            run.evaluated_rounds.append(req.round)
        if req.model_sha256:
            memory.evaluated_models.append(req.model_sha256)
            run.last_evaluated_model = req.model_sha256


# ------------------------------------------------------------------------------------------------ the file


TEMPLATE = """\
# magnet-fl site policy: written by the hospital, read only by this site's own code. The coordinator sends
# requests, never policy: a request that asks for more than this file allows is refused, naming the line.
consortium = {consortium}    # the consortium this policy is for; budgets and memory are kept per consortium
state_dir = {state_dir}    # this site's own folder: audit log, privacy spent, round memory (relative to this file)
min_count = {min_count}    # k: no release describes fewer patients; the larger of this and the consortium's holds
release_class_prototypes = false    # true: answer fedproto rounds (class means of >= k patients, inside the update)
release_gradients = false    # true: answer single-step rounds (fedsgd's gradient; one local epoch in the clear)

[secure_aggregation]
train = true    # training only inside a secure sum: a plain 'train' message is refused
evaluate = false    # true: evaluation only inside a secure sum (secure-evaluation); a plain 'evaluate' is refused
prepare = true    # preparation statistics only inside a secure sum
authenticated = {authenticated}    # only authenticated secure sums: keys signed, checked against the site's roster

[privacy]
min_noise_multiplier = 1.0    # train only with this site's own noise, multiplier >= this
epsilon_budget = 10.0    # cumulative epsilon per consortium across runs; rounds beyond it are refused (inf: none)
delta = 1e-05
colluding_sites = 0    # sites assumed to collude with the coordinator (DP noise; secure sums need 2t > holders + this)
accounting = "rdp"    # "rdp" (conservative) or "exact"

[ranges]
rounds = [1, 100]
local_epochs = [1, 20]
histogram_bins = [2, 20]

[rounds]
never_repeat = true    # each round number once per run, rising; a secure round id once ever
train_once_per_model = true    # never train twice from the same global model (sha256 of its weights)

[evaluation]
only_current_round = true    # evaluate only the round this site trained last, once
once_per_model = true    # a model (sha256 of its weights) is evaluated at most once
next_train_from_evaluated = true    # the next round must train from the model evaluated
max_per_consortium = 1000    # evaluations answered per consortium, all runs together

[preparation]
split_seed = {split_seed}    # this site's own split, for preparation, training and evaluation, whatever the run's seed
split_ratios = [0.7, 0.1, 0.2]
use_split_file = true
once_per_consortium = true    # release preparation statistics once per consortium; only the same request again
"""


def template(consortium: str, state_dir: str = "site-state", min_count: int = DEFAULT_MIN_COUNT,
             split_seed: int = DEFAULT_SEED, authenticated: bool = True) -> str:
    text = TEMPLATE.format(consortium=json.dumps(consortium), state_dir=json.dumps(state_dir), min_count=min_count,
                           split_seed=split_seed, authenticated=str(bool(authenticated)).lower())
    parse_policy(text)  # the template must always be a valid policy
    return text
