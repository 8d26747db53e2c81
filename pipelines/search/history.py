"""``history.jsonl``: one line per finished evaluation, appended (and flushed to disk) the moment it finishes, so a
killed search loses only what was in flight. A resumed search reads it back: the candidates sampled so far, the
population, the fingerprint cache and the re-rank evaluations done.

A line is a candidate of the search (``kind: candidate``: formula, genome, hash, fingerprint, parent, series,
origin, status, the protocol that ended it and why, per-anchor scores, screen accuracies, seconds per protocol,
where it ran), a reference layer (``kind: reference``, the same fields) or a re-rank evaluation (``kind: rerank``:
whose, seed, scores on the re-rank split).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pipelines.checks import ConfigError

log = logging.getLogger(__name__)
HISTORY_FILE = "history.jsonl"


class History:
    def __init__(self, search_dir: Path):
        self.path = Path(search_dir) / HISTORY_FILE
        self.entries: list[dict] = self._read()

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        entries = []
        lines = self.path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            try:
                entries.append(json.loads(line))
            except ValueError:
                if number < len(lines):
                    raise ConfigError(f"{self.path}, line {number} cannot be read; the history is damaged") from None
                log.warning("%s: its last line is incomplete (a kill while writing it); that evaluation runs again",
                            self.path)
                self._truncate(len(lines) - 1)
        return entries

    def _truncate(self, keep: int) -> None:
        kept = self.path.read_text().splitlines()[:keep]
        self.path.write_text("".join(line + "\n" for line in kept))

    def append(self, entry: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)

    def of_kind(self, kind: str) -> list[dict]:
        return [e for e in self.entries if e["kind"] == kind]
