"""``storvisor pool create --s3`` and ``pool import`` through the real console script, with
the credentials in the AWS environment variables only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from s3server import MotoServer

STORVISOR = str(Path(sys.executable).with_name("storvisor"))


def run(home: Path, *args: str, rc: int = 0, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [STORVISOR, "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == rc, f"storvisor {' '.join(args)}: {proc.stdout} {proc.stderr}"
    if rc:
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("storvisor: error: "), proc.stderr
        return lines[0]
    return proc.stdout


def test_create_then_import_on_another_home(aws_env: MotoServer, tmp_path: Path) -> None:
    bucket = aws_env.bucket()
    where = ["--s3", bucket, "--endpoint", aws_env.url, "--region", "us-east-1"]
    first, second = tmp_path / "first", tmp_path / "second"
    run(first, "pool", "create", "s", *where, "--size", "64M", "--object-size", "1M")
    run(first, "volume", "create", "s/v", "--size", "4M")
    run(first, "snapshot", "create", "s/v@snap")
    shown = json.loads(run(first, "pool", "show", "s", "--json"))
    assert shown["name"] == "s" and shown["state"] == "online"
    (endpoint,) = shown["endpoints"]
    assert endpoint["url"] == aws_env.url and endpoint["state"] == "up"
    assert endpoint["requests"] > 0 and endpoint["errors"] == 0
    text = run(first, "pool", "show", "s")
    rows = [line.split() for line in text.splitlines()]
    assert [aws_env.url, "up"] in [row[:2] for row in rows], text

    alias = aws_env.url.replace("127.0.0.1", "localhost")
    shown = json.loads(run(first, "pool", "add-endpoint", "s", alias, "--json"))
    assert [e["url"] for e in shown["endpoints"]] == [aws_env.url, alias]
    shown = json.loads(run(first, "pool", "remove-endpoint", "s", aws_env.url, "--json"))
    assert [e["url"] for e in shown["endpoints"]] == [alias]
    assert "only endpoint" in run(first, "pool", "remove-endpoint", "s", alias, rc=1)

    # each command released the pool when it ended: another HOME may take it now
    run(second, "pool", "import", "s", *where)
    volumes = json.loads(run(second, "volume", "list", "--json"))
    assert [(v["name"], v["size"]) for v in volumes] == [("v", 4 << 20)]
    snapshots = json.loads(run(second, "snapshot", "list", "s/v", "--json"))
    assert [s["name"] for s in snapshots] == ["snap"]
    # the first HOME's copy is stale: that pool is offline there, with the reason
    shown = json.loads(run(first, "pool", "show", "s", "--json"))
    assert shown["state"] == "offline" and "another host took the pool" in shown["reason"]


def test_bad_input_gets_one_line(aws_env: MotoServer, tmp_path: Path) -> None:
    bucket = aws_env.bucket()
    home = tmp_path / "home"
    where = ["--s3", bucket, "--endpoint", aws_env.url, "--region", "us-east-1"]
    wrong = {"AWS_SECRET_ACCESS_KEY": "wrong"}
    assert "refused the credentials" in run(home, "pool", "create", "s", *where, rc=1, env=wrong)
    missing = ["--s3", "no-such-bucket", "--endpoint", aws_env.url]
    assert "does not exist" in run(home, "pool", "create", "s", *missing, rc=1)
    down = ["--s3", bucket, "--endpoint", "http://127.0.0.1:9"]
    assert "no endpoint answers" in run(home, "pool", "create", "s", *down, rc=1)
    empty = ["--s3", bucket, "--endpoint", ""]
    assert "not an http:// or https:// URL" in run(home, "pool", "create", "s", *empty, rc=1)
    assert "--endpoint" in run(home, "pool", "create", "s", "--s3", bucket, rc=1)
    both = ["--backing", str(tmp_path / "f.img:64M"), *where]
    assert "not both" in run(home, "pool", "create", "s", *both, rc=1)
    assert "no storvisor pool" in run(home, "pool", "import", "s", *where, rc=1)
    assert not (home / "pools" / "s").exists()
    assert aws_env.keys(bucket) == {}
