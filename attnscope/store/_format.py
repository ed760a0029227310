"""Trace store format v1: names, dimensions, chunking and codecs (see docs/store-format.md)."""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Any

from ..errors import AttnscopeError

FORMAT_VERSION = 1
SITE_DIMS = ("step", "sample", "head", "y", "x", "token")
IMAGE_DIMS = ("sample", "height", "width", "channel")
#: root arrays that are coordinates of every site array (declared to xarray via the root attribute)
ROOT_COORDS = ("timestep", "prompt_index", "image_index", "token_text", "token_role")
#: the unconditional rows' token coordinates (their negative prompt's text), stored when the uncond branch is
#: recorded and its text is known; the reader gives them to ``attention_uncond`` under the names of the keys
UNCOND_TOKEN_COORDS = {"token_text": "token_text_uncond", "token_role": "token_role_uncond"}
BRANCH_ARRAYS = {"cond": "attention", "uncond": "attention_uncond"}
#: joint sites (SD3, Flux, Flux.2) also store each pixel's total attention mass on the text keys
TEXT_MASS_ARRAYS = {"cond": "text_mass", "uncond": "text_mass_uncond"}
TEXT_MASS_DIMS = SITE_DIMS[:-1]
#: a site's step chunk grows until a shard holds about this many raw bytes (tiny sites), capped below
MIN_SHARD_BYTES = 512 * 1024
MAX_CHUNK_STEPS = 8


#: the group holding one group per recorded site
SITES_GROUP = "sites"

#: root attribute: sorted steps at which an intervention bypassed the recorded sites' attention
#: (their maps are NaN); absent in traces written before it existed (read as [])
GATED_STEPS_ATTR = "gated_steps"
#: root attribute: {site: sorted steps} where the model itself produced NaN attention (not gated), recorded
#: by the writer; absent in traces written before it existed
NAN_MAPS_ATTR = "nan_maps"
#: root attribute, true in traces whose writer stores every chunk of the root arrays (coordinates, images), even
#: one equal to the fill value: there a missing chunk is damage, not zeros (absent in older traces: not checked)
ROOT_CHUNKS_ATTR = "root_chunks_stored"
#: root attribute: a random id (32 hex digits) of the capture that created the store, written with its first
#: metadata; an open Trace checks it when it reads data, so a store replaced under it is an error, not another
#: run's maps (absent in traces written before it existed)
RUN_ID_ATTR = "run_id"
#: optional group of small per-step summaries (``capture(..., output_change=True)``)
SUMMARIES_GROUP = "summaries"
SUMMARY_DIMS = ("step", "site", "sample")
#: ‖O_t‖ and ‖O_t − O_{t−1}‖ of each site's attention output (float32, NaN where not computed)
OUTPUT_NORM = "output_norm"
OUTPUT_CHANGE = "output_change"


def site_group(name: str) -> str:
    """Zarr path of a site's group."""
    return f"{SITES_GROUP}/{name}"


def chunk_steps(step_bytes: int, steps: int) -> int:
    """Steps per chunk/shard for a site whose one step of maps has ``step_bytes`` raw bytes.

    >>> chunk_steps(1 << 20, 50), chunk_steps(158_000, 50), chunk_steps(10, 3)
    (1, 4, 3)
    """
    return max(1, min(steps, MAX_CHUNK_STEPS, math.ceil(MIN_SHARD_BYTES / max(step_bytes, 1))))


def checksum_codec():
    """crc32c over each compressed chunk, checked on every read: a flipped byte is an error, not other values.

    Costs one pass over the compressed bytes (google-crc32c, hardware-accelerated where available);
    measured in benchmarks/capture_overhead.py and benchmarks/sweep_throughput.py (docs/benchmarks.md).
    """
    from zarr.codecs import Crc32cCodec

    return Crc32cCodec()


def default_compressor():
    """Blosc-zstd level 1 with bit-shuffle: ~2x smaller float16 maps at ~1.3 ms per 630 KB shard
    (level 3 compresses 1% better at twice the time; measured on captured maps)."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")


#: the mantissa bits a float16 map may keep with ``keep_bits=`` (float16 stores 10)
KEEP_BITS = range(1, 11)
# zarr warns at every write and read of an array that uses a numcodecs codec (BitRound: keep_bits=) that other
# zarr implementations may not read it; docs/store-format.md says so once, so the warning is silenced (only it)
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")


def check_keep_bits(keep_bits: Any) -> int | None:
    """Return ``keep_bits`` (``None``: lossless, or an int of :data:`KEEP_BITS`), else raise naming it.

    >>> check_keep_bits(None), check_keep_bits(4)
    (None, 4)
    >>> check_keep_bits(0)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: keep_bits=0: expected None (lossless) or an int from 1 to 10, the mantissa bits of a float16 map to keep
    """
    if keep_bits is None:
        return None
    if isinstance(keep_bits, bool) or not isinstance(keep_bits, numbers.Integral) or int(keep_bits) not in KEEP_BITS:
        raise AttnscopeError(f"keep_bits={keep_bits!r}: expected None (lossless) or an int from {KEEP_BITS.start} to "
                             f"{KEEP_BITS.stop - 1}, the mantissa bits of a float16 map to keep")
    return int(keep_bits)


def map_filters(keep_bits: int | None) -> tuple:
    """The filters of a site's map array: none (lossless), or numcodecs' BitRound keeping ``keep_bits`` mantissa
    bits (round to nearest, ties to even; a relative error of at most ``2**-(keep_bits + 1)``), which plain zarr
    decodes as it reads (the codec ships with zarr).

    >>> map_filters(None), [f.codec_config for f in map_filters(4)]
    ((), [{'id': 'bitround', 'keepbits': 4}])
    """
    if keep_bits is None or keep_bits == KEEP_BITS.stop - 1:  # 10 bits: every float16 value as it is
        return ()
    from zarr.codecs.numcodecs import BitRound

    return (BitRound(keepbits=keep_bits),)


@contextlib.contextmanager
def quiet_consolidated():
    """Silence zarr's note that consolidated metadata is not yet in the v3 spec (we write and read it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        yield
