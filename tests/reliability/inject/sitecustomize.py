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
