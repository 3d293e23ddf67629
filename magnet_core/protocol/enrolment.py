"""What the coordinator holds about the sites it accepts replies from, and the checks of a reply against it."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

from magnet_core.cohort.manifest import EnrolledSite as SiteFacts
from magnet_core.protocol.messages import EvalReply, TrainReply

__all__ = ["Enrolment", "SiteFacts", "check_eval_against", "check_train_against"]


class Enrolment(BaseModel):
    """Every site the coordinator accepts replies from, by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sites: dict[str, SiteFacts]


def check_train_against(reply: TrainReply, facts: SiteFacts | None) -> list[str]:
    """Problems of a (contract-valid) training reply against what the site enrolled with."""
    if facts is None:
        return [f"site {reply.site!r} is not enrolled"]
    problems = []
    if reply.num_examples > facts.train:
        problems.append(f"num-examples {reply.num_examples} exceeds the {facts.train} training patients "
                        f"site {reply.site!r} enrolled with")
    for m, c in reply.modality_counts.items():
        bound = facts.modalities.get(m, facts.train)
        if c > bound:
            problems.append(f"count-{m} {c} exceeds the enrolled {bound}")
    return problems


def check_eval_against(reply: EvalReply, facts: SiteFacts | None) -> list[str]:
    """Problems of a (contract-valid) evaluation reply against the site's enrolled test size."""
    if facts is None:
        return [f"site {reply.site!r} is not enrolled"]
    total = max((int(np.asarray(cm).sum()) for cm in reply.confusion.values()), default=0)
    if total > facts.test:
        return [f"reports {total} test patients, more than the {facts.test} site {reply.site!r} enrolled with"]
    return []
