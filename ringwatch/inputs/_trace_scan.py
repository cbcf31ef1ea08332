"""Stream the events a reader wants out of a Chrome-trace JSON file, without loading it whole.

A profiler trace is one JSON object whose ``traceEvents`` array holds every CPU op, kernel
and annotation of the run: gigabytes, of which a collective analysis needs under a percent.
Loading it with ``json.load`` costs about ten times its size in Python objects. Instead the
file is read in chunks (``CHUNK_CHARS``, gzip decompressed on the fly) and a regular
expression finds the events whose ``name`` is of interest (and the top-level keys asked
for); only those objects are decoded, with the standard library's JSON decoder, which keeps
integers of any size exact (a 20-digit id does not overflow). Memory stays at a few chunks
plus the decoded events.

An event is found from its ``"name"``: its object starts at the nearest ``{`` before it
whose decoded object spans the name and has a ``ph`` (Kineto writes ``ph``, ``cat`` then
``name``; other writers' key orders are tried a few braces further back).
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: Characters decoded per read.
CHUNK_CHARS = 8 << 20
#: Characters kept before the unread part, so that an event cut by a chunk's end is whole.
KEEP_CHARS = 1 << 16
#: Braces tried backwards from a ``name`` to find its event's start.
MAX_BACKTRACK = 8

_DECODER = json.JSONDecoder()


@dataclass
class Scan:
    """What :func:`scan_trace` found in one file.

    Attributes:
        events: The decoded events of interest, in file order.
        top: The top-level keys asked for that the file has (``distributedInfo``, ...).
        problems: Why parts of the file could not be read (truncated, corrupted, ...).
        bytes_read: Decompressed characters read.
    """

    events: list[dict] = field(default_factory=list)
    top: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    bytes_read: int = 0


def _chunks(path: Path, chunk_chars: int) -> Iterator[str]:
    """The file's text, chunk by chunk (gzip by its magic bytes, not its name).

    Raises:
        OSError, EOFError, zlib.error: unreadable, corrupted or cut short.
    """
    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with opener(path, "rb") as f:
        read = getattr(f, "read1", f.read)  # gzip: what decompressed so far, before damage
        while True:
            data = read(chunk_chars)
            if not data:
                tail = decoder.decode(b"", final=True)
                if tail:
                    yield tail
                return
            yield decoder.decode(data)


def _event_at(buf: str, name_at: int) -> tuple[int, dict | None, bool]:
    """The event object whose top-level ``name`` key starts at ``name_at``.

    Returns:
        (end of the object in ``buf``, the object or None, whether ``buf`` ended inside it).
    """
    start = name_at
    for _ in range(MAX_BACKTRACK):
        start = buf.rfind("{", 0, start)
        if start < 0:
            return name_at + 1, None, False
        try:
            obj, end = _DECODER.raw_decode(buf, start)
        except json.JSONDecodeError as exc:
            if exc.pos >= len(buf) - 1 or "Unterminated" in exc.msg:
                return start, None, True  # cut by the chunk's end (or the file's)
            continue
        if end > name_at and isinstance(obj, dict) and "ph" in obj:
            return end, obj, False
    return name_at + 1, None, False


def scan_trace(path: str | Path, names: tuple[str, ...], top_keys: tuple[str, ...] = (),
               *, chunk_chars: int = CHUNK_CHARS) -> Scan:
    """The events whose name starts with one of ``names``, and the top-level ``top_keys``.

    Args:
        path: A Chrome-trace JSON file, plain or gzipped.
        names: Prefixes of the event names wanted (``"gloo:"``, ``"ProfilerStep#"``, ...).
        top_keys: Top-level keys whose values are wanted (``"distributedInfo"``, ...).
        chunk_chars: Characters decoded per read.

    Returns:
        What was found; a damaged file gives what could be read before the damage, and a
        line in ``problems``.
    """
    name_alt = "|".join(re.escape(n) for n in names)
    key_alt = "|".join(re.escape(k) for k in top_keys) or "(?!)"
    pattern = re.compile(rf'"name"\s*:\s*"(?:{name_alt})|"(?P<key>{key_alt})"\s*:\s*')
    out = Scan()
    buf = ""
    offset = 0  # characters of the file before buf[0]
    start_pos = 0  # matches in buf before this were handled with the previous chunk
    cut = False
    try:
        for chunk in _chunks(Path(path), chunk_chars):
            out.bytes_read += len(chunk)
            buf += chunk
            pos, cut = start_pos, False
            for m in pattern.finditer(buf, start_pos):
                if m.start() < pos:
                    continue
                if m.group("key"):
                    try:
                        value, end = _DECODER.raw_decode(buf, m.end())
                    except json.JSONDecodeError as exc:
                        if exc.pos >= len(buf) - 1 or "Unterminated" in exc.msg:
                            pos, cut = m.start(), True
                            break
                        continue
                    out.top.setdefault(m.group("key"), value)
                    pos = end
                    continue
                end, obj, cut = _event_at(buf, m.start())
                if cut:
                    pos = end  # the object's start: read again with the next chunk
                    break
                if obj is not None:
                    out.events.append(obj)
                pos = end
            keep_from = pos if cut else max(pos, len(buf) - KEEP_CHARS)
            keep_from = min(keep_from, max(0, len(buf) - KEEP_CHARS)) if not cut else keep_from
            start_pos = max(0, pos - keep_from) if not cut else 0
            offset += keep_from
            buf = buf[keep_from:]
        if cut:
            out.problems.append(f"{path}: cut short inside an event at character {offset} "
                                f"(the file ends there); {len(out.events)} event(s) before "
                                "it read")
        elif not buf.rstrip().endswith("}"):
            out.problems.append(f"{path}: cut short (the JSON does not end); "
                                f"{len(out.events)} event(s) before the end read")
    except (OSError, EOFError, zlib.error) as exc:
        out.problems.append(f"{path}: damaged after {out.bytes_read} characters "
                            f"({type(exc).__name__}: {exc}); {len(out.events)} event(s) "
                            "before it read")
    return out


__all__ = ["CHUNK_CHARS", "Scan", "scan_trace"]
