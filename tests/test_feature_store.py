"""The feature cache as an embedded store: vectors round-trip exactly, a batch is one query and one commit
(not a file and an fsync per image), processes and threads share it, old `.npy` vectors are adopted."""

from __future__ import annotations

import multiprocessing
import pickle
import threading
from pathlib import Path

import numpy as np

from probe.store.features import FeatureCache


def _vectors(n: int, width: int = 8, dtype: str = "float32", seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(dtype)


def test_vectors_round_trip_exactly_in_their_own_dtype(tmp_path):
    for dtype in ("float16", "float32", "float64"):
        vectors = _vectors(5, dtype=dtype)
        FeatureCache(tmp_path).put_many(dtype, [(f"k{i}", v) for i, v in enumerate(vectors)])
        back = FeatureCache(tmp_path).get_many(dtype, [f"k{i}" for i in range(5)] + ["absent"])
        assert sorted(back) == [f"k{i}" for i in range(5)]
        for i, vector in enumerate(vectors):
            assert back[f"k{i}"].dtype == np.dtype(dtype) and np.array_equal(back[f"k{i}"], vector)


def test_get_or_compute_computes_only_the_missing_once_and_keeps_order(tmp_path):
    cache = FeatureCache(tmp_path)
    table = {f"k{i}": v for i, v in enumerate(_vectors(6))}
    asked: list[list[str]] = []

    def compute(items: list[str]):
        def run(indices: list[int]) -> np.ndarray:
            asked.append([items[i] for i in indices])
            return np.stack([table[items[i]] for i in indices])
        return run

    first = ["k0", "k1", "k0", "k2"]
    assert np.array_equal(cache.get_or_compute("e", first, compute(first)), np.stack([table[k] for k in first]))
    assert asked == [["k0", "k1", "k2"]]  # the duplicate computed once
    second = ["k3", "k2", "k4", "k0"]
    assert np.array_equal(cache.get_or_compute("e", second, compute(second)), np.stack([table[k] for k in second]))
    assert asked[1] == ["k3", "k4"] and cache.hits == 2 and cache.misses == 5
    assert cache.get("other-extractor", "k0") is None  # another extractor's id never returns these vectors


def test_a_batch_is_one_select_and_one_commit(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.get("e", "warm-up")  # opens the database
    statements: list[str] = []
    assert cache._db is not None
    cache._db.set_trace_callback(statements.append)
    items = [f"key{i:03d}" for i in range(64)]
    cache.get_or_compute("e", items, lambda indices: _vectors(len(indices)))
    verbs = [s.split()[0].upper() for s in statements]
    assert verbs == ["SELECT", "BEGIN"] + ["INSERT"] * 64 + ["COMMIT"], statements  # one transaction
    statements.clear()
    cache.get_or_compute("e", items, lambda indices: _vectors(len(indices)))
    assert [s.split()[0].upper() for s in statements] == ["SELECT"]  # all hits: one query, nothing written


def test_forget_drops_an_item_under_every_extractor(tmp_path):
    cache = FeatureCache(tmp_path)
    for extractor in ("clip", "inception"):
        cache.put_many(extractor, [("bad", np.ones(3)), ("good", np.ones(3))])
    cache.forget(["bad"])
    assert cache.get("clip", "bad") is None and cache.get("inception", "bad") is None
    assert cache.get("clip", "good") is not None and cache.get("inception", "good") is not None


def test_vectors_of_the_old_per_file_layout_are_adopted_when_asked_for(tmp_path):
    import hashlib
    import re

    extractor = "open_clip:ViT-L-14|openai|224"
    vector = _vectors(1)[0]
    digest = hashlib.sha256(extractor.encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", extractor)[:80]
    old = tmp_path / "features" / f"{safe}-{digest}" / "ab" / "abcdef.npy"  # where probe <= 0.x kept it
    old.parent.mkdir(parents=True)
    np.save(old, vector)
    cache = FeatureCache(tmp_path)
    out = cache.get_or_compute(extractor, ["abcdef"], lambda indices: _must_not_compute())
    assert np.array_equal(out[0], vector) and not old.exists()
    assert np.array_equal(FeatureCache(tmp_path).get(extractor, "abcdef"), vector)  # now in the database


def _must_not_compute() -> np.ndarray:
    raise AssertionError("an adopted vector must not be computed again")


def _writer(root: str, worker: int) -> None:
    cache = FeatureCache(Path(root))
    for batch in range(10):
        vectors = _vectors(20, seed=worker * 100 + batch)
        cache.put_many("shared", [(f"w{worker}-{batch}-{i}", v) for i, v in enumerate(vectors)])


def test_two_processes_and_two_threads_write_one_cache_and_lose_nothing(tmp_path):
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_writer, args=(str(tmp_path), w)) for w in (0, 1)]
    for process in processes:
        process.start()
    shared = FeatureCache(tmp_path)  # one connection used by two threads, as the streaming scorer does
    threads = [threading.Thread(target=lambda w=w: [shared.put_many("shared", [(f"t{w}-{b}", np.ones(8))])
                                                   for b in range(50)]) for w in (2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    expected = [f"w{w}-{b}-{i}" for w in (0, 1) for b in range(10) for i in range(20)]
    expected += [f"t{w}-{b}" for w in (2, 3) for b in range(50)]
    found = FeatureCache(tmp_path).get_many("shared", expected)
    assert len(found) == len(expected) == 500
    assert np.array_equal(found["w1-3-7"], _vectors(20, seed=103)[7])


def test_a_cache_sent_to_another_process_opens_its_own_connection(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.put("e", "k", np.ones(4))
    copy = pickle.loads(pickle.dumps(cache))
    assert copy._db is None and np.array_equal(copy.get("e", "k"), np.ones(4))
