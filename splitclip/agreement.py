"""Measured agreement per plan, stored in the bundle (agreement.json): what the planner may choose from.

A plan is (cut, preset, edge stages); its row says how often the split answer equals the unsplit fp32
model's (top-1 agreement), how close the embeddings are (mean cosine) and how many payload bytes a frame
takes on average. The partitioner measures it; the planner refuses plans under its agreement floor.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from splitclip.errors import SplitclipError

AGREEMENT_FILE = "agreement.json"


class AgreementError(SplitclipError, ValueError):
    """agreement.json is malformed."""


@dataclass(frozen=True)
class AgreementRow:
    cut: int
    preset: str  # codec preset name (at cut 0 an image choice, e.g. "png" or "jpeg444-q95")
    agreement: float  # top-1 agreement with the unsplit fp32 model, 0..1
    cosine: float  # mean cosine of the image embeddings to the unsplit model's
    bytes: float  # mean payload bytes per frame
    edge: str = "fp32"  # the edge stages that ran: "fp32" or "int8"


@dataclass(frozen=True)
class AgreementTable:
    measure: str  # what "top-1" means here, e.g. "zero-shot top-1 over 48 labels"
    images: int  # how many images it was measured on
    rows: tuple[AgreementRow, ...]

    def get(self, cut: int, preset: str, edge: str = "fp32") -> AgreementRow | None:
        return next((r for r in self.rows if (r.cut, r.preset, r.edge) == (cut, preset, edge)), None)

    def allowed(self, floor: float) -> list[AgreementRow]:
        """The plans at or above the agreement floor."""
        return [r for r in self.rows if r.agreement >= floor]

    def to_json(self) -> str:
        body = {"measure": self.measure, "images": self.images, "rows": [asdict(r) for r in self.rows]}
        return json.dumps(body, indent=1, sort_keys=True) + "\n"

    @staticmethod
    def from_json(text: str, where: str = AGREEMENT_FILE) -> AgreementTable:
        try:
            d = json.loads(text)
            rows = tuple(
                AgreementRow(
                    cut=int(r["cut"]),
                    preset=str(r["preset"]),
                    agreement=float(r["agreement"]),
                    cosine=float(r["cosine"]),
                    bytes=float(r["bytes"]),
                    edge=str(r.get("edge", "fp32")),
                )
                for r in d["rows"]
            )
            return AgreementTable(measure=str(d["measure"]), images=int(d["images"]), rows=rows)
        except (ValueError, KeyError, TypeError) as e:
            raise AgreementError(f"{where} is malformed: {e!r}") from None

    @staticmethod
    def load(path: str | Path) -> AgreementTable:
        return AgreementTable.from_json(Path(path).read_text(), str(path))
