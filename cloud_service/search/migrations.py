"""Versioned schema migrations of the search store, applied in order, each once, under an advisory lock.

`splitclip_schema_version` records each applied migration (version, name, applied_at). `apply()` takes
a transaction-scoped advisory lock first, so that any number of cloud replicas starting at once
serialise here: the first applies what is missing, the others then find nothing to do. All missing
migrations run in that one transaction, so a failing one leaves the schema as it was. A database whose
schema is newer than this code knows is refused rather than written with an old layout.

Migrations are append-only: never edit a released one, add the next version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import psycopg

from splitclip.errors import SplitclipError

VERSION_TABLE = "splitclip_schema_version"
# pg_advisory_xact_lock takes a bigint: a fixed key derived from a name, so that it cannot collide
# with another application's small integer keys on a shared server
LOCK_KEY = int.from_bytes(hashlib.sha256(b"splitclip.search.migrations").digest()[:8], "big", signed=True)


class MigrationError(SplitclipError, RuntimeError):
    """The database's schema cannot be brought to this code's version."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str  # one or more statements, no parameters


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "frames and bundles",
        """
        CREATE EXTENSION IF NOT EXISTS vector;
        CREATE TABLE splitclip_bundles (
            bundle_id  text PRIMARY KEY,
            dim        integer NOT NULL CHECK (dim > 0),
            created_at timestamptz NOT NULL DEFAULT now()
        );
        -- embedding has no fixed dimension: each bundle's rows are indexed by a partial HNSW index on
        -- embedding::vector(dim) WHERE bundle_id = '...' (store.py), which also refuses a wrong dim
        CREATE TABLE splitclip_frames (
            bundle_id  text NOT NULL REFERENCES splitclip_bundles (bundle_id),
            node_id    text NOT NULL,
            frame_id   bigint NOT NULL CHECK (frame_id >= 0),
            ts         timestamptz NOT NULL,
            source     text NOT NULL DEFAULT '',
            labels     text[] NOT NULL DEFAULT '{}',
            embedding  vector NOT NULL,
            PRIMARY KEY (bundle_id, node_id, frame_id)
        );
        CREATE INDEX splitclip_frames_bundle_ts ON splitclip_frames (bundle_id, ts);
        CREATE INDEX splitclip_frames_labels ON splitclip_frames USING gin (labels);
        """,
    ),
)


def latest() -> int:
    return MIGRATIONS[-1].version


def applied(conn: psycopg.Connection) -> list[tuple[int, str]]:
    """(version, name) of every applied migration, in order; [] on a database never migrated."""
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (VERSION_TABLE,)).fetchone()
    if not exists or not exists[0]:
        return []
    return [(v, n) for v, n in conn.execute(f"SELECT version, name FROM {VERSION_TABLE} ORDER BY version")]


def apply(conn: psycopg.Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply the migrations the database lacks, in order; returns their versions ([] = up to date)."""
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)):
        raise MigrationError(f"migration versions must be unique and ascending, got {versions}")
    done: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} ("
            "version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        have = {v for v, _ in applied(conn)}
        unknown = sorted(have - set(versions))
        if unknown:
            raise MigrationError(
                f"the database has schema version(s) {unknown} that this splitclip does not know "
                f"(it knows up to {versions[-1] if versions else 0}); upgrade splitclip"
            )
        for m in migrations:
            if m.version in have:
                continue
            conn.execute(m.sql.encode())  # bytes: run as is, no placeholder parsing
            conn.execute(f"INSERT INTO {VERSION_TABLE} (version, name) VALUES (%s, %s)", (m.version, m.name))
            done.append(m.version)
    return done
