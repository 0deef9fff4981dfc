"""The replacement drill: node A backs up on schedule, dies, and node B comes back from S3."""

from __future__ import annotations

import json

import pytest

from dtrnode import DtrNode, client, table_contents, table_owners, tree
from servers import MetadataStub

pytestmark = pytest.mark.docker


def test_drill_replacement_node_restores(make_node) -> None:  # type: ignore[no-untyped-def]
    node_a: DtrNode = make_node("i-0aaaaaaaaaaaaaaaa")
    node_a.install()
    node_a.seed()
    daemon = node_a.start()
    try:
        daemon.wait_for("node.first")
        daemon.wait_for("backup.end", count=3)  # the first backup, then two scheduled ones
    finally:
        assert daemon.stop() == 0
    assert daemon.named("restore.start") == []
    last_set = daemon.named("backup.end")[-1]["set_id"]
    etc_before, var_before = tree(node_a.etc), tree(node_a.var)
    tables_before, owners_before = table_contents(), table_owners()
    node_a.destroy()

    with MetadataStub("i-0bbbbbbbbbbbbbbbb").running() as imds:
        node_b: DtrNode = make_node("i-0bbbbbbbbbbbbbbbb", imds_url=imds.url)
        assert client().containers.list(all=True, filters={"name": "docker_trusted_registry_"}) == []
        daemon = node_b.start()
        try:
            restore = daemon.wait_for("restore.end")[0]
            daemon.wait_for("backup.end", count=1)
        finally:
            assert daemon.stop() == 0

    assert restore["set_id"] == last_set
    assert daemon.named("dtr.install.end"), "the install command did not run"
    running = {c.name for c in client().containers.list(filters={"name": "docker_trusted_registry_"})}
    assert len(running) == 6, running
    assert tree(node_b.etc) == etc_before
    assert tree(node_b.var) == var_before
    assert table_contents() == tables_before
    assert table_owners() == owners_before
    state = json.loads((node_b.state_dir / "state.json").read_text())
    assert state["instance_id"] == "i-0bbbbbbbbbbbbbbbb"
    assert state["restored_set"] == last_set
    assert state["last_backup"]["result"] == "ok"
