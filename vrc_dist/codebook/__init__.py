"""The codebook: its directory format, the versioned store and its search, clustering, reference interchange."""
from vrc_dist.codebook.clustering import AlreadyCommitted, ClusteringError, build_version, read_candidates
from vrc_dist.codebook.format import (
    PROVENANCE_SCHEMA,
    CodebookError,
    StaleParent,
    parse_version,
    resolve_path,
    sha256_file,
    version_dir_name,
)
from vrc_dist.codebook.interchange import export_reference, import_reference, load_reference
from vrc_dist.codebook.store import Codebook
