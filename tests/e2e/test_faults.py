"""The fault drill (benchmarks/faults.py) on few frames: real processes, through the link proxy.

One cloud per module (`python -m cloud_service.cli`: local Ray + Serve) on a Valkey the drill owns, a
LinkProxy in front of it, an EdgeNode streaming frames through it at a steady rate. For each fault:
every frame answered exactly once (by name; the node counted each once too), the modes and reasons the
fault must give, and split mode back once it clears (a frame sent after that answered by the cloud).
The cloud kill comes last, and its restart is the bundle roll's: the cloud comes back with another bundle.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import faults
from benchmarks.faultdrill import Drill, DrillSettings, FaultRun
from demo.cloudproc import session_members

SETTINGS = DrillSettings(
    fps=10, deadline_s=1.5, hold_s=2.5, delay_ms=5, window=8, warmup=5, settle=5, recover_s=30
)


@pytest.fixture(scope="module")
def drill(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    with Drill(tiny_bundle_dir, tmp_path_factory.mktemp("faults"), SETTINGS) as d:
        yield d
        sid = d.cloud.pid if d.cloud.running else None
    if sid is not None:
        assert session_members(sid) == [], "the cloud left processes behind"


def check(run: FaultRun) -> FaultRun:
    print("\n" + faults.table([run]))
    assert run.once_each, (run.sent, run.answered, run.counted, run.duplicates, run.missing)
    assert faults.problems(run) == [], faults.problems(run)
    assert run.to_split_s is not None
    return run


def test_a_stalled_link_is_noticed_only_by_the_deadline_and_split_mode_returns(drill: Drill) -> None:
    run = check(faults.stall(drill))
    assert run.first_local == "deadline"  # nothing was closed: no link error came before the deadline


def test_a_reset_connection_answers_the_frames_in_flight_locally(drill: Drill) -> None:
    run = check(faults.reset(drill))
    assert run.first_local == "link_lost" and run.note == "", run.note


def test_redis_killed_and_restarted_keeps_every_frame_split_and_the_node_registers_again(
    drill: Drill,
) -> None:
    run = check(faults.redis(drill))
    assert set(run.answers) == {("split", "cloud")} and run.to_local_s is None
    assert run.registry_s is not None, run.note


def test_a_stopped_replica_passes_deadlines_and_late_answers_are_dropped(drill: Drill) -> None:
    run = check(faults.slow(drill))  # answered once each, as each node counted them too
    assert run.first_local == "deadline"
    assert run.late >= 1  # the patient node's stream lived: the cloud's answers to its expired frames came


def test_a_killed_cloud_that_comes_back_rolled_sends_the_old_edge_local_and_the_rolled_one_split(
    drill: Drill,
) -> None:
    old_id = drill.node.bundle_id
    run = check(faults.DRILLS["kill-roll"](drill))
    assert run.first_local == "link_lost"
    assert run.by_feed["old"]["bundle_mismatch"] >= SETTINGS.settle
    assert set(run.by_feed["new"]) == {"cloud"} and drill.node.bundle_id != old_id
