"""The exporter's atomic writes: :mod:`bnexport.atomic_write` raising ``ExportError``."""

from __future__ import annotations

import functools

from bnexport import atomic_write as _atomic
from bnexport.errors import ExportError

check_writable = functools.partial(_atomic.check_writable, error=ExportError)
atomic_path = functools.partial(_atomic.atomic_path, error=ExportError)
write_bytes_atomic = functools.partial(_atomic.write_bytes_atomic, error=ExportError)
write_text_atomic = functools.partial(_atomic.write_text_atomic, error=ExportError)
