"""Record streams: JSONL and Arrow IPC, format detection, atomic output, grouping.

Records are plain dicts. One job per module:

- ``codec``: exact JSON (orjson fast path; big integers and repeated keys via the stdlib)
- ``schema``: the schema tag every reader checks
- ``read``: open the input, detect its format, decode JSONL, ``RecordReader``
- ``arrow``: Arrow IPC encoding (schema inference, side columns) and decoding
- ``target``: where output bytes go (atomic rename for files, straight through for devices)
- ``write``: ``RecordWriter``, output format, ``write_atomic_bytes``
- ``groups``: consecutive groups of one prompt, ``SeenKeys``, sample-id checks
- ``benchmarks``: the benchmarks shipped in the package, found by name (``resolve_data``)

This package re-exports the names the rest of tcli imports.
"""

from tcli.io.arrow import EXTRA_COLUMN, MISSING_COLUMN
from tcli.io.benchmarks import BENCHMARKS, resolve_data
from tcli.io.codec import dumps
from tcli.io.groups import SeenKeys, iter_groups
from tcli.io.read import (ARROW_FILE_MAGIC, ARROW_STREAM_MAGIC, RecordReader, detect_format,
                          display_name)
from tcli.io.schema import check_schema
from tcli.io.target import write_atomic_bytes
from tcli.io.write import FORMATS, JsonlSink, RecordWriter, output_format


__all__ = ["ARROW_FILE_MAGIC", "ARROW_STREAM_MAGIC", "BENCHMARKS", "EXTRA_COLUMN", "FORMATS",
           "MISSING_COLUMN", "JsonlSink", "RecordReader", "RecordWriter", "SeenKeys", "check_schema",
           "detect_format", "display_name", "dumps", "iter_groups", "output_format",
           "resolve_data", "write_atomic_bytes"]
