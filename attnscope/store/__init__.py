"""The Zarr trace store: its format, the manifest, the background writer and the lazy reader.

One place for the on-disk format (docs/store-format.md): :func:`open_trace` and :class:`Trace` read
it (from a local directory or a URL such as ``s3://bucket/run.zarr``), :class:`TraceWriter` writes it,
:func:`upload_trace` copies a local trace to a URL, :func:`build_manifest` says how a run is reproduced. This
package never imports the hook core; capture feeds the writer, stats and plots read traces.

>>> import attnscope as ats
>>> ats.open_trace is open_trace, FORMAT_VERSION
(True, 1)
"""

from ._format import (
    BRANCH_ARRAYS,
    FORMAT_VERSION,
    GATED_STEPS_ATTR,
    IMAGE_DIMS,
    OUTPUT_CHANGE,
    OUTPUT_NORM,
    ROOT_COORDS,
    SITE_DIMS,
    SITES_GROUP,
    SUMMARIES_GROUP,
    SUMMARY_DIMS,
    check_keep_bits,
    chunk_steps,
    site_group,
)
from ._integrity import crop_region
from ._location import access_error, filesystem, is_url, locate, read_root
from ._manifest import (
    build_manifest,
    check_layerwise_casting,
    check_same_generation,
    check_same_schedule,
    freeu_settings,
    jsonable,
    layerwise_casting,
    set_layerwise_casting,
    weights_fingerprint,
)
from ._reader import Trace, as_trace, open_trace
from ._upload import upload_trace
from ._writer import SiteLayout, StoreLayout, TraceWriter, check_store_path, enclosing_trace

__all__ = ["BRANCH_ARRAYS", "FORMAT_VERSION", "GATED_STEPS_ATTR", "IMAGE_DIMS", "OUTPUT_CHANGE", "OUTPUT_NORM",
           "ROOT_COORDS", "SITES_GROUP", "SITE_DIMS", "SUMMARIES_GROUP", "SUMMARY_DIMS", "SiteLayout", "StoreLayout",
           "Trace", "TraceWriter", "access_error", "as_trace", "build_manifest", "check_keep_bits", "check_layerwise_casting", "check_same_generation", "check_same_schedule", "check_store_path", "chunk_steps", "crop_region", "enclosing_trace", "filesystem", "freeu_settings", "is_url", "jsonable", "layerwise_casting", "locate",
           "open_trace", "read_root", "set_layerwise_casting", "site_group", "upload_trace", "weights_fingerprint"]
