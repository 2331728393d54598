"""Test-only fault injection for processes started with this folder on PYTHONPATH (Ray actors of a test job).

VRC_INJECT_DIE_ON_REPLACE=SUBSTR: the process exits hard (os._exit, like a SIGKILL or an OOM kill) when it
is about to os.replace a file whose destination contains SUBSTR, e.g. "/images/" = between the renames of
a shard's commit (its tokens file already in place, images and candidates not). VRC_INJECT_DIE_IN_WRITE=1:
exits inside pyarrow's ParquetWriter.write_table, after half a row group reached the temp file.
VRC_INJECT_MARKER: a file created atomically when it fires, so it fires once over all processes.
"""
import os

_MARKER = os.environ.get("VRC_INJECT_MARKER")


def _first() -> bool:
    if not _MARKER:
        return True
    try:
        os.close(os.open(_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


_substr = os.environ.get("VRC_INJECT_DIE_ON_REPLACE")
if _substr:
    _replace = os.replace

    def _dying_replace(src, dst, *a, **k):
        if _substr in os.fspath(dst) and os.fspath(dst).endswith(".parquet") and _first():
            os._exit(1)
        return _replace(src, dst, *a, **k)

    os.replace = _dying_replace

if os.environ.get("VRC_INJECT_DIE_IN_WRITE"):
    import pyarrow.parquet as _pq

    _write_table = _pq.ParquetWriter.write_table

    def _dying_write_table(self, table, *a, **k):
        if table.num_rows > 1 and _first():
            _write_table(self, table.slice(0, table.num_rows // 2), *a, **k)
            os._exit(1)
        return _write_table(self, table, *a, **k)

    _pq.ParquetWriter.write_table = _dying_write_table


# ---- VRC_FAULT_*: a probe worker that dies (or slows down) after some images -------------------------------


class FaultSwitch:
    """Make the process exit hard after `exit_after` images of a shard (VRC_FAULT_EXIT_AFTER).

    With `marker` set (VRC_FAULT_MARKER) it fires once per marker file (created atomically when it fires), so
    only the first attempt dies and the retry can finish. `sleep_s` (VRC_FAULT_SLEEP_S) slows every image
    down, so a test can stop a run mid-way. Hooked in after every image of vrc_dist.build.work.process_shard.
    """

    def __init__(self, exit_after=None, marker=None, sleep_s=0.0):
        self.exit_after, self.marker, self.sleep_s = exit_after, marker, sleep_s

    def __eq__(self, other):
        return vars(self) == vars(other)

    @classmethod
    def from_env(cls, environ=os.environ):
        after = environ.get("VRC_FAULT_EXIT_AFTER")
        return cls(int(after) if after else None, environ.get("VRC_FAULT_MARKER") or None,
                   float(environ.get("VRC_FAULT_SLEEP_S") or 0))

    def maybe_fire(self, images_done: int) -> None:
        import time

        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.exit_after is None or images_done != self.exit_after:
            return
        if self.marker:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os._exit(1)  # no cleanup, no exception: what a segfault or an OOM kill looks like to Ray


def _hook_process_shard(work, switch: FaultSwitch) -> None:
    original = work.process_shard

    def process_shard(*args, on_progress=None, **kwargs):
        def after_image(images, tokens):
            if on_progress:
                on_progress(images, tokens)
            switch.maybe_fire(images)

        return original(*args, on_progress=after_image, **kwargs)

    work.process_shard = process_shard


class _AfterImport:
    """Runs `then(module)` right after `name` is first imported, before any `from name import x` binds."""

    def __init__(self, name, then):
        self.name, self.then = name, then

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        import importlib.util
        import sys

        sys.meta_path.remove(self)  # once, and not for the lookup below
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def run_then_hook(module):
                exec_module(module)
                self.then(module)

            spec.loader.exec_module = run_then_hook
        return spec


if any(os.environ.get(v) for v in ("VRC_FAULT_EXIT_AFTER", "VRC_FAULT_SLEEP_S")):
    import sys as _sys

    _switch = FaultSwitch.from_env()
    _sys.meta_path.insert(0, _AfterImport("vrc_dist.build.work", lambda m: _hook_process_shard(m, _switch)))
