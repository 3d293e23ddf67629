"""Personalization: only the chosen part moves, the best-validation weights come back, same seed same weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from magnet_core.cohort.generated import make_generated_cohort
from magnet_core.model.config import ModelConfig, TrainConfig
from magnet_core.model.personalize import (
    PARTS,
    part_prefixes,
    personalize,
    personalize_sites,
    split_for_personalization,
)
from magnet_core.model.site import SiteRuntime
from magnet_core.model.train import train_epochs

TINY = ModelConfig(hidden=16, heads=2, dropout=0.2)
CFG = TrainConfig(lr=5e-3, epochs=5)


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _runtime(name="site0", seed=1, n=120, **kw) -> SiteRuntime:
    cohort = make_generated_cohort(n=n, dims={"mRNA": 20, "miRNA": 10}, missing={"mRNA": 0.3, "miRNA": 0.2},
                                   signal=0.8, seed=seed, **kw)
    torch.manual_seed(seed)
    return SiteRuntime.build(name, cohort, TINY, sparsity=0.8)


@pytest.fixture(scope="module")
def site_and_global():
    """A site and 'global' weights: a few epochs of training on another generated site (not this one)."""
    torch.manual_seed(0)
    other = _runtime("other", seed=7)
    train_epochs(other.model, other.train, CFG, 5)
    return _runtime(), other.get_params()


def _moved(before: dict, after: dict) -> set[str]:
    return {k for k in before if not np.array_equal(before[k], after[k])}


@pytest.mark.parametrize("part", PARTS)
def test_only_the_chosen_part_changes_and_frozen_parameters_are_bit_identical(site_and_global, part):
    site, glob = site_and_global
    own_before = site.get_params()
    params, rec = personalize(site, glob, part, CFG, seed=3, max_epochs=15, patience=15)
    prefixes = part_prefixes(site.model, part)
    chosen = {k for k in glob if k.startswith(prefixes)}
    assert chosen == set(rec.trainable) and chosen
    assert rec.best_epoch > 0, rec  # from foreign weights, fine-tuning on the site's own patients helps
    moved = _moved(glob, params)
    assert moved and moved <= chosen, sorted(moved - chosen)
    for k in set(glob) - chosen:  # frozen: bit-identical, not merely close
        assert params[k].tobytes() == np.asarray(glob[k]).tobytes(), k
    if part == "head+graph":
        last = f"convs.{len(site.model.convs) - 1}."
        assert any(k.startswith(last) for k in moved) and not any(k.startswith("convs.0.") for k in moved)
    assert rec.val_loss_after < rec.val_loss_before
    assert not _moved(own_before, site.get_params())  # the runtime's model is untouched: personalize copies it


def test_returned_weights_are_the_best_validation_epoch(site_and_global):
    """Run with patience 1 past the best epoch: the returned weights equal those of a run stopped at best_epoch."""
    site, glob = site_and_global
    long, rec = personalize(site, glob, "head", CFG.model_copy(update={"lr": 0.05}), seed=5, max_epochs=40,
                            patience=3)
    assert 0 < rec.best_epoch < rec.epochs_run <= 40, rec  # lr 0.05 overfits: validation loss turns up
    assert rec.epochs_run == rec.best_epoch + 3 or rec.epochs_run == 40
    cut, rec_cut = personalize(site, glob, "head", CFG.model_copy(update={"lr": 0.05}), seed=5,
                               max_epochs=rec.best_epoch, patience=40)
    assert rec_cut.best_epoch == rec.best_epoch and rec_cut.val_loss_after == rec.val_loss_after
    for k in long:
        assert np.array_equal(long[k], cut[k]), k
    assert _moved(glob, long)  # and they are not the global ones


def test_no_epoch_better_than_the_global_weights_returns_them(site_and_global):
    site, glob = site_and_global
    params, rec = personalize(site, glob, "head", CFG.model_copy(update={"lr": 5.0}), seed=1, max_epochs=3,
                              patience=3)
    assert rec.best_epoch == 0, rec  # a huge step ruins the head at once: the global weights stay
    assert rec.epochs_run == 3 and not _moved(glob, params) and rec.val_loss_after == rec.val_loss_before


def test_deterministic_for_a_seed_and_seed_dependent(site_and_global):
    site, glob = site_and_global
    a, ra = personalize(site, glob, "head+graph", CFG, seed=11, max_epochs=6, patience=6)
    b, rb = personalize(site, glob, "head+graph", CFG, seed=11, max_epochs=6, patience=6)
    c, _ = personalize(site, glob, "head+graph", CFG, seed=12, max_epochs=6, patience=6)
    assert ra == rb and not _moved(a, b)
    assert _moved(a, c)  # dropout draws depend on the seed


def test_validation_is_the_site_val_split_or_a_seeded_stratified_carve(site_and_global):
    site, _ = site_and_global
    fit, val, source = split_for_personalization(site, seed=3)
    split = site.cohort.split[site.cohort.split_indices("train", "val")]
    assert source == "site split val" and (split[val] == "val").all() and (split[fit] == "train").all()
    assert len(fit) + len(val) == site.train.n
    # a site without val patients: 20 % carved from its training patients, stratified, the same for a seed
    cohort = site.cohort
    no_val = dataclasses.replace(cohort, split=np.where(cohort.split == "val", "train", cohort.split))
    torch.manual_seed(0)
    bare = SiteRuntime.build("bare", no_val, TINY, sparsity=0.8)
    fit2, val2, source2 = split_for_personalization(bare, seed=3)
    assert source2.startswith("carved") and "stratified" in source2
    assert len(val2) == round(0.2 * bare.train.n) and not set(fit2) & set(val2)
    y = bare.train.y.numpy()
    assert abs(y[val2].mean() - y.mean()) < 0.1
    again = split_for_personalization(bare, seed=3)
    assert np.array_equal(again[1], val2) and not np.array_equal(split_for_personalization(bare, seed=4)[1], val2)


def test_personalize_sites_gives_each_site_its_own_weights(site_and_global):
    site, glob = site_and_global
    second = _runtime("site1", seed=2)
    own, records = personalize_sites([site, second], glob, "head", CFG, seed=3, max_epochs=5, patience=5)
    assert list(own) == ["site0", "site1"] and [r.site for r in records] == ["site0", "site1"]
    assert _moved(own["site0"], own["site1"])
    with pytest.raises(ValueError, match="unknown part"):
        personalize(site, glob, "encoders", CFG, seed=3)
