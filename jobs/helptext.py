"""`imgpipe <job> --help`: the config keys a job reads, generated from the config models (their
fields, defaults, and the comment each field carries in pipeline/config.py), never kept by hand."""

from __future__ import annotations

import inspect
import io
import json
import tokenize
from functools import lru_cache

from pydantic import BaseModel

from pipeline.config import Config

EXAMPLES = {
    "prepare": "imgpipe prepare -c configs/prepare-imagefolder.yaml --set prepare.source=s3://b/raw "
    "--set prepare.output=s3://b/prepared",
    "features": "imgpipe features --set features.source=s3://b/prepared --set features.output=s3://b/features",
    "train-head": "imgpipe train-head --set head.features=s3://b/features --set head.output=s3://b/head",
    "finetune": "imgpipe finetune -c configs/digits-finetune.yaml",
    "classify": "imgpipe classify --set classify.source=s3://b/new --set classify.head=s3://b/head "
    "--set classify.output=s3://b/predictions",
    "demo": "imgpipe demo --set demo.limit=200",
}


def config_keys(sections: tuple[str, ...], job: str = "") -> str:
    """The help epilog: each section's keys as `section.key = default  meaning`, then an example."""
    lines = []
    for section in sections:
        model = Config.model_fields[section].annotation
        lines.append(f"config section {section}: {_first_line(model.__doc__)}")
        notes = field_comments(model)
        for name, field in model.model_fields.items():
            default = field.get_default(call_default_factory=True)
            shown = "(required)" if default == "" and name in ("source", "output", "features") else _show(default)
            note = notes.get(name, "")
            lines.append(f"  {section}.{name} = {shown}" + (f"  # {note}" if note else ""))
        lines.append("")
    if job in EXAMPLES:
        lines.append(f"example:\n  {EXAMPLES[job]}")
    return "\n".join(lines)


@lru_cache(maxsize=None)
def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comment on its line in the model's source (or on the lines just above it)."""
    source = inspect.getsource(model)
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    found = {}
    for number, line in enumerate(lines, start=1):
        name = line.strip().split(":", 1)[0]
        if name not in model.model_fields or not line.startswith("    ") or line.startswith("     "):
            continue
        end = number
        while end < len(lines) and lines[end - 1].rstrip().endswith(("(", ",")):  # a field laid out on lines
            end += 1
        inline = [comments[n] for n in range(number, end + 1) if n in comments and n != number - 1]
        above, n = [], number - 1
        while n in comments and lines[n - 1].strip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        found[name] = " ".join(inline or above)
    return found


def _show(value) -> str:
    if isinstance(value, BaseModel):
        return "{...}"
    return json.dumps(list(value) if isinstance(value, tuple) else value)  # as typed in YAML / --set


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text else ""
