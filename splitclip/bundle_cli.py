"""`splitclip bundle info B`: what a bundle is (manifest facts, files, calibration) and its agreement table."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from splitclip.agreement import AgreementRow, AgreementTable
from splitclip.bundle import MANIFEST_NAME, Bundle, load_bundle

HELP = "show a bundle's manifest facts and its measured agreement per (cut, preset)"
DEFAULT_FLOOR = 0.99


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory (written by `splitclip partition`)")
    p.add_argument(
        "--floor",
        type=float,
        default=DEFAULT_FLOOR,
        help=f"mark agreement rows under this top-1 agreement (0..1, default {DEFAULT_FLOOR})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")


def _sorted_rows(table: AgreementTable) -> list[AgreementRow]:
    return sorted(table.rows, key=lambda r: (r.edge, r.cut, r.bytes, r.preset))


def info(bundle: Bundle, floor: float) -> dict:
    """Everything the report shows, as plain data (what --json prints)."""
    m = bundle.manifest
    cal = bundle.calibration()
    table = bundle.agreement()
    files = {name: (bundle.root / name).stat().st_size for name in sorted(m.files)}
    files[MANIFEST_NAME] = (bundle.root / MANIFEST_NAME).stat().st_size
    out: dict = {
        "bundle_id": m.bundle_id,
        "root": str(bundle.root),
        "model_name": m.model_name,
        "format": m.format,
        "vision": asdict(m.vision),
        "text": asdict(m.text),
        "embed_dim": m.embed_dim,
        "logit_scale": m.logit_scale,
        "files": files,
        "calibration_cuts": cal.cuts if cal is not None else [],
        "floor": floor,
        "agreement": None,
    }
    if table is not None:
        out["agreement"] = {
            "measure": table.measure,
            "images": table.images,
            "rows": [{**asdict(r), "below_floor": r.agreement < floor} for r in _sorted_rows(table)],
        }
    return out


def _size(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{int(n)} B"


def report(d: dict) -> str:
    v = d["vision"]
    lines = [
        f"bundle {d['bundle_id']}  ({d['root']}, format {d['format']})",
        f"model {d['model_name']}: {v['num_blocks']} blocks (cuts 0..{v['num_blocks']}), width {v['width']}, "
        f"{v['num_tokens']} tokens (image {v['image_size']} px, patch {v['patch_size']}), "
        f"embed dim {d['embed_dim']}, logit scale {d['logit_scale']:.4g}",
        f"text: context {d['text']['context_length']}, vocab {d['text']['vocab_size']}, width {d['text']['width']}",
        f"files ({len(d['files'])}, {_size(sum(d['files'].values()))}):",
    ]
    width = max(len(n) for n in d["files"])
    lines += [f"  {name:<{width}}  {_size(size):>9}" for name, size in d["files"].items()]
    cuts = d["calibration_cuts"]
    lines.append(
        f"calibration: PCA bases at cuts {', '.join(map(str, cuts))}"
        if cuts
        else "calibration: none (no PCA / KLT presets)"
    )
    table = d["agreement"]
    if table is None:
        lines.append("agreement: none (partition with --agreement-images N to measure it)")
        return "\n".join(lines)
    below = sum(r["below_floor"] for r in table["rows"])
    lines += [
        f"agreement: {table['measure']}",
        f"  {table['images']} images, {len(table['rows'])} plans; {below} under the floor "
        f"{d['floor']:.1%} (marked <)",
        f"  {'edge':<5} {'cut':>3}  {'preset':<18} {'bytes':>8}  {'agreement':>9}  {'cosine':>8}",
    ]
    for r in table["rows"]:
        mark = "  <" if r["below_floor"] else ""
        lines.append(
            f"  {r['edge']:<5} {r['cut']:>3}  {r['preset']:<18} {r['bytes']:>8.0f}  {r['agreement']:>9.2%}  "
            f"{r['cosine']:>8.5f}{mark}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    d = info(load_bundle(args.bundle), args.floor)
    print(json.dumps(d, indent=1, sort_keys=True) if args.json else report(d))
    return 0
