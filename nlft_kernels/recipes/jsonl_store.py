"""A resumable JSONL output: one row per input row, appended and flushed as each is produced, keyed by
the input row's content, one writer at a time.

A command that turns input rows into output rows (``nlft judge``: responses into verdicts; ``nlft
generate``: questions into responses) writes its ``--out`` through :class:`JsonlStore`:

- :func:`check_output_path` first (before any work): a directory, a path under a file or a place
  that cannot be written is a :class:`~nlft_kernels.recipes.errors.BadInput` with one line.
- :meth:`JsonlStore.open` takes the lock (``fcntl.flock`` on ``<out>.lock``: a second writer gets
  :class:`OutputBusy`, naming the file and the writer's pid), reads what an earlier run wrote and
  returns a :class:`Resume`. Every row must carry the store's key field and owner field: a file of
  another kind (not one of this command's outputs) or another owner (another judge, another
  model) is refused untouched; ``overwrite=True`` starts it afresh instead. Then the rows are made
  to match the current input: a row whose key no longer names an input row (that row was edited
  or deleted) is dropped and counted (``stale``), a row superseded by a later one for its key is
  dropped, a last line a crash cut short is removed (``repaired``), and ``refresh`` fields (an
  input line number) are brought up to date. The file is rewritten atomically (a temporary file,
  then ``os.replace``) only when one of those changed something.
- :meth:`JsonlStore.append` writes one row and flushes it: a crash, a kill or Ctrl-C keeps every
  row appended before it (a kill in the middle of a write leaves at most that last line cut,
  which the next :meth:`~JsonlStore.open` removes).
- :meth:`JsonlStore.close` (or the ``with`` block's end) drops the rows superseded during the run
  (an error row retried successfully) and releases the lock.

Keys: :func:`content_keys` hashes the fields an output row copies from its input row, so that a
row is current exactly when everything it took from the input is unchanged; a repeated input row
gets ``-2``, ``-3``... so that each occurrence has its own output row.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlft_kernels.recipes.errors import BadInput


class OutputBusy(BadInput):
    """Another process is writing this output (it holds the lock)."""


def content_key(values: Sequence[Any]) -> str:
    """16 hex digits of the SHA-256 of ``values`` as canonical JSON: equal values, equal keys."""
    text = json.dumps(list(values), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def content_keys(rows: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> list[str]:
    """The key of each row: :func:`content_key` of its ``fields`` (a missing field counts as None),
    with ``-2``, ``-3``... on the second, third... row of the same content."""
    seen: dict[str, int] = {}
    keys = []
    for row in rows:
        key = content_key([row.get(field) for field in fields])
        seen[key] = seen.get(key, 0) + 1
        keys.append(key if seen[key] == 1 else f"{key}-{seen[key]}")
    return keys


def check_output_path(path: str | os.PathLike) -> Path:
    """``path`` if an output file can be written there; else :class:`BadInput` with one line (it is a
    directory, a path under a file, or in a folder that cannot be written). Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{path} is a directory: name a file")
    if path.exists() and not path.is_file():
        raise BadInput(f"{path} is not a regular file")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BadInput(f"{path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise BadInput(f"{path} cannot be written (no permission)")
    return path


@dataclass(frozen=True)
class Resume:
    """What an earlier run left in the output: ``done`` keys (a final row, not to be redone),
    ``retry`` keys (only error rows so far: to be tried again), rows ``kept``, ``stale`` rows
    dropped (their input row was edited or deleted), ``repaired`` (a last line cut by a crash
    removed)."""

    done: frozenset[str]
    retry: frozenset[str]
    kept: int
    stale: int
    repaired: bool


def _is_final(row: Mapping[str, Any]) -> bool:
    return not row.get("error")


class JsonlStore:
    """One command's JSONL output (see the module's docstring).

    ``kind`` names the command in messages (e.g. "`nlft judge`"); every row carries ``key_field``
    (its input row's key) and ``owner_field`` (who wrote it: a judge's name, a model), which must
    equal ``owner`` for a resume; ``owner_label`` says so in messages ("judged by").
    ``is_final(row)``: whether a row is done (default: it has no ``error``); other rows are kept
    until a later row for their key replaces them.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        kind: str,
        owner_field: str,
        owner: str,
        owner_label: str = "written by",
        key_field: str = "id",
        is_final: Callable[[Mapping[str, Any]], bool] = _is_final,
    ) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.kind, self.owner_field, self.owner, self.owner_label = kind, owner_field, owner, owner_label
        self.key_field, self.is_final = key_field, is_final
        self._file = None
        self._lock_fd: int | None = None
        self._keys: frozenset[str] = frozenset()
        self._superseded = False  # a row appended replaces an earlier one: compact at close
        self._written: set[str] = set()

    # ------------------------------------------------------------------------------ lifecycle

    def open(
        self,
        keys: Iterable[str],
        *,
        refresh: Mapping[str, Mapping[str, Any]] | None = None,
        overwrite: bool = False,
    ) -> Resume:
        """Lock the output, read it against the current input's ``keys`` and open it for appending.

        ``refresh``: key -> fields each kept row of that key must show now (e.g. its input line).
        Raises :class:`OutputBusy` when another process writes the file, :class:`BadInput` when it
        cannot be written or is not this store's kind or owner (left untouched then).
        """
        if self._file is not None:
            raise RuntimeError(f"{self.path} is open already")
        check_output_path(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise BadInput(f"{self.path}: cannot create its folder ({err.strerror})") from None
        self._lock()
        try:
            self._keys = frozenset(keys)
            resume = self._resume(refresh or {}, overwrite)
            self._file = open(self.path, "a", encoding="utf-8")
        except BaseException:
            self._unlock()
            raise
        self._superseded, self._written = False, set()
        self._retry = resume.retry
        return resume

    def append(self, row: Mapping[str, Any]) -> None:
        """Write ``row`` (its key field first) as one line and flush it."""
        if self._file is None:
            raise RuntimeError(f"{self.path} is not open")
        key = row[self.key_field]
        if key in self._retry or key in self._written:
            self._superseded = True
        self._written.add(key)
        row = {self.key_field: key, **row}
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()  # a kill after this line keeps the row

    def close(self) -> None:
        """Close the file, drop the rows a later one superseded during the run, release the lock."""
        if self._file is None:
            return
        try:
            self._file.close()
            if self._superseded:
                rows, _, _ = self._read()
                self._rewrite(self._compact(rows, {})[0])
        finally:
            self._file = None
            self._unlock()

    def __enter__(self) -> JsonlStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------- the lock

    def _lock(self) -> None:
        """flock on ``<out>.lock``; the previous holder may remove that file as it releases it, so
        the lock counts only when the file locked is still the one at the path."""
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise BadInput(f"{self.path} cannot be written ({err.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputBusy(
                    f"{self.path} is being written by another process (pid {holder}): one writer per output; "
                    "wait for it to end, or name another file"
                ) from None
            try:
                current = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.unlink(self.lock_path)  # while still holding it: see _lock
        except FileNotFoundError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None

    # ------------------------------------------------------------------------ reading, compacting

    def _resume(self, refresh: Mapping[str, Mapping[str, Any]], overwrite: bool) -> Resume:
        if overwrite and self.path.exists():
            self._rewrite([])
        rows, cut, whole_tail = self._read()
        kept, stale = self._compact(rows, refresh)
        if kept != [row for _, row in rows] or cut or whole_tail:
            self._rewrite(kept)
        done = frozenset(row[self.key_field] for row in kept if self.is_final(row))
        retry = frozenset(row[self.key_field] for row in kept) - done
        return Resume(done=done, retry=retry, kept=len(kept), stale=stale, repaired=cut)

    def _read(self) -> tuple[list[tuple[int, dict]], bool, bool]:
        """(line number, row) of each row; whether a last line was cut short (dropped) and whether
        a whole last row lacked its newline. Raises BadInput, touching nothing, for a file that is
        not this store's kind or owner."""
        if not self.path.is_file():
            return [], False, False
        data = self.path.read_bytes()
        *lines, tail = data.split(b"\n")  # tail: b"" when the file ends with its newline
        rows = [(number, self._row(number, line)) for number, line in enumerate(lines, 1) if line.strip()]
        cut = whole_tail = False
        if tail.strip():
            try:
                rows.append((len(lines) + 1, self._row(len(lines) + 1, tail)))
                whole_tail = True
            except BadInput:
                # One of our rows cut short by a crash starts like every row we write; anything else is not ours.
                if not tail.lstrip().startswith(b'{"' + self.key_field.encode() + b'"'):
                    raise
                cut = True
        for number, row in rows:
            if row[self.owner_field] != self.owner:
                raise BadInput(
                    f"{self.path}, line {number}: {self.owner_label} {row[self.owner_field]!r}, not {self.owner!r}; "
                    f"resuming would mix the two: name a new output (or --overwrite to start it afresh)"
                )
        return rows, cut, whole_tail

    def _row(self, number: int, line: bytes) -> dict:
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            why = "not UTF-8" if isinstance(err, UnicodeDecodeError) else f"not valid JSON ({err.msg})"
            raise BadInput(f"{self.path}, line {number}: {why}; not an output of {self.kind}") from None
        if not isinstance(row, dict) or self.key_field not in row or self.owner_field not in row:
            raise BadInput(
                f"{self.path}, line {number}: no {self.key_field!r} and {self.owner_field!r}: "
                f"not an output of {self.kind}"
            )
        return row

    def _compact(
        self, rows: list[tuple[int, dict]], refresh: Mapping[str, Mapping[str, Any]]
    ) -> tuple[list[dict], int]:
        """The rows to keep, in file order, and how many were stale: per current key its first
        final row, else its last row; a key the input no longer has: dropped."""
        final: dict[str, int] = {}
        last: dict[str, int] = {}
        stale = 0
        for index, (_, row) in enumerate(rows):
            key = row[self.key_field]
            if key not in self._keys:
                stale += 1
                continue
            last[key] = index
            if self.is_final(row):
                final.setdefault(key, index)
        chosen = {final.get(key, index) for key, index in last.items()}
        kept = [rows[i][1] | dict(refresh.get(rows[i][1][self.key_field], {})) for i in sorted(chosen)]
        return kept, stale

    def _rewrite(self, rows: list[dict]) -> None:
        """Replace the file's content by ``rows``, atomically: a crash leaves the old file or the new."""
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps({self.key_field: row[self.key_field], **row}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if self.path.exists():
                os.chmod(tmp, self.path.stat().st_mode & 0o7777)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
