"""Fleet search: every node's frame embeddings in PostgreSQL + pgvector, searched by text or image.

`FrameStore` (store.py) writes and searches them; `EmbeddedPostgres` (embedded_pg.py) is the
PostgreSQL used when SPLITCLIP_PG_URL is unset; `migrations` versions the schema; `SearchSettings`
holds the URL and the HNSW parameters; `open_store` puts them together. See docs/search.md.
"""

from __future__ import annotations

from cloud_service.search.embedded_pg import EmbeddedPostgres
from cloud_service.search.settings import SearchSettings
from cloud_service.search.store import FrameStore, Hit, Row, StoreError

__all__ = ["EmbeddedPostgres", "FrameStore", "Hit", "Row", "SearchSettings", "StoreError", "open_store"]


def open_store(settings: SearchSettings | None = None) -> tuple[FrameStore, EmbeddedPostgres | None]:
    """A migrated store on `settings.pg_url`, or on an embedded server started on `pg_data_dir` when the
    URL is empty; the server (or None) is returned too, for the caller to stop after closing the store."""
    settings = settings or SearchSettings.load()
    server = None if settings.pg_url else EmbeddedPostgres(settings.pg_data_dir).start()
    try:
        store = FrameStore(server.url if server else settings.pg_url, settings)
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
    except BaseException:
        if server is not None:
            server.stop()
        raise
    return store, server
