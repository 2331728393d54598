"""Interchange with the reference code: a .pt tensor [N, D] and a .json list of sample ids."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from vrc_dist.arrays import nonfinite_rows
from vrc_dist.codebook.format import PROVENANCE_SCHEMA, CodebookError, sha256_file
from vrc_dist.codebook.store import Codebook


def export_reference(codebook: Codebook, out_prefix: str | Path) -> tuple[Path, Path]:
    """Write <prefix>.pt (a CPU tensor [N, D]) and <prefix>.json (sample ids), giving back exactly what an
    import read: the imported dtype (float32 for a built version) and bare ids where token_index is -1."""
    import torch  # only interchange needs torch

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    pt, js = out_prefix.with_name(out_prefix.name + ".pt"), out_prefix.with_name(out_prefix.name + ".json")
    dtype = codebook.params.get("imported_from", {}).get("dtype", "float32")
    torch.save(torch.from_numpy(codebook.vectors.copy()).to(getattr(torch, dtype)), pt)
    rows = codebook.provenance.select(["key", "token_index"]).to_pylist()
    ids = [r["key"] if r["token_index"] == -1 else f"{r['key']}:{r['token_index']}" for r in rows]
    js.write_text(json.dumps(ids) + "\n")
    return pt, js


def load_reference(pt: str | Path, json_path: str | Path | None = None) -> tuple[np.ndarray, pa.Table, str]:
    """Read a reference-format codebook into (vectors float32 [N, D], provenance, the tensor's dtype name).

    `torch.load(weights_only=True)` refuses any pickle global that is not a tensor building block, so a
    crafted file is rejected, never executed. Sample ids "key:token_index" give provenance; the reference's
    own ids are bare image ids (token_index -1). Cluster and support are unknown (-1). A tensor whose values
    float32 cannot hold exactly (float64) is refused: export could not give it back.
    """
    import torch

    try:
        tensor = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, or OSError depending on the damage
        # Keep torch's reason (e.g. "Unsupported global: GLOBAL io.open"), not its advice to disable the check.
        lines = str(e).splitlines() or [type(e).__name__]
        reason = next((ln.strip().split(" was not an allowed")[0] for ln in lines if "WeightsUnpickler" in ln),
                      f"{type(e).__name__}: {lines[0]}")
        raise CodebookError(f"{pt}: not loadable as plain tensor data (weights_only=True): {reason}") from None
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or not tensor.is_floating_point():
        what = f"tensor {tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise CodebookError(f"{pt}: expected a 2-D float tensor [N, D], got {what}")
    tensor = tensor.detach().cpu()
    vectors = tensor.to(torch.float32)
    bad = nonfinite_rows(vectors.numpy())
    if bad.size:
        raise CodebookError(f"{pt}: {bad.size} row(s) with NaN or inf (rows {bad[:10].tolist()})")
    if not torch.equal(vectors.to(tensor.dtype), tensor):
        raise CodebookError(f"{pt}: {tensor.dtype} values that float32 does not hold exactly; convert the "
                            "tensor to float32 first if that rounding is acceptable")
    vectors = vectors.numpy()
    n = len(vectors)
    ids = [str(i) for i in range(n)]
    if json_path is not None:
        try:
            ids = json.loads(Path(json_path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CodebookError(f"{json_path}: not a readable JSON list: {e}") from None
        if not isinstance(ids, list) or len(ids) != n:
            raise CodebookError(f"{json_path}: expected a list of {n} sample ids (one per row of {pt})")
    keys, tokens = [], []
    for sample in map(str, ids):
        key, sep, tok = sample.rpartition(":")
        is_pair = sep and tok.isdigit()
        keys.append(key if is_pair else sample)
        tokens.append(int(tok) if is_pair else -1)
    unknown = pa.array(np.full(n, -1, np.int32))
    provenance = pa.table(
        [pa.array(keys, pa.string()), pa.array([""] * n, pa.string()), pa.array(tokens, pa.int32()),
         unknown, unknown, unknown],
        schema=PROVENANCE_SCHEMA,
    )
    return vectors, provenance, str(tensor.dtype).removeprefix("torch.")


def import_reference(pt: str | Path, json_path: str | Path | None, codebook_dir: str | Path,
                     model_id: str | None = None, name: str | None = None) -> int:
    """Commit a reference-format codebook as the next version of `codebook_dir` (created if needed)."""
    vectors, provenance, dtype = load_reference(pt, json_path)
    cb = Codebook.open_or_create(codebook_dir, vectors.shape[1], str(pt), model_id, name)
    # File names and checksums only: a path of this machine would mean nothing where the codebook goes.
    source = {"pt": Path(pt).name, "pt_sha256": sha256_file(Path(pt)), "dtype": dtype}
    if json_path is not None:
        source |= {"json": Path(json_path).name, "json_sha256": sha256_file(Path(json_path))}
    return cb.commit(vectors, provenance, {"imported_from": source})
