"""`vrc codebook list`: a codebook named by a positional path or by --codebook, and clear errors."""
import numpy as np
import pyarrow as pa

from vrc_dist.cli import main
from vrc_dist.codebook.store import Codebook


def make_codebook(path, versions=2, n=4, dim=8):
    ints = pa.array(np.arange(n, dtype=np.int32))
    prov = pa.table({"key": ["k"] * n, "shard": ["s"] * n, "token_index": ints, "cluster": ints,
                     "support": ints, "cluster_size": ints})
    cb = Codebook.create(path, "mine", "tiny", dim)
    for v in range(versions):
        cb.commit(np.random.default_rng(v).normal(size=(n, dim)), prov, {})
    return path


def test_list_takes_the_codebook_as_a_positional_path(tmp_path, capsys):
    book = make_codebook(tmp_path / "books" / "mine")
    for args in ([str(book)], ["--codebook", str(book)], [str(book), "--codebook", str(book)]):
        assert main(["codebook", "list", *args]) == 0
        out = capsys.readouterr().out
        assert out.startswith("mine  model=tiny  dim=8") and "\n  v0001  " in out and "\n  v0002  " in out
    assert main(["codebook", "list", str(tmp_path / "books")]) == 0
    assert "mine  model=tiny  dim=8  latest=v0002  (2 versions)" in capsys.readouterr().out


def test_list_errors_name_the_bad_input(tmp_path, capsys):
    book = make_codebook(tmp_path / "mine", versions=1)
    assert main(["codebook", "list", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: no such codebook" in capsys.readouterr().err
    assert main(["codebook", "list", str(book), "--codebook", str(tmp_path)]) == 2
    assert "two codebooks given" in capsys.readouterr().err
