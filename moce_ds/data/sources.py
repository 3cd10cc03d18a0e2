"""Where shards come from: brace patterns, lists, manifests, ``pipe:`` / URL sources; and how they are read.

:func:`resolve_shards` turns any of the accepted forms into a :class:`ShardSource` (URLs plus, when a manifest
names them, the sample count of each shard). :func:`read_tar_samples` is the tar stage of the streaming loader:
it groups tar members into samples like webdataset's ``tarfile_to_samples``, but reports a shard that breaks off
(truncated file, unreadable stream, fewer samples than its manifest says) as a skip *marker* in the stream,
so the decode stage counts it with the other bad samples and the strict mode can name shard and key. When the
manifest records a shard's sha256, the bytes are hashed as tarfile streams them (no second read) and a shard read to
its end whose digest differs is reported as a ``bad_shard`` marker (a flipped byte need not break the tar or the
image).
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import webdataset as wds
from webdataset.shardlists import expand_urls

__all__ = ["SKIP_MARKER", "ShardSource", "read_tar_samples", "resolve_shards"]

# A sample dict with this key is not a sample but a skip report: {SKIP_MARKER: reason, "__url__", "__key__", detail}
SKIP_MARKER = "__skip__"
_URL_RE = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # pipe:, http:, s3:, file: ...
# webdataset's base_plus_ext: the key is everything before the first dot of the file name
_MEMBER_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass(frozen=True)
class ShardSource:
    urls: list[str]
    counts: list[int] | None  # samples per shard (from a manifest), None when not known
    manifest: dict | None = None
    root: Path | None = None  # folder of the manifest (cluster rounds live in <root>/clusters)
    sha256: list[str | None] | None = None  # hex digest per shard (from a manifest), checked while streaming

    @property
    def total(self) -> int | None:
        return None if self.counts is None else sum(self.counts)


def _is_url(s: str) -> bool:
    return bool(_URL_RE.match(s)) and not re.match(r"^[a-zA-Z]:[\\/]", s)  # not a Windows drive letter


def _from_manifest(path: Path) -> ShardSource:
    meta = json.loads(path.read_text())
    if "shards" not in meta:
        raise ValueError(f"{path} is not a shard manifest (no 'shards' list)")
    root = path.parent
    urls, counts, digests = [], [], []
    for s in meta["shards"]:
        name = str(s["name"])
        urls.append(name if _is_url(name) or Path(name).is_absolute() else str(root / name))
        counts.append(int(s["num_samples"]))
        digests.append(s.get("sha256"))
    return ShardSource(urls, counts, meta, root, digests)


def resolve_shards(source: str | Path | Sequence[str | Path]) -> ShardSource:
    """Accepts a folder with ``manifest.json``, a manifest path, a brace pattern (``/d/shard-{00000..00099}.tar``,
    ``::`` joins several), a ``pipe:``/``http(s):``/other URL, or a list of any of these but manifests."""
    if isinstance(source, (str, Path)):
        s = str(source)
        if not _is_url(s):
            p = Path(s)
            if p.is_dir():
                if not (p / "manifest.json").is_file():
                    raise ValueError(f"shard folder {p} has no manifest.json: write it with launchers/make_shards.py "
                                     f"or pass a brace pattern of its shards")
                return _from_manifest(p / "manifest.json")
            if p.suffix == ".json" and p.is_file():
                return _from_manifest(p)
        urls = expand_urls(s)
    else:
        urls = [u for item in source for u in expand_urls(str(item))]
    if not urls:
        raise ValueError(f"no shard urls in {source!r}")
    return ShardSource(urls, None)


class _HashingReader:
    """Read-only file wrapper that feeds every byte read through it into sha256, so a shard is hashed while tarfile
    streams it (tarfile's stream mode only calls ``read``)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self._hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self._hash.update(data)
        return data

    def digest_to_end(self) -> str:
        """Hash what tarfile left unread (the end-of-archive padding, any trailing bytes) -> the stream's digest."""
        while chunk := self.raw.read(1 << 20):
            self._hash.update(chunk)
        return self._hash.hexdigest()


def _skip(reason: str, url: str, key: str, detail: str, count: int = 1) -> dict:
    return {SKIP_MARKER: reason, "__url__": url, "__key__": key, "detail": detail, "count": count}


def read_tar_samples(src: Iterator[dict], expected: dict[str, int] | None = None,
                     sha256: dict[str, str] | None = None) -> Iterator[dict]:
    """``{"url": ...}`` dicts -> samples ``{"__key__", "__url__", <ext>: bytes, ...}`` (+ skip markers).

    A tar cut inside a member raises in ``tarfile``; the samples before the break are kept, the one being read is
    dropped and reported as ``truncated_tar`` with its key. A tar cut at a header boundary reads as a clean end,
    so when ``expected`` (url -> samples from the manifest) is known, a short shard is reported as well.

    ``sha256`` (url -> hex digest from the manifest): the shard's bytes are hashed as they stream; a shard read to
    its end, not already reported as cut short, whose digest differs is reported after its last sample as one
    ``bad_shard`` skip (count 1: a shard, not samples; its samples were already delivered, since the digest is only
    known at the end), naming the shard, both digests and the fix. A shard the consumer stops reading mid-way (the
    epoch ended) is not checked.
    """
    for shard in src:
        url = shard["url"]
        current: dict | None = None
        n_done = 0
        stream = None
        error: str | None = None
        want_digest = None if sha256 is None else sha256.get(url)
        digest: str | None = None
        try:
            stream = wds.gopen(url)
            reader = stream if want_digest is None else _HashingReader(stream)
            # "r|*": sequential reading of a (possibly compressed) stream; works for pipes and HTTP bodies
            with tarfile.open(fileobj=reader, mode="r|*") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    m = _MEMBER_RE.match(info.name)
                    if m is None or m.group(1).rsplit("/", 1)[-1].startswith("__"):
                        continue  # no extension, or webdataset metadata (__xxx__)
                    key, ext = m.group(1), m.group(2).lower()
                    if current is None or key != current["__key__"]:
                        if current is not None:
                            yield current
                            n_done += 1
                        current = {"__key__": key, "__url__": url}
                    current[ext] = tar.extractfile(info).read()
                    tar.members = []  # why: TarFile keeps every TarInfo otherwise (memory grows per shard)
            if want_digest is not None:
                digest = reader.digest_to_end()
        except Exception as e:  # noqa: BLE001 - any broken or unreadable shard is a bad input, never a crash
            error = f"{type(e).__name__}: {e}"
        finally:
            if stream is not None:
                try:
                    stream.close()  # a pipe: source reports a failed command here
                except Exception as e:  # noqa: BLE001
                    error = error or f"{type(e).__name__}: {e}"
        want = None if expected is None else expected.get(url)
        if error is not None:
            # the sample being read when the shard broke off is incomplete: drop it, name it; count the samples
            # lost when the manifest says how many there were, else the one
            key = current["__key__"] if current is not None else "?"
            lost = max(1, want - n_done) if want is not None else 1
            yield _skip("truncated_tar", url, key, f"shard broke off after {n_done} complete samples ({error})", lost)
            continue
        n_read = n_done + (current is not None)
        short = want is not None and n_read < want
        if current is not None:
            yield current
        if digest is not None and not short and digest != want_digest:
            yield _skip("bad_shard", url, current["__key__"] if current is not None else "?",
                        f"the shard is damaged: its sha256 is {digest} but its manifest records {want_digest}; "
                        f"rebuild it (rerun launchers/make_shards.py with the same arguments plus --verify, which "
                        f"rewrites only damaged shards) or restore the file from a copy")
        if short:
            last = current["__key__"] if current is not None else "?"
            yield _skip("truncated_tar", url, last, f"shard ended after {n_read} of the {want} samples its manifest "
                                                     f"lists (the file is cut short)", want - n_read)
