"""Render a results document as Markdown, and put it between the markers in docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

START = "<!-- bench results start: written by bench/bench.py -->"
END = "<!-- bench results end -->"


def _range(stats: dict[str, float] | None, scale: float = 1.0, digits: int = 1) -> str:
    if not stats:
        return "-"
    median, low, high = (stats[k] / scale for k in ("median", "min", "max"))
    if round(low, digits) == round(high, digits):
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def table(document: dict[str, Any]) -> str:
    lines = [
        "| tool | phase | wall s | CPU s, tool | CPU s, container | CPU s, engine | CPU s, moto"
        " | peak RSS MB, tool | peak RSS MB, container | stored MB | objects | S3 requests | restore check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in document["summary"]:
        stored = _range(row["stored_bytes"], 1e6)
        objects = _range(row["stored_objects"], 1, 0)
        check = ", ".join(row["verified"]) or "-"
        if row["failures"]:
            check = f"FAILED {row['failures']} of {row['runs']}: " + (
                row["errors"][0][:160].replace("|", "/").replace("\n", " ")
            )
        lines.append(
            f"| {row['tool']} | {row['phase'].replace('|', chr(92) + '|')} | {_range(row['seconds'])} | {_range(row['cpu_tool'])}"
            f" | {_range(row['cpu_container'])} | {_range(row['cpu_engine'])} | {_range(row['cpu_moto'])}"
            f" | {_range(row['rss_tool'], 1e6, 0)} | {_range(row['rss_container'], 1e6, 0)}"
            f" | {stored} | {objects} | {_range(row['requests'], 1, 0)} | {check} |"
        )
    return "\n".join(lines)


def _median(document: dict[str, Any], tool: str, phase: str, field: str = "seconds") -> float | None:
    for row in document["summary"]:
        if row["tool"] == tool and row["phase"] == phase and row.get(field):
            return float(row[field]["median"])
    return None


def targets(document: dict[str, Any]) -> str:
    """Render the targets as ratios of this run's medians, with '-' where a tool did not run."""

    def ratio(value: float | None, *bases: float | None) -> str:
        if value is None or any(b is None for b in bases):
            return "-"
        base = sum(b for b in bases if b is not None)
        return f"{value / base:.2f} ({value:.1f} s / {base:.1f} s)"

    backup = _median(document, "dtrguard", "backup")
    restore = _median(document, "dtrguard", "restore")
    local = (_median(document, "limits", "pg_restore from a local file"),
             _median(document, "limits", "tar -xf dirs from a local file"))  # fmt: skip
    rows = [
        ("backup / the shell way's backup", "at most 0.4", ratio(backup, _median(document, "shell", "backup"))),
        ("backup / restic's first backup", "at most 0.6", ratio(backup, _median(document, "restic", "backup"))),
        ("restore / restic's restore", "at most 0.8", ratio(restore, _median(document, "restic", "restore"))),
        ("restore / (local pg_restore + tar -xf)", "at most 1.2", ratio(restore, *local)),
    ]
    for phase in ("backup", "restore"):
        rss = _median(document, "dtrguard", phase, "rss_tool")
        measured = "-" if rss is None else f"{rss / 1e6:.0f} MB"
        rows.append((f"peak RSS of dtrguard's {phase}", "at most 150 MB", measured))
    lines = ["| ratio of medians | target | this run |", "|---|---|---|"]
    lines += [f"| {name} | {target} | {value} |" for name, target, value in rows]
    return "\n".join(lines)


def section(document: dict[str, Any], json_path: Path | str) -> str:
    machine = document.get("machine", {})
    data = document.get("dataset", {})
    versions = "\n".join(f"  - {name}: {value}" for name, value in machine.get("versions", {}).items())
    rows = ", ".join(f"{table} {count:,}" for table, count in data.get("rows", {}).items())
    requests = []
    for row in document["summary"]:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(row["requests_by_kind"].items()) if k != "total")
        if kinds:
            requests.append(f"- {row['tool']} {row['phase']}: {kinds}")
    label = f"**{document['label']}**\n\n" if document.get("label") else ""
    mb = 1e6
    return f"""{START}
### Results: {data.get("size")} data set, {document["rounds"]} round(s), {document["started_at"]}

{label}Raw results: `{json_path}`. The whole run took {document["seconds"]:.0f} s.

Machine: {machine.get("nproc")} CPUs ({machine.get("cpu", "").strip()}), {machine.get("memory_gib")} GiB memory, kernel {machine.get("kernel")}.

{versions}

Data set (generator version {data.get("generator_version")}):

- database `dtr`: {data.get("database_bytes", 0) / mb:.1f} MB on disk; `pg_dump -Fc -Z0` {data.get("dump_bytes", 0) / mb:.1f} MB,
  {data.get("dump_zstd3_bytes", 0) / mb:.1f} MB after `zstd -3` ({data.get("dump_bytes", 0) / max(data.get("dump_zstd3_bytes", 1), 1):.1f}:1)
- rows: {rows}
- config directory: {data.get("etc", {}).get("files")} files, {data.get("etc", {}).get("bytes", 0) / mb:.2f} MB;
  storage directory: {data.get("var", {}).get("files")} files, {data.get("var", {}).get("bytes", 0) / mb:.1f} MB
  (`tar -cf` of both: {data.get("tar_bytes", 0) / mb:.1f} MB)

Median, and in brackets the lowest and highest, over the rounds. Restore rows use one GET per object
except those marked "ranged GETs" and restic's, which always reads packs by range.

{table(document)}

The targets, as ratios of this run's medians:

{targets(document)}

S3 requests by kind, from the last round:

{chr(10).join(requests)}
{END}"""


def write_section(path: Path, document: dict[str, Any], json_path: Path | str) -> None:
    text = path.read_text() if path.exists() else ""
    new = section(document, json_path)
    if START in text and END in text:
        before = text[: text.index(START)]
        after = text[text.index(END) + len(END) :]
        text = before + new + after
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    path.write_text(text)
