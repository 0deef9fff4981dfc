"""The `dtrguard` command: argument parsing, logging set-up and exit codes.

Exit codes: 0 success, 1 failure, 2 invalid config or usage, 3 refused because the action
would overwrite live data (systemd must not restart on 2 or 3).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from dtrguard import __version__, config, log, state
from dtrguard.errors import EXIT_FAILURE, EXIT_OK, Aborted, DtrguardError, RefusedError
from dtrguard.manifest import Manifest, utc_now
from dtrguard.node import Node, directory_has_entries
from dtrguard.restore import describe_plan
from dtrguard.service import Agent

_log = log.get("cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtrguard", description="Back up a DTR 1.4 node to S3 and restore it.")
    parser.add_argument("--version", action="version", version=f"dtrguard {__version__}")
    _add_common(parser)
    # The same options after the command; SUPPRESS keeps a value given before the command.
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, parents=[common])

    command("run", "serve: first-boot restore, then scheduled backups (what systemd runs)")
    command("backup", "take one backup set now")
    restore = command("restore", "restore a backup set onto this node")
    restore.add_argument("set", nargs="?", default="latest", help="a set id or 'latest' (default)")
    restore.add_argument("--force", action="store_true", help="restore even though the node has DTR data")
    restore.add_argument("--dry-run", action="store_true", help="print what would be restored; change nothing")
    prune = command("prune", "delete sets the retention policy no longer keeps, and orphaned artifacts")
    prune.add_argument("--dry-run", action="store_true", help="print what would be deleted; change nothing")
    prune.add_argument(
        "--accept-drop",
        action="store_true",
        help="take the newest set's fall in rows or bytes as intended, so pruning resumes",
    )
    listing = command("list", "list complete backup sets, oldest first")
    listing.add_argument("--json", action="store_true", help="print JSON")
    verify = command("verify", "download a set and check every artifact's size and sha256")
    verify.add_argument("set", nargs="?", default="latest", help="a set id or 'latest' (default)")
    prepare = command(
        "prepare-image", "remove dtrguard's state before an AMI is made; rejected while DTR data is present"
    )
    prepare.add_argument("--yes", action="store_true", help="confirm; without it, only print what would be removed")
    status = command("status", "print this node's state: service, instance, last backup, next run")
    status.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help=f"config file (default ${config.ENV_PATH} or {config.DEFAULT_PATH})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug events too")


# Commands that change the node or the repository wait for the action lock. Those that would
# fight the service (a restore it could back up over half-way) are rejected while it runs.
ACTIONS = {"backup", "restore", "prepare-image", "prune"}
NOT_WITH_SERVICE = {"restore", "prepare-image"}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config_file = getattr(args, "config", None)
    # The daemon logs to stdout for journald; one-shot commands keep stdout for their output.
    log.configure(stream=sys.stdout if args.command == "run" else sys.stderr, verbose=getattr(args, "verbose", False))
    try:
        settings = config.load(config.config_path(config_file), local_only=args.command == "prepare-image")
        agent = Agent(settings)
        if args.command != "run":  # `run` installs its own handlers
            _stop_on_signals(agent)
        handler = COMMANDS[args.command]
        state_dir = settings.node.state_dir
        if args.command == "run":
            with state.locked(state_dir, state.SERVICE_LOCK, wait=False):
                handler(agent, args)
        elif args.command in ACTIONS and not getattr(args, "dry_run", False):
            if args.command in NOT_WITH_SERVICE:
                _reject_while_service_runs(state_dir, args.command)
            with state.locked(state_dir, state.ACTION_LOCK, wait=True):
                handler(agent, args)
        else:
            handler(agent, args)
    except Aborted as exc:
        _log.warning("command.aborted", command=args.command, error=exc.message)
        return EXIT_FAILURE
    except DtrguardError as exc:
        _log.error("command.failed", command=args.command, error=exc.message, detail=exc.detail, hint=exc.hint)
        return exc.exit_code
    except Exception:  # a bug: logged at error priority with its traceback, so journalctl -p err shows it
        _log.exception("command.crashed", command=args.command)
        return EXIT_FAILURE
    return EXIT_OK


def _reject_while_service_runs(state_dir: Path, command: str) -> None:
    holder = state.lock_holder(state_dir, state.SERVICE_LOCK)
    if holder:
        raise RefusedError(
            f"dtrguard's service (pid {holder}) is running, and {command} must not run beside it",
            hint=f"systemctl stop dtrguard; dtrguard {command} ...; systemctl start dtrguard",
        )


def _stop_on_signals(agent: Agent) -> None:
    """Make SIGTERM and SIGINT abort a one-shot command cleanly: its uploads deleted, no partial set."""

    def handler(number: int, frame: object) -> None:
        agent.stop.set()
        agent.cancel.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _run(agent: Agent, args: argparse.Namespace) -> None:
    agent.run()


def _backup(agent: Agent, args: argparse.Namespace) -> None:
    agent.identify()
    node = agent.connect()
    if not node.has_data():
        raise RefusedError(
            "this node has no DTR data, so a backup would store an empty node as the newest set",
            hint="restore the node first, or run the backup on the node that has the data",
        )
    manifest = agent.backup(take_lease=True)  # an operator's backup makes this node the writer
    print(manifest.set_id)


def _find(agent: Agent, set_ref: str) -> Manifest:
    manifest = agent.connect().repository.find(set_ref)
    if manifest is None:
        raise DtrguardError(
            f"no complete backup set {set_ref!r} in the repository",
            hint="run `dtrguard list` to see the sets that can be restored",
        )
    return manifest


def _restore(agent: Agent, args: argparse.Namespace) -> None:
    agent.identify()
    manifest = _find(agent, args.set)
    node = agent.connect()
    if args.dry_run:
        print("\n".join(describe_plan(node, manifest)))
        print("node has DTR data: " + _describe_data(node))
        return
    has_data = node.has_data()
    if has_data and not args.force:
        raise RefusedError(
            f"node has DTR data; restoring set {manifest.set_id} would overwrite it",
            hint="add --force to replace this node's data with the backup",
        )
    agent.restore(manifest)
    print(manifest.set_id)


def _describe_data(node: Node) -> str:
    """Say whether the node has DTR data, without starting a stopped Postgres container."""
    if node.config_dir_has_data():
        return "yes, so a restore needs --force"
    rows = node.database_rows(start=False)
    if rows:
        return "yes, so a restore needs --force"
    if rows is None and node.dtr.postgres() is not None:
        return "unknown, because the Postgres container is stopped (a restore starts it)"
    return "no"


def _prune(agent: Agent, args: argparse.Namespace) -> None:
    pruning = agent.prune(dry_run=args.dry_run, accept_drop=args.accept_drop)
    if pruning is None:
        raise DtrguardError("pruning failed", hint="see the prune.failed event above")
    verb = "would delete" if args.dry_run else "deleted"
    if pruning.accept:
        print(f"{'would accept' if args.dry_run else 'accepted'} the level of set {pruning.accept} after a drop")
    if pruning.skipped_reason:
        print(f"kept every set: {pruning.skipped_reason}")
    for set_id in pruning.delete:
        print(f"{verb} set {set_id}")
    for set_id in pruning.orphans:
        print(f"{verb} artifacts without a manifest: {set_id}")
    for key, _ in pruning.uploads:
        print(f"{'would abort' if args.dry_run else 'aborted'} multipart upload of {key}")
    print(f"kept {len(pruning.keep)} sets")


def _list(agent: Agent, args: argparse.Namespace) -> None:
    manifests = agent.connect().repository.manifests()
    if args.json:
        rows = [
            {"set_id": m.set_id, "finished_at": m.finished_at, "instance_id": m.instance_id,
             "bytes": m.total_size(), "rows": m.total_rows(), "dtr_version": m.dtr_version,
             "postgres_version": m.postgres_server_version}
            for m in manifests
        ]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return
    for m in manifests:
        print(f"{m.set_id}  {m.finished_at}  {m.total_size():>12} B  {m.instance_id}  DTR {m.dtr_version or '?'}")


def _verify(agent: Agent, args: argparse.Namespace) -> None:
    manifest = _find(agent, args.set)
    repository = agent.connect().repository
    data_key = repository.data_key(manifest)
    for artifact in manifest.artifacts:
        repository.verify(artifact, agent.cancel, data_key=data_key)
        _log.info("artifact.verified", set_id=manifest.set_id, artifact=artifact.name, bytes=artifact.size)
    print(f"{manifest.set_id}: {len(manifest.artifacts)} artifacts verified")


def _status(agent: Agent, args: argparse.Namespace) -> None:
    current = state.load(agent.settings.node.state_dir)
    report: dict[str, Any] = asdict(current) if current else {"instance_id": None, "established": False}
    holder = state.lock_holder(agent.settings.node.state_dir)
    report["service"] = f"running (pid {holder})" if holder else "not running"
    last = current.last_backup if current else None
    if last is not None:
        report["last_backup_age_seconds"] = round((utc_now() - datetime.fromisoformat(last.at)).total_seconds())
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return
    for key in ("service", "instance_id", "established", "restored_set", "restoring_set", "next_run", "last_error"):
        print(f"{key}: {report.get(key)}")
    good = current.last_good_backup if current else None
    if good is not None and good is not last and good.set_id != getattr(last, "set_id", None):
        print(f"last_good_backup: {good.set_id} at {good.at} ({good.size} bytes)")
    if last is not None:
        print(f"last_backup: {last.result} {last.set_id or '-'} at {last.at}"
              f" ({report['last_backup_age_seconds']} s ago, {last.size} bytes)")  # fmt: skip


def _prepare_image(agent: Agent, args: argparse.Namespace) -> None:
    """Leave nothing in the image that would make a booted copy think it is an existing node."""
    settings = agent.settings
    node = agent.connect()
    found = [str(d.path) for d in settings.directories if directory_has_entries(d.path)]
    rows = node.database_rows() if node.dtr.postgres() is not None else None
    if found or rows:
        where = ", ".join(found + ([f"{rows} rows in {settings.postgres.container}"] if rows else []))
        raise RefusedError(
            f"this node has DTR data ({where}); an image made from it would carry that data",
            hint="bake images on an instance without DTR data: back this node up with `dtrguard backup`,"
            " then build the image from a fresh instance; prepare-image never deletes DTR data",
        )
    state_file = settings.node.state_dir / state.FILE_NAME
    if not args.yes:
        print(f"would remove {state_file}" if state_file.exists() else f"nothing to remove ({state_file} is absent)")
        print("run again with --yes to remove it")
        return
    existed = state_file.exists()
    state_file.unlink(missing_ok=True)
    # The lock files are not needed in an image: the first start creates them.
    for name in (state.SERVICE_LOCK, state.ACTION_LOCK):
        (settings.node.state_dir / name).unlink(missing_ok=True)
    _log.info("image.prepared", removed=str(state_file) if existed else None)
    print(f"removed {state_file}" if existed else f"{state_file} was already absent")
    print("the image has no dtrguard state")


COMMANDS = {
    "run": _run,
    "backup": _backup,
    "restore": _restore,
    "list": _list,
    "prune": _prune,
    "verify": _verify,
    "status": _status,
    "prepare-image": _prepare_image,
}


if __name__ == "__main__":
    sys.exit(main())
