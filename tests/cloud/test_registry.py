"""The node registry against a real Valkey: list_nodes, its errors, and `splitclip cloud nodes`."""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid

import pytest
import redis

from cloud_service import nodes_cli
from cloud_service.cache import RedisStore
from cloud_service.registry import NODE_PREFIX, NodeInfo, NodeRegistry, RegistryError, list_nodes
from splitclip.cli import main
from splitclip.procs import free_port


def register(url: str, ttl_s: float, *infos: NodeInfo) -> None:
    async def go() -> None:
        store = RedisStore(url, timeout_s=2.0)
        registry = NodeRegistry(store, ttl_s)
        for info in infos:
            assert await registry.register(info)
        await store.close()

    asyncio.run(go())


def test_list_nodes_reads_what_the_registry_wrote(redis_server):
    tag = uuid.uuid4().hex[:8]
    a = NodeInfo(f"a-{tag}", "b-1", seen_at=0.0, mode="split", frames_answered=3, accepted=True)
    b = NodeInfo(f"b-{tag}", "b-2", seen_at=0.0, mode="local")
    register(redis_server.url, 30, b, a)
    redis.Redis.from_url(redis_server.url).set(f"{NODE_PREFIX}junk-{tag}", b"not json", ex=30)
    nodes = [n for n in list_nodes(redis_server.url) if tag in n.node_id]
    assert [n.node_id for n in nodes] == [a.node_id, b.node_id]  # sorted; the junk entry skipped
    assert (nodes[0].mode, nodes[0].frames_answered, nodes[0].ttl_s) == ("split", 3, 30)
    assert all(0 <= n.age_s < 5 for n in nodes)  # from the TTL left, not from seen_at


def test_list_nodes_names_an_unreachable_redis():
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(RegistryError, match=url):
        list_nodes(url, timeout_s=0.5)


def test_nodes_command_prints_a_table_or_json(redis_server, capsys):
    tag = uuid.uuid4().hex[:8]
    register(
        redis_server.url, 30, NodeInfo(f"cam-{tag}", "b-9", seen_at=0.0, mode="split", frames_answered=12)
    )
    assert nodes_cli.run(argparse.Namespace(redis_url=redis_server.url, json=False)) == 0
    out = capsys.readouterr().out
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "BUNDLE", "LAST", "SEEN", "MODE", "FRAMES"]
    row = next(r for r in rows if tag in r).split()
    assert row[0] == f"cam-{tag}" and row[1:3] == ["b-9", "*"] and row[-2:] == ["split", "12"]

    assert main(["cloud", "nodes", "--redis-url", redis_server.url, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    mine = next(d for d in lines if d["node_id"] == f"cam-{tag}")
    assert mine["frames_answered"] == 12 and mine["mode"] == "split" and "age_s" in mine

    assert nodes_cli.format_table([]) == "no live nodes"


def test_nodes_command_without_redis_is_one_line(monkeypatch, capsys):
    monkeypatch.delenv("SPLITCLIP_REDIS_URL", raising=False)
    assert main(["cloud", "nodes"]) == 2
    assert "SPLITCLIP_REDIS_URL" in capsys.readouterr().err


def test_cloud_is_a_command_and_a_group(capsys):
    for argv in (["cloud", "--help"], ["cloud", "nodes", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--bundle" in out and "nodes" in out and "--json" in out
