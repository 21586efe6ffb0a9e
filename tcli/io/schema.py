"""The schema tag of a record, checked by every reader (JSONL and Arrow alike)."""

from __future__ import annotations

from tcli import SCHEMA, SCHEMA_MAJOR
from tcli.errors import DataError


def check_schema(rec: dict, file: str, line: int) -> None:
    """A record of a newer major schema than this tcli knows is refused, not misread."""
    tag = rec.get("schema")
    if tag is None:
        return
    if not isinstance(tag, str) or not tag.startswith("tcli.rollout/"):
        raise DataError(f"unknown schema tag {tag!r} (expected {SCHEMA!r})", file=file, line=line,
                        field="schema")
    major = tag.rsplit("/", 1)[1].split(".")[0]
    if not major.isdigit():
        raise DataError(f"malformed schema tag {tag!r}", file=file, line=line, field="schema")
    if int(major) > SCHEMA_MAJOR:
        raise DataError(f"schema {tag!r} is newer than this tcli understands ({SCHEMA!r}); upgrade tcli",
                        file=file, line=line, field="schema")
