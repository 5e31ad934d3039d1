"""Typed settings of the fleet-search store: defaults < `SPLITCLIP_*` environment < explicit overrides.

Parsed by splitclip.settings, by the same rules as CloudSettings (`SPLITCLIP_PG_URL`,
`SPLITCLIP_HNSW_M`, ...; an empty value means unset). The HNSW defaults are pgvector's own for `m`
and `ef_construction`; `ef_search` is raised from pgvector's 40 to 100: more recall for a few
milliseconds more per query (docs/search.md has the numbers measured so far).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitclip import settings as loader
from splitclip.settings import SettingsError

__all__ = ["SearchSettings", "SettingsError", "redacted"]

EF_SEARCH_MAX = 1000  # pgvector's limit on hnsw.ef_search


@dataclass(frozen=True)
class SearchSettings:
    pg_url: str = ""  # postgresql://... of a PostgreSQL with pgvector; "" = the embedded one (pgserver)
    pg_data_dir: Path | None = None  # data dir of the embedded one (None: embedded_pg.default_data_dir())
    hnsw_m: int = 16  # HNSW graph degree (pgvector: 2..100); set when a bundle's index is built
    hnsw_ef_construction: int = 64  # HNSW build candidate list (pgvector: >= 2*m, <= 1000)
    hnsw_ef_search: int = 100  # HNSW query candidate list per search (raised to k when k is bigger)
    # after a failed connect, Search / Upload answer at once (UNAVAILABLE) for this long before the next
    # connect attempt, as the Redis store does (redis_retry_s): calls do not queue behind connects
    search_retry_s: float = 1.0

    @staticmethod
    def load(args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> SearchSettings:
        settings = SearchSettings(**loader.load(SearchSettings, env, args, kind="search"))
        settings.validate()
        return settings

    def validate(self) -> None:
        if not 2 <= self.hnsw_m <= 100:
            raise SettingsError(f"hnsw_m must be in 2..100, got {self.hnsw_m}")
        if not 2 * self.hnsw_m <= self.hnsw_ef_construction <= 1000:
            raise SettingsError(
                f"hnsw_ef_construction must be in 2*hnsw_m..1000 ({2 * self.hnsw_m}..1000), "
                f"got {self.hnsw_ef_construction}"
            )
        if not 1 <= self.hnsw_ef_search <= EF_SEARCH_MAX:
            raise SettingsError(f"hnsw_ef_search must be in 1..{EF_SEARCH_MAX}, got {self.hnsw_ef_search}")
        if not (self.search_retry_s >= 0 and self.search_retry_s < float("inf")):
            raise SettingsError(f"search_retry_s must be >= 0 and finite, got {self.search_retry_s}")
        if self.pg_url and not self.pg_url.startswith(("postgresql://", "postgres://")):
            scheme = self.pg_url.partition("://")[0] if "://" in self.pg_url else self.pg_url[:12]
            raise SettingsError(f"pg_url must start with postgresql:// or postgres://, got {scheme!r}...")


def redacted(url: str) -> str:
    """The URL as logs and errors may show it: a password (postgresql://user:PASSWORD@host) hidden."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    return f"{scheme}://{creds.partition(':')[0]}:***@{host}"
