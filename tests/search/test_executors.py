"""Trial executors: Ray gives the same trial results as the process pool (a local Ray runtime started here, skipped
without Ray); each common artifact goes to the object store once; --ray without Ray is a typed error (exit 2)."""
from __future__ import annotations

import shutil

import pytest

import qpass
from qpass.errors import DependencyError
from qpass.search import executors
from qpass.search.executors import InProcess, ProcessPool, for_config
from qpass.config import QuantConfig
from tests.builders import DIGITS_MODEL, DIGITS_TEST
from tests.search.test_precision import planted  # noqa: F401 - the fixture


def _add(a, b, item):
    return a + b + item


def test_in_process_and_pool_map_in_order():
    assert InProcess().map(_add, (1, 10), [1, 2, 3]) == [12, 13, 14]
    pool = ProcessPool(2)
    try:
        assert pool.map(_add, (1, 10), [1, 2, 3]) == [12, 13, 14]
    finally:
        pool.close()


def test_for_config():
    ex, owned = for_config(QuantConfig())
    assert isinstance(ex, InProcess) and owned
    ex, owned = for_config(QuantConfig(search_workers=3))
    assert isinstance(ex, ProcessPool) and ex.workers == 3 and owned
    given = InProcess()
    assert for_config(QuantConfig(search_workers=3), given) == (given, False)


def test_ray_not_installed_is_a_typed_error(monkeypatch, tmp_path, planted, capsys):  # noqa: F811
    monkeypatch.setattr(executors, "ray_available", lambda: False)
    with pytest.raises(DependencyError, match="qpass\\[ray\\]"):
        executors.RayTrials("local")
    table, _ = planted
    with pytest.raises(DependencyError, match="Ray is not installed"):
        qpass.quantize(str(DIGITS_MODEL), load_calib=table, val=str(DIGITS_TEST), target_cosine=0.999, ray_address="auto")
    from qpass.cli import main

    model = tmp_path / "digits.onnx"
    shutil.copyfile(DIGITS_MODEL, model)
    rc = main(["run", str(model), "--load-calib", str(table), "--val", str(DIGITS_TEST), "--target-cosine", "0.999",
               "--ray", "auto", "-q"])
    assert rc == 2
    assert "Ray is not installed" in capsys.readouterr().err
    assert not model.with_name("digits.qpass.onnx").exists()


def test_bad_ray_address():
    from qpass.errors import ConfigError

    with pytest.raises(ConfigError, match="ray_address"):
        QuantConfig(ray_address="")


@pytest.fixture(scope="module")
def ray_runtime():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_ray_puts_each_artifact_once(ray_runtime):
    ex = executors.RayTrials("local")  # the runtime is already up: used as it is, not shut down by close()
    big = list(range(100_000))
    assert ex.map(_len_plus, (big,), [1, 2]) == [100_001, 100_002]
    assert ex.map(_len_plus, (big,), [3]) == [100_003]
    assert ex.puts == 1
    ex.close()
    assert ray_runtime.is_initialized()


def _len_plus(xs, item):
    return len(xs) + item


def test_ray_trials_identical_to_pool(ray_runtime, planted):  # noqa: F811
    table, _ = planted
    kw = dict(load_calib=table, val=str(DIGITS_TEST), latency=False, target_cosine=0.99999, search_budget=4)
    pool = qpass.quantize(str(DIGITS_MODEL), search_workers=2, **kw).report.search
    ex = executors.RayTrials()
    on_ray = qpass.quantize(str(DIGITS_MODEL), executor=ex, **kw).report.search
    by_address = qpass.quantize(str(DIGITS_MODEL), ray_address="local", **kw).report.search
    assert pool["executor"] == "process-pool" and on_ray["executor"] == by_address["executor"] == "ray"
    assert len(pool["moves"]) >= 1 and pool["trials"] == on_ray["trials"] == by_address["trials"]
    for other in (on_ray, by_address):
        assert [m["node"] for m in other["moves"]] == [m["node"] for m in pool["moves"]]
        for a, b in zip(pool["moves"], other["moves"]):
            assert a["candidates"] == b["candidates"]  # every trial's scores, exactly
            assert (a["after"], a["bytes_after"]) == (b["after"], b["bytes_after"])
        assert other["rejected"] == pool["rejected"]
    # the stage artifacts (prepared model, config, table, reference, samples) went to the object store once each;
    # per step only the moves so far and the plan's overrides are new
    steps = len(pool["moves"]) + len(pool["rejected"])
    assert ex.puts <= 5 + 2 * steps
    ex.close()
