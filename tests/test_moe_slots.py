"""memfit.tiers.slots.SlotCache and memfit.moe.policies: residency, prefetch accounting, errors, concurrency."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from memfit.moe.policies import LFU, LRU, Predictive, ScoreAware, make_policy
from memfit.tiers.slots import SlotCache

NUMEL = 16


def fill_with(delay: float = 0.0, fail: set | None = None, log: list | None = None):
    """A fill that writes the key's number into every element (after `delay` s); fails for keys in `fail`."""

    def fill(key, out):
        if log is not None:
            log.append(key)
        if delay:
            time.sleep(delay)
        if fail and key in fail:
            raise OSError(f"cannot read {key}")
        out.fill_(float(key[1]) + 100 * key[0])
        return NUMEL * 4

    return fill


def value(key) -> float:
    return float(key[1]) + 100 * key[0]


def use(cache, key) -> float:
    slot = cache.get(key)
    try:
        assert torch.all(slot == value(key))
        return slot[0].item()
    finally:
        cache.release(key)


def wait_until(predicate, timeout=5.0):
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, "timed out"
        time.sleep(0.001)


def test_lru_evicts_least_recent_and_never_exceeds_slots():
    cache = SlotCache(3, NUMEL, torch.float32, fill_with(), LRU(3, 8), prefetch=False)
    for e in (0, 1, 2):
        use(cache, (0, e))
    use(cache, (0, 0))  # 1 is now the least recent
    use(cache, (0, 3))
    assert sorted(cache.resident()) == [(0, 0), (0, 2), (0, 3)]
    assert cache.stats.misses == 4 and cache.stats.hits == 1 and cache.stats.evictions == 1
    assert cache.nbytes == 3 * NUMEL * 4


def test_lfu_and_score_policies_rank_by_their_measure():
    lfu = SlotCache(2, NUMEL, torch.float32, fill_with(), LFU(2, 8), prefetch=False)
    for e in (0, 0, 0, 1, 2):  # 1 was used once and is the least frequent when 2 arrives
        use(lfu, (0, e))
    assert sorted(lfu.resident()) == [(0, 0), (0, 2)]
    policy = ScoreAware(2, 4)
    policy.router_scores(0, torch.tensor([0.1, 0.6, 0.2, 0.1]))
    assert policy.victim([(0, 0), (0, 1), (0, 2)]) == (0, 0)
    policy.router_scores(0, torch.tensor([0.0, 0.0, 1.0, 0.0]))  # S <- 0.5 p + 0.5 S
    assert policy.value((0, 2)) == pytest.approx(0.55) and policy.value((0, 1)) == pytest.approx(0.15)


def test_prefetch_hit_late_waste_and_precision_recall():
    cache = SlotCache(2, NUMEL, torch.float32, fill_with(delay=0.05), LRU(2, 8))
    cache.prefetch([(0.0, (0, 1))])
    wait_until(lambda: (0, 1) in cache)
    use(cache, (0, 1))  # ready: a hit served by a prefetch
    cache.prefetch([(0.0, (0, 2))])
    wait_until(lambda: cache.loading((0, 2)))
    use(cache, (0, 2))  # still being read: late
    cache.prefetch([(0.0, (0, 3))])
    wait_until(lambda: (0, 3) in cache)
    use(cache, (0, 4))  # a miss; evicts... the LRU of {1, 2, 3}
    use(cache, (0, 5))  # evicts again; the unused prefetch of 3 goes at some point
    use(cache, (0, 6))
    cache.close()
    s = cache.stats
    assert (s.hits, s.late, s.misses) == (1, 1, 3)
    assert s.prefetch_issued == 3 and s.prefetch_used == 2 and s.prefetch_wasted == 1
    assert s.precision == pytest.approx(2 / 3) and s.recall == pytest.approx(2 / 5)
    assert s.stall_s > 0.02  # the late prefetch and the misses were waited for


def test_urgent_requests_count_as_misses_and_withdrawn_requests_are_dropped():
    log = []
    cache = SlotCache(4, NUMEL, torch.float32, fill_with(delay=0.02, log=log), LRU(4, 8))
    cache.prefetch([(-1.0, (0, 1)), (-1.0, (0, 2))], urgent=True)
    wait_until(lambda: (0, 1) in cache and (0, 2) in cache)
    use(cache, (0, 1))
    use(cache, (0, 2))
    assert cache.stats.misses == 2 and cache.stats.hits == 0  # read by the worker, but for a step's own need
    assert cache.stats.prefetch_issued == 0
    cache.close()
    paused = SlotCache(4, NUMEL, torch.float32, fill_with(), LRU(4, 8), prefetch=False)
    paused.prefetch([(1.0, (1, e)) for e in range(3)])
    paused.withdraw(lambda k: k[1] != 1)
    assert paused.queued() == [(1, 1)] and paused.stats.prefetch_dropped == 2


def test_policy_refusal_keeps_the_more_valuable_item():
    policy = Predictive(1, 4)
    cache = SlotCache(1, NUMEL, torch.float32, fill_with(), policy)
    with cache.lock:
        policy.predicted(1, {0: 0.9})
    use(cache, (1, 0))  # resident and still predicted for layer 1 this step: worth 2.9
    cache.prefetch([(0.0, (2, 3))])  # not predicted: worth 0, may not evict it
    wait_until(lambda: not cache.queued())
    cache.close()
    assert cache.resident() == [(1, 0)] and cache.stats.prefetch_dropped == 1


def test_read_errors_reach_the_compute_thread():
    cache = SlotCache(2, NUMEL, torch.float32, fill_with(delay=0.05, fail={(0, 1)}), LRU(2, 8))
    cache.prefetch([(0.0, (0, 1))])
    wait_until(lambda: cache.loading((0, 1)))
    with pytest.raises(OSError, match=r"cannot read \(0, 1\)"):
        cache.get((0, 1))  # waited for the failing prefetch
    with pytest.raises(OSError):
        cache.get((0, 1))  # read at once, fails again
    assert use(cache, (0, 2)) == 2.0 and cache.resident() == [(0, 2)]  # the failed slots were given back
    cache.close()


def test_predictive_policy_demotes_wrong_prefetches_and_shares_slots_by_demand():
    policy = Predictive(4, 4)
    policy.predicted(1, {0: 0.9, 1: 0.6})
    for e in (0, 1):
        policy.inserted((1, e), prefetched=True)
    policy.inserted((0, 2), prefetched=False)
    policy.layer_started(0, [2], {2})
    assert policy.value((1, 0)) > 2 and policy.victim([(0, 2), (1, 0), (1, 1)]) == (0, 2)
    policy.layer_started(1, [0], {0})  # 1 was predicted and prefetched but not used: demoted below everything
    assert policy.value((1, 1)) == -1.0 and policy.victim([(0, 2), (1, 0), (1, 1)]) == (1, 1)
    for e in range(3):
        policy.inserted((2, e), prefetched=False)
    policy.layer_started(2, [0], {0})  # layer 2 needs 1 per step but holds 3: over its share, its experts go first
    assert policy.victim([(0, 2), (2, 1)]) == (2, 1)


def test_predictive_policy_keeps_slots_for_layers_whose_prefetches_come_late():
    policy = Predictive(4, 4)
    for _ in range(20):  # both layers are predicted right; only layer 2's experts are in memory in time
        policy.predicted(1, {0: 0.9})
        policy.predicted(2, {0: 0.9})
        policy.layer_started(1, [0], set())
        policy.layer_started(2, [0], {0})
    for e in range(2):
        policy.inserted((1, e), prefetched=False)
        policy.inserted((2, e), prefetched=False)
    # Layer 1's demand is what prefetching failed to serve: it keeps its slots, layer 2 (over its share) gives one.
    assert policy.victim([(1, 1), (2, 1)]) == (2, 1)


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_prefetch_and_use_stay_correct(workers):
    """Random prefetches, withdrawals and uses against a slow tier: right bytes every time, no deadlock."""
    rng = random.Random(0)
    cache = SlotCache(3, NUMEL, torch.float32, fill_with(delay=0.001), make_policy("predictive", 3, 6),
                      workers=workers)
    done = threading.Event()

    def compute():
        for step in range(300):
            layer = step % 4
            needed = sorted(rng.sample(range(6), 2))
            with cache.lock:
                cache.policy.layer_started(layer, needed, set())
                cache.policy.predicted((layer + 1) % 4, {e: 0.5 for e in needed})
            cache.protect([(layer, e) for e in needed])
            cache.withdraw(lambda k, layer=layer: k[0] == layer)
            cache.prefetch([(rng.random(), ((layer + 1) % 4, rng.randrange(6))) for _ in range(3)])
            for e in needed:
                use(cache, (layer, e))
            cache.unprotect([(layer, e) for e in needed])
        done.set()

    thread = threading.Thread(target=compute)
    thread.start()
    thread.join(timeout=60)
    cache.close()
    assert done.is_set()
    assert len(cache.resident()) <= 3
    s = cache.stats
    assert s.accesses == 600 == s.hits + s.late + s.misses


def test_a_cache_needs_a_slot_and_a_worker():
    with pytest.raises(ValueError, match="at least one slot"):
        SlotCache(0, NUMEL, torch.float32, fill_with(), make_policy("lru", 1, 1))
    with pytest.raises(ValueError, match="workers=0"):
        SlotCache(2, NUMEL, torch.float32, fill_with(), make_policy("lru", 2, 1), workers=0)
