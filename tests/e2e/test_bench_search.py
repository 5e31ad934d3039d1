"""`splitclip bench search` (benchmarks.search) end to end on a small store: a real embedded PostgreSQL +
pgvector, the demo bundle's towers, the report's rows and columns. No speed or recall threshold is
asserted on 3k rows beyond sanity: recall is a fraction, latencies are positive."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_search_reports_recall_latency_ingest_and_build(demo_bundle_dir: Path, tmp_path: Path) -> None:
    report = tmp_path / "search.md"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.search", "--rows", "3000", "--real", "600", "--queries", "20",
         "--ef-search", "20,80", "--bundle", str(demo_bundle_dir), "--out", str(report), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = report.read_text()
    assert text in out.stdout
    assert "## bench search: 3,000 rows, dim 128" in text
    assert "m 16, ef_construction 64, ef_search 20, 80, k 10; pgvector 0.6" in text
    assert "600 real demo image embeddings" in text and "10 text prompts" in text
    assert "rows/s bulk" in text and "rows/s into the indexed bundle" in text
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")
    ]
    header, body = rows[0], rows[1:]
    assert header[:6] == ["m", "ef_construction", "index build s", "index MiB", "ef_search", "recall@10"]
    assert len(header) == 14 and all(len(r) == 14 for r in body)
    assert body[0][0] == "exact" and [r[4] for r in body[1:]] == ["20", "80"]
    for r in body[1:]:
        assert r[0] == "16" and float(r[2]) > 0
        for recall in (r[5], r[6], r[7], r[10]):  # all, text, image, by node
            assert 0.0 <= float(recall) <= 1.0
        assert 0 < float(r[8]) <= float(r[9])  # p50 <= p95
        assert r[13].endswith("%")
