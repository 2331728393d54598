"""Reader: list WebDataset shards and stream one shard's samples, recording bad input instead of crashing.

A shard is the unit of work, retry and output, so every shard gets a stable, filesystem-safe name that
the output files and the run manifest are keyed by. Sample keys and member names are data: they are
recorded as strings and never used to build a path.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

from webdataset.gopen import gopen, gopen_schemes
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from vrc_dist.config import MAX_MEMBER_BYTES

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
_GLOB_CHARS = re.compile(r"[*?\[]")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# The one description of --shards, for every command that takes it (all expand through expand_shards).
SHARDS_HELP = ("shards: a glob (quote it: 'dir/*.tar'), a brace pattern (dir/train-{000..003}.tar), "
               "a '::' list, a directory (its *.tar), or a URL; repeatable")


class ShardError(Exception):
    """A problem with a whole shard, as opposed to one sample in it."""


class ShardOpenError(ShardError):
    """The shard could not be opened (missing, no permission, unreachable): worth retrying on a later run."""


class ShardReadError(ShardError):
    """The shard opened but its content is broken (truncated, not a tar, empty): a re-run reads the same."""


@dataclass(frozen=True)
class ShardSpec:
    url: str  # what gopen/fsspec opens
    name: str  # output file stem and manifest key: unique within a run, safe as a file name


@dataclass
class Sample:
    """One WebDataset sample; `error` set means it cannot be probed and is recorded as such."""

    key: str
    image: bytes | None = None
    image_member: str | None = None  # member name, for error messages only
    meta: dict | None = None  # the parsed .json sidecar, if any
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


# --- listing -------------------------------------------------------------------------------------------


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def _glob(pattern: str) -> list[str]:
    if _is_local(pattern):
        return sorted(glob.glob(_local_path(pattern)))
    try:
        import fsspec
    except ImportError as e:
        raise ValueError(f"shard pattern {pattern!r}: globbing remote URLs needs fsspec installed") from e
    fs, _, _ = fsspec.get_fs_token_paths(pattern)
    protocol = urlparse(pattern).scheme
    return sorted(f"{protocol}://{p}" for p in fs.glob(pattern))


def shard_name(url: str) -> str:
    """The shard's file stem (`data/train-000001.tar` -> `train-000001`), made safe as a file name."""
    base = urlparse(url).path.rstrip("/").rsplit("/", 1)[-1] or "shard"
    for suffix in _TAR_SUFFIXES:
        if base.endswith(suffix) and len(base) > len(suffix):
            base = base[: -len(suffix)]
            break
    name = _UNSAFE_NAME_CHARS.sub("_", base).lstrip(".")
    return name or "shard"


def _directory_shards(url: str) -> list[str] | None:
    """The *.tar files of a local directory, or None if `url` is not one."""
    if not (_is_local(url) and os.path.isdir(_local_path(url))):
        return None
    tars = sorted(glob.glob(os.path.join(glob.escape(_local_path(url)), "*.tar")))
    if not tars:
        raise ValueError(f"shard directory {url!r} holds no *.tar files")
    return tars


def expand_shards(patterns: list[str | os.PathLike] | str | os.PathLike) -> list[ShardSpec]:
    """Expand brace patterns (`{000..099}`), `::` lists, globs and directories (their *.tar) into shards,
    in order, duplicates dropped. Every command's --shards goes through here (help: SHARDS_HELP).

    A literal path that does not exist is kept: it is a missing shard, recorded as failed by the run.
    A glob that matches nothing, or a directory without shards, is an error: almost always a typo.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    if not patterns:
        raise ValueError("no shards given: set `shards` in the config or pass --shards")
    urls: list[str] = []
    for pattern in patterns:
        for url in expand_urls(os.fspath(pattern)):
            if _GLOB_CHARS.search(url):
                matched = _glob(url)
                if not matched:
                    raise ValueError(f"shard pattern {url!r} matched no files")
                urls.extend(matched)
            else:
                urls.extend(_directory_shards(url) or [url])
    # Local paths become absolute so a shard keeps its identity whatever the working directory
    # (a Ray job runs in a temporary copy of it).
    urls = [os.path.abspath(_local_path(u)) if _is_local(u) else u for u in urls]
    urls = list(dict.fromkeys(urls))
    names = [shard_name(u) for u in urls]
    # Two shards with the same stem in different directories keep apart by a hash of the full URL.
    clashing = {n for n in names if names.count(n) > 1}
    return [
        ShardSpec(u, f"{n}-{hashlib.sha1(u.encode()).hexdigest()[:8]}" if n in clashing else n)
        for u, n in zip(urls, names)
    ]


# --- streaming -----------------------------------------------------------------------------------------


def _open(url: str):
    scheme = urlparse(url).scheme
    if scheme in ("", "file", "pipe") or scheme in gopen_schemes:
        return gopen(url)
    try:
        import fsspec  # s3://, az://, ...: whatever fsspec has a filesystem for
    except ImportError as e:
        raise ValueError(f"no reader for {url}: webdataset has no handler and fsspec is not installed") from e
    return fsspec.open(url, "rb").open()


def unsafe_member_name(name: str) -> str | None:
    """Why a tar member name is refused, or None. Traversal names are refused even though nothing is
    extracted to disk: a key like `../x` would turn into a path in somebody's downstream script."""
    if not name or "\x00" in name or "\\" in name or any(ord(c) < 32 for c in name):
        return "control character or backslash in member name"
    if name.startswith("/"):
        return "absolute member name"
    if ".." in name.split("/"):
        return "path traversal ('..') in member name"
    return None


def _finish(key: str, members: dict[str, bytes], problems: list[str]) -> Sample:
    sample = Sample(key=key)
    if problems:
        sample.error = "; ".join(problems)
        return sample
    images = [ext for ext in members if ext.lower() in IMAGE_EXTS]
    if not images:
        sample.error = f"no image member (has: {', '.join(sorted(members)) or 'nothing'})"
        return sample
    if len(images) > 1:
        sample.warnings.append(f"several image members {images}; used {images[0]!r}")
    sample.image_member = f"{key}.{images[0]}"
    sample.image = members[images[0]]
    if "json" in members:
        try:
            sample.meta = json.loads(members["json"])
        except (ValueError, UnicodeDecodeError) as e:
            sample.warnings.append(f"sidecar {key}.json is not valid JSON ({e}); ignored")
    return sample


class _Grouping:
    """Consecutive tar members grouped into samples by key (WebDataset rules), with the counts for messages."""

    def __init__(self, max_member_bytes: int):
        self.max_member_bytes = max_member_bytes
        self.seen: set[str] = set()
        self.key: str | None = None
        self.members: dict[str, bytes] = {}
        self.problems: list[str] = []
        self.n_members = self.n_samples = 0

    def member(self, info) -> tuple[str, str] | None:
        """(key, extension) of a member that belongs to a sample; None for one that is skipped."""
        self.n_members += 1
        if info.isdir() or (info.name.startswith("__") and "/" not in info.name):
            return None
        prefix, ext = base_plus_ext(info.name)
        return None if prefix is None else (prefix, ext)

    def switch(self, key: str) -> Sample | None:
        """Start the sample of `key` unless it is the current one; returns the sample that ended."""
        if key == self.key:
            return None
        done = self.finish()
        self.key, self.members, self.problems = key, {}, []
        if key in self.seen:
            self.problems.append(f"duplicate key {key!r} in shard (members not adjacent)")
        self.seen.add(key)
        return done

    def read(self, tar, info, ext: str) -> None:
        """The member's bytes into the current sample, or the reason it is refused."""
        name = info.name
        why = unsafe_member_name(name)
        if why:
            self.problems.append(f"{why}: {name!r}")
        elif not info.isreg():
            self.problems.append(f"member {name!r} is not a regular file")
        elif info.size > self.max_member_bytes:
            self.problems.append(f"member {name!r} is {info.size} bytes (limit {self.max_member_bytes})")
        elif ext in self.members:
            self.problems.append(f"duplicate member {name!r}")
        else:
            self.members[ext] = tar.extractfile(info).read()

    def finish(self) -> Sample | None:
        """The sample being read, complete (None before the first member)."""
        if self.key is None:
            return None
        self.n_samples += 1
        return _finish(self.key, self.members, self.problems)

    def broken(self, e: BaseException) -> Sample | None:
        """The sample being read when the data ended: kept if its image is whole."""
        sample = self.finish()
        if sample is not None:
            if sample.error:
                sample.error += f"; shard broke off while reading this sample: {e}"
            else:
                sample.warnings.append(f"shard broke off after this sample ({e}); members may be missing")
        return sample


def iter_samples(url: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[Sample]:
    """Yield the samples of one shard in tar order, grouping consecutive members by key (WebDataset rules).

    Bad samples are yielded with `error` set. Raises ShardOpenError if the shard cannot be opened and
    ShardReadError when its content breaks off; samples read before the break have been yielded.
    Members without an extension and `__meta__`-style members are skipped, as webdataset does.
    """
    try:
        stream = _open(url)
    except (OSError, ValueError) as e:
        raise ShardOpenError(f"cannot open shard {url}: {e}") from e
    group = _Grouping(max_member_bytes)
    try:
        with stream:
            try:
                tar = tarfile.open(fileobj=stream, mode="r|*")
                for info in tar:
                    member = group.member(info)
                    if member is None:
                        continue
                    sample = group.switch(member[0])
                    if sample is not None:
                        yield sample
                    group.read(tar, info, member[1])
                    tar.members = []  # streaming: do not keep every header of a big shard
            except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
                sample = group.broken(e)
                if sample is not None:
                    yield sample
                reason = "empty file" if str(e) == "empty file" else f"{type(e).__name__}: {e}"
                raise ShardReadError(f"shard {url} is corrupt after {group.n_members} members: {reason}") from e
    except ShardError:
        raise
    except OSError as e:  # closing a pipe: or curl stream that failed
        raise ShardReadError(f"shard {url}: {e}") from e
    sample = group.finish()
    if sample is not None:
        yield sample
    if group.n_samples == 0:
        raise ShardReadError(f"shard {url} is empty: no samples in {group.n_members} members")
