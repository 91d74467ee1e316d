"""The bench harness: the row loop survives a peer that raises, and the JSON is written."""
import json

import pytest
import torch

from mgcl.bench import harness


def test_row_loop_survives_a_peer_that_raises_and_writes_its_json(tmp_path, capsys):
    def ok():
        t = harness.time_fn(lambda: torch.ones(8).sum(), repeats=3, warmup=1)
        return {k: t[k] for k in harness.TIMING_KEYS if k in t}

    def peer():  # like inf-cl 1.2.1's scale path: dist.all_reduce without a process group
        raise ValueError("Default process group has not been initialized, please make sure to call "
                         "init_process_group.\nsecond line")

    def oom():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cases = [({"impl": "torch"}, ok), ({"impl": "inf-cl cmc"}, peer), ({"impl": "big"}, oom),
             ({"impl": "after"}, ok)]
    rows = harness.run_rows(cases, "bench")
    assert [r["impl"] for r in rows] == ["torch", "inf-cl cmc", "big", "after"]
    assert rows[0]["status"] == "ok" and rows[0]["n"] == 3 and rows[0]["median"] > 0
    assert rows[1]["status"] == ("error: ValueError: Default process group has not been initialized, please make "
                                 "sure to call init_process_group.")
    assert "median" not in rows[1]
    assert rows[2]["status"] == "OOM"
    assert rows[3]["status"] == "ok"
    assert "inf-cl cmc: error: ValueError" in capsys.readouterr().err
    path = tmp_path / "out" / "bench.json"
    harness.write_json(str(path), {"bench": "x", "rows": rows})
    assert json.loads(path.read_text())["rows"][1]["status"].startswith("error: ValueError")
    table = harness.format_table(rows, [("impl", "impl"), ("median", "median"), ("status", "status")])
    assert "OOM" in table and "error: ValueError" in table


def test_a_keyboard_interrupt_still_stops_the_loop():
    def stop():
        raise KeyboardInterrupt

    try:
        harness.run_rows([({"impl": "a"}, stop)], "bench")
    except KeyboardInterrupt:
        return
    raise AssertionError("KeyboardInterrupt was swallowed")


def test_time_fn_reports_wall_time_and_on_cuda_device_time():
    t = harness.time_fn(lambda: torch.randn(64, 64) @ torch.randn(64, 64), repeats=4, warmup=1)
    assert t["n"] == 4 and 0 < t["min"] <= t["median"] <= t["max"]
    assert "device_median" not in t  # CPU: no CUDA events
    if torch.cuda.is_available():
        t = harness.time_fn(lambda: torch.randn(512, 512, device="cuda") @ torch.randn(512, 512, device="cuda"),
                            device="cuda", repeats=3)
        assert 0 < t["device_median"] <= t["median"] * 1.5


def test_fisher_guard_bench_prints_the_guard_host_cost(tmp_path):
    from mgcl.bench import fisher_guard as bench

    result = bench.run("cpu", scale=0.001, repeats=1)
    assert [r["status"] for r in result["rows"]] == ["ok"] * len(result["rows"])
    host = result["host"]
    assert host["tensors"] == 302 and host["same_grads_apply"] > 0 and host["new_grads_apply"] > 0
    # the host cost is each apply() less its own native call: positive, below the whole call
    for case in ("same_grads", "new_grads", "zero_grad_loop", "zero_grad_loop_read"):
        assert 0 < host[f"{case}_host"] <= host[f"{case}_apply"]
    assert host["kernel"] > 0
    text = bench.table(result)
    assert "FisherGuard.apply() host cost over 302 tensors" in text and "new grads at new addresses every step" in text
    assert "allocated by a backward" in text and "when they were read once before" in text
    harness.write_json(str(tmp_path / "fg.json"), result)
    assert json.loads((tmp_path / "fg.json").read_text())["host"]["tensors"] == 302


@pytest.mark.slow
def test_scale_bench_builds_and_serves_each_size_in_fresh_processes(tmp_path):
    from mgcl.bench import scale
    from mgcl.retrieval import MemoryBank, retrieve

    row, faiss_row = scale.bench_size(2000, str(tmp_path), k=30, k_v=2, shard_size=1000)
    assert faiss_row is None and row["entries"] == 2000
    assert 0 < row["build_rss_before"] <= row["build_rss_peak"]
    assert row["bytes_text_bank"] < row["bytes_on_disk"]
    if row["rss_peak_serving_anon"] is not None:  # Linux: the split of the peak sample
        assert row["rss_peak_serving_anon"] + row["rss_peak_serving_file"] <= row["rss_peak_serving"]
    # the serving process's hits are those of serving the same bank here
    queries, vlm_text = scale._queries()
    bank = MemoryBank.open(str(tmp_path / "bank"))
    assert row["hits_sha256"] == scale._hits_sha256(retrieve(bank, queries, 30, vlm=object(), k_v=2,
                                                             vlm_text=vlm_text))
    result = {"machine": {"device": "cpu", "cpu": "test", "torch_threads": 1},
              "config": {"embedder": "hashing:384", "queries": len(queries), "k": 30, "k_v": 2, "project_to": 18e6},
              "sizes": [row], "fit": {}, "faiss": None}
    assert "2000" in scale.table(result)
