"""Admission alone: the capacity formula, per-engine tickets and their expiry, and thread safety."""

import random
import threading

import pytest

from asyncrl.queue.admission import Admission, is_stale


def test_capacity_is_k_plus_version_plus_one_steps_minus_usable_and_running():
    admission = Admission(max_staleness=2, groups_per_step=4)
    assert admission.capacity(0) == 12
    admission.grant(0, 5, "e0")
    admission.settle(accepted=True, engine="e0")
    assert (admission.usable, admission.running, admission.capacity(0), admission.capacity(1)) == (1, 4, 7, 11)


def test_stale_is_more_than_k_versions_behind():
    assert not is_stale(learner_version=3, behaviour_version=2, max_staleness=1)
    assert is_stale(learner_version=3, behaviour_version=1, max_staleness=1)


def test_rejected_group_frees_its_ticket_without_becoming_usable():
    admission = Admission(0, 2)
    admission.grant(0, 2, "e0")
    admission.settle(accepted=False, engine="e0")
    assert (admission.running, admission.usable, admission.capacity(0)) == (1, 0, 1)


def test_expiry_returns_only_the_silent_engines_tickets():
    admission = Admission(0, 4, ticket_lease_s=10)
    admission.grant(0, 2, "silent", now=0)
    admission.grant(0, 1, "busy", now=0)
    admission.settle(accepted=True, engine="busy", now=8)
    admission.grant(0, 1, "busy", now=9)
    assert admission.expire(now=12) == 2
    assert admission.held() == {"busy": 1} and admission.running == 1 and admission.expired == 2


def test_bad_settings_are_refused_with_the_values():
    with pytest.raises(ValueError, match="got -1, 1"):
        Admission(-1, 1)


def test_concurrent_grants_never_exceed_the_formula():
    admission = Admission(max_staleness=1, groups_per_step=8)
    granted = []
    lock = threading.Lock()

    def engine(name):
        for _ in range(200):
            got = admission.grant(0, random.randint(1, 3), name)
            with lock:
                granted.append(got)

    threads = [threading.Thread(target=engine, args=(f"e{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == admission.running == 16
    assert sum(admission.held().values()) == 16


def test_concurrent_grant_settle_release_and_expiry_keep_the_counts_consistent():
    admission = Admission(max_staleness=2, groups_per_step=4, ticket_lease_s=1e9)
    accepted = [0] * 8

    def engine(i):
        rng = random.Random(i)
        for step in range(300):
            got = admission.grant(0, rng.randint(1, 4), f"e{i}", now=step)
            for _ in range(got):
                if rng.random() < 0.5:
                    admission.settle(accepted=True, engine=f"e{i}", now=step)
                    accepted[i] += 1
                    admission.unusable()  # trained or dropped: the slot frees up again
                else:
                    admission.release(1, f"e{i}", now=step)
            admission.expire(now=step)

    threads = [threading.Thread(target=engine, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert admission.running == 0 and admission.usable == 0 and admission.held() == {}
    assert sum(accepted) > 0
