"""The record source protocol: what every dataset adapter hands the shard writer.

A source is random access so that a resumed build can regenerate exactly the samples of the shards
that are still missing, and so that shards can be written by several processes in parallel.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class RecordSource(Protocol):
    """One split of one dataset, addressable by position 0..len-1 (the sample's future ``index``).

    ``meta(i)`` must be cheap (no image decoding or rendering): the writer reads every record's meta
    before writing to relabel pids and count cameras. ``image(i)`` returns the encoded bytes exactly
    as they are to be stored and their extension (``"jpg"`` or ``"png"``).

    A source may also have a ``fingerprint`` string naming whatever its images depend on beyond
    their meta (a renderer version, a config): a resumed build reuses shards only when it matches.
    """

    dataset: str

    def __len__(self) -> int: ...

    def key(self, i: int) -> str: ...

    def meta(self, i: int) -> dict[str, Any]: ...

    def image(self, i: int) -> tuple[bytes, str]: ...
