"""Print the WAL segment names a barman-cloud base backup needs, from `barman-cloud-backup-show --format json`.

Reads the JSON on stdin and prints one segment name per line, from begin_wal to end_wal.
"""

from __future__ import annotations

import json
import sys

SEGMENTS_PER_XLOGID = 0x100000000 // (16 * 1024 * 1024)  # with the default 16 MiB segments


def segments(begin: str, end: str) -> list[str]:
    timeline = begin[:8]
    first = int(begin[8:16], 16) * SEGMENTS_PER_XLOGID + int(begin[16:24], 16)
    last = int(end[8:16], 16) * SEGMENTS_PER_XLOGID + int(end[16:24], 16)
    return [f"{timeline}{n // SEGMENTS_PER_XLOGID:08X}{n % SEGMENTS_PER_XLOGID:08X}" for n in range(first, last + 1)]


def main() -> None:
    document = json.load(sys.stdin)
    info = next(iter(document.values())) if "begin_wal" not in document else document
    for name in segments(info["begin_wal"], info["end_wal"]):
        print(name)


if __name__ == "__main__":
    main()
