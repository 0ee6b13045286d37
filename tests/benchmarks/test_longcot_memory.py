"""The long-CoT benchmarks at a tiny size, so that they cannot rot: benchmarks.longcot_memory
measures a real step in a fresh process, writes its table, CSV and plot with the machine stamp, and
reports a configuration over the memory limit as computed, not run; benchmarks.longcot_batching
writes its table."""

import csv

from benchmarks import longcot_memory

TINY = ["--vocab", "500", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate", "64",
        "--prompt", "8"]


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def test_a_tiny_run_writes_its_table_csv_and_plot(tmp_path):
    assert longcot_memory.main([*TINY, "--lengths", "16", "--impls", "torch", "naive", "--checkpointing", "on",
                                "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "longcot_memory.csv")
    assert [(r["impl"], r["checkpointing"], r["status"]) for r in rows] == [("torch", "on", "ok"),
                                                                            ("naive", "on", "ok")]
    for r in rows:
        assert float(r["peak_mib"]) >= float(r["before_mib"]) > 0 and float(r["seconds"]) >= 0
    md = (tmp_path / "longcot_memory.md").read_text()
    assert "torch 2." in md and "commit" in md and "| 16 | naive | on |" in md
    assert (tmp_path / "longcot_memory.png").stat().st_size > 1000


def test_a_configuration_over_the_limit_is_computed_not_run(tmp_path):
    assert longcot_memory.main([*TINY, "--lengths", "16", "32", "--impls", "naive", "--checkpointing", "off",
                                "--max-gib", "0.001", "--out", str(tmp_path), "--name", "over"]) == 0
    rows = _rows(tmp_path / "over.csv")
    assert [r["status"] for r in rows] == ["not run", "not run"]
    assert all("computed, not measured" in r["note"] and float(r["predicted_peak_mib"]) > 1 for r in rows)
    assert "not run: would need" in (tmp_path / "over.md").read_text()
    assert (tmp_path / "over.png").is_file()


def test_the_batching_benchmark_runs_at_a_tiny_size(tmp_path):
    from benchmarks import longcot_batching

    assert longcot_batching.main(["--rows", "4", "--scale", "2.5", "--repeats", "1", "--micro-batch-tokens", "64",
                                  "--out", str(tmp_path)]) == 0
    md = (tmp_path / "longcot_batching.md").read_text()
    assert "| `micro_batch_size=4` |" in md and "| `micro_batch_tokens=64` |" in md and "commit" in md
