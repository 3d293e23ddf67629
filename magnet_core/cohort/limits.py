"""Input size limits: how large a table file may be, checked while it is read and before it is parsed.

A gzip file of half a megabyte can expand to gigabytes of rows, and a short file whose first row is very wide and
whose other rows are short makes pandas allocate rows x widest-row cells. Every table the project reads goes through
:func:`magnet_core.cohort.tables.read_bytes`, which counts the decompressed bytes, lines, line lengths and cells per
line as they stream out of the file and stops at the first limit crossed, holding one chunk at a time.

The defaults leave wide room over the real cohorts in /work/shared/data (largest file: 3.8 MB decompressed, 348 data
rows, 1001 columns, 200,000 cells, lines of 18 KB) and over a prepared consortium (1000 features per modality);
a consortium reading larger files (a raw genome-wide matrix, a site with tens of thousands of patients) raises them in
its manifest (``[input_limits]``) or in the prepare config.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MiB = 1 << 20

DEFAULT_MAX_BYTES = 64 * MiB  # 17x the largest real file
DEFAULT_MAX_ROWS = 100_000  # lines below the header; 287x the real maximum
DEFAULT_MAX_COLUMNS = 50_000  # cells in any line (a samples x genes matrix of a whole transcriptome fits)
DEFAULT_MAX_CELLS = 5_000_000  # rows x widest line: what the parsed table may hold; 25x the real maximum
DEFAULT_MAX_LINE_BYTES = 4 * MiB  # one line, header included; 230x the real maximum


class InputLimits(BaseModel):
    """Upper bounds on one table file, checked on its decompressed content as it streams (before parsing)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(DEFAULT_MAX_BYTES, gt=0, strict=True,
                           description="decompressed bytes of one table file")
    max_rows: int = Field(DEFAULT_MAX_ROWS, gt=0, strict=True, description="lines below the header")
    max_columns: int = Field(DEFAULT_MAX_COLUMNS, gt=0, strict=True,
                             description="cells in any one line (separators + 1), the header included")
    max_cells: int = Field(DEFAULT_MAX_CELLS, gt=0, strict=True,
                           description="rows x cells of the widest line: the size of the table once parsed")
    max_line_bytes: int = Field(DEFAULT_MAX_LINE_BYTES, gt=0, strict=True, description="bytes of any one line")


DEFAULT_INPUT_LIMITS = InputLimits()


def describe_size(value: int, key: str) -> str:
    """A limit's value as people read it: bytes in MiB (with the exact count), counts with thousands separators."""
    if not key.endswith("bytes"):
        return f"{value:,}"
    return f"{value / MiB:g} MiB ({value:,} bytes)" if value >= MiB else f"{value:,} bytes"
