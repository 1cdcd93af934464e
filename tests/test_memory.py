import gc

from shipper.memory import COLLECT_AFTER, tune_collector


def test_a_batch_of_objects_does_not_set_off_the_cycle_collector():
    before = gc.get_threshold()
    collections = []
    callback = lambda phase, info: collections.append(info["generation"]) if phase == "start" else None  # noqa: E731
    try:
        tune_collector()
        assert gc.get_threshold()[0] == COLLECT_AFTER
        gc.collect()
        gc.callbacks.append(callback)
        rows = [{"n": n} for n in range(COLLECT_AFTER // 2)]   # a batch's worth of dicts
        assert collections == []
        more = [{"n": n} for n in range(COLLECT_AFTER)]        # past the threshold: cycles still go
        assert collections and collections[0] == 0
        del rows, more
    finally:
        if callback in gc.callbacks:
            gc.callbacks.remove(callback)
        gc.set_threshold(*before)
