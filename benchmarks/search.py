"""`splitclip bench search`: recall@10 of the store's HNSW index against exact search, query latency,
ingest rate and index build time, on >= 100k stored embeddings of the demo CLIP.

Data. `--real` demo images (coloured shapes, demo/data.py; 80 % seen and 20 % held-out colour×shape
combos) are embedded with the bundle's image tower (ONNX Runtime). The other rows are synthetic: a
random real embedding plus Gaussian noise drawn from the real embeddings' own covariance (so the noise
lies in the span of the data, with its spectrum), scaled by a random factor in [0.5, 1.5]·`--noise`,
re-normalised, keeping the base's label; `--isotropic` of them are uniform random unit vectors (frames
the model has never seen the like of). The report gives the nearest-neighbour cosine of real,
synthetic and isotropic rows, to show that the synthetic ones sit as densely as the real ones do.
Rows are shuffled, spread over `--nodes` nodes, and bulk-loaded (COPY batches, no index), then the
bundle's HNSW index is built (once per `--m`).

Queries. Half are text embeddings of the demo labels under a few prompt templates (the bundle's text
tower: text -> image, the real use), half held-out demo images that are not stored. Ground truth is
exact search (`exact=True`) of the same query; recall@10 = |HNSW top-10 ∩ exact top-10| / 10. A second
set filters by node (1/`--nodes` of the rows): pgvector 0.6 filters after the index scan, so the
store answers short HNSW results again exactly; the share of those fallbacks is reported.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

HELP = "fleet-search store: HNSW recall@10 vs exact, query p50/p95, ingest rate, index build time"

DESCRIPTION = __doc__.split("\n", 2)[2] if __doc__ else ""
TEMPLATES = ("a photo of a {}", "a {}", "there is a {}", "a picture of a {}")
T0 = 1_764_000_000.0  # unix seconds of the first stored frame


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser(p: argparse.ArgumentParser) -> None:
    p.description = "Recall, latency, ingest and index build of the fleet-search store.\n\n" + DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--rows", type=int, default=100_000, help="stored embeddings in all (default 100000)")
    p.add_argument(
        "--real", type=int, default=5000, help="of which real demo image embeddings (default 5000)"
    )
    p.add_argument("--noise", type=float, default=0.5, help="synthetic noise scale, × data std (default 0.5)")
    p.add_argument(
        "--isotropic", type=float, default=0.05, help="share of synthetic rows that are random (default 0.05)"
    )
    p.add_argument(
        "--bundle", default=None, help="bundle dir (default: partition models/demo-clip to a temp dir)"
    )
    p.add_argument("--m", type=_ints, default=None, help="HNSW m, one or a list (default: the settings', 16)")
    p.add_argument(
        "--ef-construction", type=int, default=None, help="HNSW ef_construction (default: settings', >= 2·m)"
    )
    p.add_argument("--ef-search", type=_ints, default=[40, 100, 200], help="list (default 40,100,200)")
    p.add_argument("--queries", type=int, default=200, help="queries, half text, half image (default 200)")
    p.add_argument("--nodes", type=int, default=10, help="nodes the rows are spread over (default 10)")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--batch", type=int, default=2000, help="rows per write (COPY) (default 2000)")
    p.add_argument(
        "--pg-url", default="", help="postgresql://... (default: an embedded server in a temp dir)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# -- data -----------------------------------------------------------------------------------------
@dataclass
class Data:
    emb: NDArray[np.float32]  # [rows, dim], shuffled
    kind: NDArray[np.int8]  # 0 real, 1 synthetic, 2 isotropic
    labels: list[tuple[str, ...]]
    queries: NDArray[np.float32]  # [q, dim]
    query_kind: list[str]  # "text" / "image"


def make_bundle(path: str | None, tmp: Path) -> str:
    if path:
        return str(Path(path).resolve())
    from partitioner.export import partition

    out = tmp / "bundle"
    partition(Path(__file__).resolve().parents[1] / "models" / "demo-clip", out, calibration_images=0,
              agreement_images=0, progress=False)  # fmt: skip
    return str(out)


def embed_scenes(tower: Any, n: int, seed: int, splits: Sequence[tuple[str, float]], progress: bool,
                 desc: str) -> tuple[NDArray[np.float32], list[str]]:  # fmt: skip
    from tqdm import tqdm

    from demo.data import make_scenes

    embs: list[NDArray[np.float32]] = []
    names: list[str] = []
    counts = [round(n * share) for _, share in splits]
    counts[0] += n - sum(counts)
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress)
    for (split, _), count in zip(splits, counts, strict=True):
        for start in range(0, count, 500):
            size = min(500, count - start)
            images, scenes = make_scenes(size, seed * 1000 + start, split, tower.cfg.crop_size)  # type: ignore[arg-type]
            embs.append(tower.finish(tower.model_input(list(images)), 0))
            names += [f"{s.color} {s.shape}" for s in scenes]
            bar.update(size)
    bar.close()
    return np.concatenate(embs).astype(np.float32), names


def unit(x: np.ndarray) -> NDArray[np.float32]:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthesize(real: NDArray[np.float32], n: int, noise: float, iso_share: float,
               rng: np.random.Generator) -> tuple[NDArray[np.float32], NDArray[np.int64], int]:  # fmt: skip
    """n synthetic rows: (embeddings, index of the real base or -1, how many are isotropic)."""
    n_iso = round(n * iso_share)
    n_pert = n - n_iso
    centred = real - real.mean(0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    axes = (sv[:, None] / np.sqrt(len(real))) * vt  # rows: principal axes scaled by their std
    base = rng.integers(0, len(real), n_pert)
    scale = noise * rng.uniform(0.5, 1.5, (n_pert, 1)).astype(np.float32)
    pert = real[base] + scale * (rng.standard_normal((n_pert, len(axes))).astype(np.float32) @ axes)
    iso = rng.standard_normal((n_iso, real.shape[1])).astype(np.float32)
    return unit(np.concatenate([pert, iso])), np.concatenate([base, -np.ones(n_iso, np.int64)]), n_iso


def make_data(bundle: str, args: argparse.Namespace, progress: bool) -> Data:
    from demo.data import label_names
    from splitclip.runtime import BundleRuntime
    from splitclip.tower import Tower

    rng = np.random.default_rng(args.seed)
    rt = BundleRuntime(bundle)
    tower = Tower(rt)
    n_real = min(args.real, args.rows)
    real, real_names = embed_scenes(tower, n_real, args.seed + 1, [("train", 0.8), ("heldout", 0.2)],
                                    progress, "embed stored images")  # fmt: skip
    syn, base, _ = synthesize(real, args.rows - n_real, args.noise, args.isotropic, rng)
    emb = np.concatenate([real, syn])
    kind = np.concatenate([np.zeros(n_real, np.int8), np.where(base < 0, 2, 1).astype(np.int8)])
    labels = [(name,) for name in real_names] + [(real_names[b],) if b >= 0 else () for b in base]
    order = rng.permutation(len(emb))
    n_text = args.queries // 2
    prompts = [TEMPLATES[i // len(label_names()) % len(TEMPLATES)].format(label_names()[i % len(label_names())])
               for i in range(n_text)]  # fmt: skip
    text = rt.encode_text(prompts) if prompts else np.zeros((0, emb.shape[1]), np.float32)
    image, _ = embed_scenes(tower, args.queries - n_text, args.seed + 2, [("seen", 0.5), ("heldout", 0.5)],
                            progress, "embed query images")  # fmt: skip
    return Data(emb[order], kind[order], [labels[i] for i in order], np.concatenate([text, image]),
                ["text"] * n_text + ["image"] * len(image))  # fmt: skip


def nn_cosine(emb: NDArray[np.float32], kind: NDArray[np.int8], rng: np.random.Generator) -> dict[str, float]:
    """Median cosine of a row to its nearest other stored row, per kind (on up to 300 rows each)."""
    out = {}
    for k, name in enumerate(("real", "synthetic", "isotropic")):
        idx = np.flatnonzero(kind == k)
        if len(idx) == 0:
            continue
        pick = rng.choice(idx, min(300, len(idx)), replace=False)
        sims = emb[pick] @ emb.T
        sims[np.arange(len(pick)), pick] = -2.0
        out[name] = float(np.median(sims.max(1)))
    return out


# -- measurement ----------------------------------------------------------------------------------
@dataclass
class Timed:
    hits: list[set[tuple[str, int]]] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)

    def pct(self, q: float) -> float:
        return float(np.percentile(self.ms, q)) if self.ms else float("nan")


def timed_search(search: Callable[..., list[Any]], queries: NDArray[np.float32], nodes: list[str | None],
                 desc: str, progress: bool, **kw: Any) -> Timed:  # fmt: skip
    from tqdm import tqdm

    out = Timed()
    for q, node in tqdm(list(zip(queries, nodes, strict=True)), desc=desc, unit="q", disable=not progress,
                        leave=False):  # fmt: skip
        t = time.perf_counter()
        hits = search(q, node=node, **kw)
        out.ms.append((time.perf_counter() - t) * 1000)
        out.hits.append({(h.node_id, h.frame_id) for h in hits})
    return out


def recall(got: Timed, truth: Timed, k: int, select: Sequence[bool] | None = None) -> float:
    pairs = [
        (g, t)
        for i, (g, t) in enumerate(zip(got.hits, truth.hits, strict=True))
        if select is None or select[i]
    ]
    return float(np.mean([len(g & t) / min(k, len(t)) for g, t in pairs if t])) if pairs else float("nan")


def short_share(conn: Any, bundle_id: str, dim: int, queries: NDArray[np.float32], nodes: list[str | None],
                k: int, ef: int) -> float:  # fmt: skip
    """Share of filtered queries whose HNSW scan comes back short of k (the store then answers exactly)."""
    from cloud_service.search.store import search_sql

    short = 0
    for q, node in zip(queries, nodes, strict=True):
        query, params = search_sql(bundle_id, dim, q, k, node, None, None, None, exact=False)
        with conn.transaction():
            conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(max(ef, k)),))
            short += len(conn.execute(query, params).fetchall()) < k
    return short / max(1, len(queries))


@dataclass
class Point:
    m: int
    ef_construction: int
    build_s: float
    index_mib: float
    ef_search: int
    hnsw: Timed
    filtered: Timed
    short: float


def measure(url: str, data: Data, args: argparse.Namespace, settings: list[Any], progress: bool) -> str:
    import psycopg
    from pgvector.psycopg import register_vector
    from tqdm import tqdm

    from cloud_service.search.store import FrameStore, Row, index_name

    bid, k, n, dim = "bench-search", args.k, len(data.emb), data.emb.shape[1]
    if args.pg_url:  # a shared server: a bundle of this run's own, removed afterwards
        bid += "-" + np.random.default_rng().bytes(4).hex()
    rng = np.random.default_rng(args.seed + 3)
    nn = nn_cosine(data.emb, data.kind, rng)
    rows = [Row(bid, f"node-{i % args.nodes}", i // args.nodes, T0 + i * 0.1, "bench", data.labels[i], data.emb[i])
            for i in range(n)]  # fmt: skip
    diag = psycopg.connect(url, autocommit=True)
    store = FrameStore(url, settings[0])
    try:
        store.migrate()
        register_vector(diag)  # the extension exists once migrated
        store.ensure_bundle(bid, dim, index=False)
        t = time.perf_counter()
        for start in tqdm(range(0, n, args.batch), desc="ingest (COPY)", unit="batch", disable=not progress):
            store.write(rows[start : start + args.batch])
        ingest_s = time.perf_counter() - t
        assert store.count(bid) == n, f"stored {store.count(bid)} of {n} rows"
        pgvector = diag.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        pg_version = diag.execute("SHOW server_version").fetchone()
        mwm = diag.execute("SHOW maintenance_work_mem").fetchone()
        q = data.queries
        plain: list[str | None] = [None] * len(q)
        nodes: list[str | None] = [f"node-{int(v)}" for v in rng.integers(0, args.nodes, len(q))]

        def search(s: FrameStore) -> Callable[..., list[Any]]:
            return lambda vec, **kw: s.search(bid, vec, k, **kw)

        exact = timed_search(search(store), q, plain, "exact", progress, exact=True)
        exact_f = timed_search(search(store), q, nodes, "exact, by node", progress, exact=True)
        points: list[Point] = []
        plans: dict[str, str] = {}
        for s in settings:
            with FrameStore(url, s) as st:
                t = time.perf_counter()
                if progress:
                    print(f"building the HNSW index (m={s.hnsw_m}, ef_construction={s.hnsw_ef_construction})...",
                          file=sys.stderr, flush=True)  # fmt: skip
                st.build_index(bid)
                build_s = time.perf_counter() - t
                size = diag.execute("SELECT pg_relation_size(%s::regclass)", (index_name(bid),)).fetchone()
                index_mib = (size[0] if size else 0) / 2**20
                plans = {
                    what: scan_plan(diag, bid, dim, q[0], k, node, args.ef_search[0])
                    for what, node in (("plain", None), ("by node", nodes[0]))
                }
                timed_search(search(st), q, plain, "warm-up", progress, ef_search=args.ef_search[0])
                for ef in args.ef_search:
                    h = timed_search(
                        search(st), q, plain, f"hnsw m={s.hnsw_m} ef={ef}", progress, ef_search=ef
                    )
                    f = timed_search(search(st), q, nodes, f"hnsw by node ef={ef}", progress, ef_search=ef)
                    points.append(Point(s.hnsw_m, s.hnsw_ef_construction, build_s, index_mib, ef, h, f,
                                        short_share(diag, bid, dim, q, nodes, k, ef)))  # fmt: skip
        # writes into the indexed bundle (the live case): new frames near stored ones
        n_live = max(1, min(2000, n // 10))
        live = unit(data.emb[:n_live] + 0.05 * rng.standard_normal((n_live, dim)).astype(np.float32))
        live_rows = [Row(bid, "node-live", i, T0 + i, "bench", (), live[i]) for i in range(n_live)]
        t = time.perf_counter()
        for start in range(0, n_live, args.batch):
            store.write(live_rows[start : start + args.batch])
        live_s = time.perf_counter() - t
    finally:
        store.close()
        if args.pg_url:
            with diag.transaction():
                diag.execute("DELETE FROM splitclip_frames WHERE bundle_id = %s", (bid,))
                diag.execute(f'DROP INDEX IF EXISTS "{index_name(bid)}"')
                diag.execute("DELETE FROM splitclip_bundles WHERE bundle_id = %s", (bid,))
        diag.close()
    return report(data, args, points, exact, exact_f, nn=nn, ingest=n / ingest_s, live=n_live / live_s,
                  versions=(str(pgvector[0]) if pgvector else "?", str(pg_version[0]) if pg_version else "?",
                            str(mwm[0]) if mwm else "?"), plans=plans)  # fmt: skip


def scan_plan(
    conn: Any, bid: str, dim: int, q: NDArray[np.float32], k: int, node: str | None, ef: int
) -> str:
    """The scan the planner picks for an HNSW-mode search (the index's, or another when it deems that cheaper)."""
    from psycopg import sql

    from cloud_service.search.store import search_sql

    query, params = search_sql(bid, dim, q, k, node, None, None, None, exact=False)
    with conn.transaction():
        conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(max(ef, k)),))
        lines = [r[0] for r in conn.execute(sql.SQL("EXPLAIN ") + query, params).fetchall()]
    scans = [line.strip().lstrip("-> ").split("  (")[0] for line in lines if "Scan" in line]
    return "; ".join(s.replace("splitclip_frames_hnsw_", "hnsw_")[:80] for s in scans) or "?"


def report(data: Data, args: argparse.Namespace, points: list[Point], exact: Timed, exact_f: Timed, *,
           nn: dict[str, float], ingest: float, live: float, versions: tuple[str, str, str], plans: dict[str, str]) -> str:  # fmt: skip
    k, n, dim = args.k, len(data.emb), data.emb.shape[1]
    is_text = [kind == "text" for kind in data.query_kind]
    is_image = [not t for t in is_text]
    counts = [int((data.kind == i).sum()) for i in range(3)]
    lines = [
        f"## bench search: {n:,} rows, dim {dim}",
        "",
        f"- settings: m {', '.join(str(m) for m in dict.fromkeys(p.m for p in points))}, ef_construction "
        f"{', '.join(str(e) for e in dict.fromkeys(p.ef_construction for p in points))}, ef_search "
        f"{', '.join(str(e) for e in args.ef_search)}, k {k}; pgvector {versions[0]}, PostgreSQL {versions[1]}, "
        f"maintenance_work_mem {versions[2]}",
        "- plans of the HNSW-mode queries: " + ", ".join(f"{what}: `{plan}`" for what, plan in plans.items()),
        f"- rows: {counts[0]:,} real demo image embeddings, {counts[1]:,} synthetic (real + data-covariance "
        f"noise × {args.noise}), {counts[2]:,} isotropic random; {args.nodes} nodes",
        "- nearest stored neighbour, median cosine: "
        + ", ".join(f"{name} rows {v:.3f}" for name, v in nn.items()),
        f"- queries: {sum(is_text)} text prompts (the demo labels under up to {len(TEMPLATES)} templates), "
        f"{sum(is_image)} held-out demo images (not stored); the same queries filtered by one node each",
        f"- ingest: {ingest:,.0f} rows/s bulk (COPY batches of {args.batch}, no index); "
        f"{live:,.0f} rows/s into the indexed bundle",
        "",
        "| m | ef_construction | index build s | index MiB | ef_search | recall@10 | text | image | p50 ms "
        "| p95 ms | by node: recall@10 | p50 ms | p95 ms | answered exactly |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| exact | – | – | – | – | 1.000 | 1.000 | 1.000 | {exact.pct(50):.1f} | {exact.pct(95):.1f} "
        f"| 1.000 | {exact_f.pct(50):.1f} | {exact_f.pct(95):.1f} | 100% |",
    ]
    for p in points:
        lines.append(
            f"| {p.m} | {p.ef_construction} | {p.build_s:.1f} | {p.index_mib:.0f} | {p.ef_search} "
            f"| {recall(p.hnsw, exact, k):.3f} | {recall(p.hnsw, exact, k, is_text):.3f} "
            f"| {recall(p.hnsw, exact, k, is_image):.3f} | {p.hnsw.pct(50):.1f} | {p.hnsw.pct(95):.1f} "
            f"| {recall(p.filtered, exact_f, k):.3f} | {p.filtered.pct(50):.1f} | {p.filtered.pct(95):.1f} "
            f"| {p.short:.0%} |"
        )
    good = [p for p in points if recall(p.hnsw, exact, k) >= 0.95]
    lines.append("")
    if good:
        best = min(good, key=lambda p: (p.hnsw.pct(50), p.m, p.ef_search))
        lines.append(f"recall@10 >= 0.95: fastest at m {best.m}, ef_search {best.ef_search} "
                     f"({recall(best.hnsw, exact, k):.3f}, p50 {best.hnsw.pct(50):.1f} ms)")  # fmt: skip
    else:
        lines.append("recall@10 >= 0.95: reached by no setting measured")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import logging

    from cloud_service.search.embedded_pg import EmbeddedPostgres
    from cloud_service.search.settings import EF_SEARCH_MAX, SearchSettings, SettingsError

    logging.basicConfig(level=logging.WARNING)
    if args.rows < args.k or args.real < 1 or args.queries < 1 or args.nodes < 1 or args.batch < 1:
        print(
            "error: need --rows >= --k, --real >= 1, --queries >= 1, --nodes >= 1, --batch >= 1",
            file=sys.stderr,
        )
        return 2
    if not args.ef_search or not all(1 <= e <= EF_SEARCH_MAX for e in args.ef_search):
        print(f"error: --ef-search values must be in 1..{EF_SEARCH_MAX}", file=sys.stderr)
        return 2
    try:
        base = SearchSettings.load()
        settings = []
        for m in args.m or [base.hnsw_m]:
            efc = args.ef_construction or max(base.hnsw_ef_construction, 2 * m)
            settings.append(SearchSettings.load({"hnsw_m": m, "hnsw_ef_construction": efc}))
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    progress = not args.quiet
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="splitclip-bench-search-"))
    tmp.chmod(0o755)  # as root the embedded server runs as user pgserver, which must traverse it
    try:
        data = make_data(make_bundle(args.bundle, tmp), args, progress)
        server = None if args.pg_url else EmbeddedPostgres(tmp / "pg").start()
        try:
            text = measure(args.pg_url or server.url, data, args, settings, progress)  # type: ignore[union-attr]
        finally:
            if server is not None:
                server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text += f"\nwhole run: {time.perf_counter() - t0:.0f} s\n"
    print(text, end="", flush=True)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def _cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="splitclip bench search")
    build_parser(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(_cli())
