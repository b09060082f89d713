"""Render pdserve's Helm chart without Helm: the subset of Go templates the chart uses.

Supported (and nothing else: anything else raises, so the chart cannot silently outgrow the renderer):
``{{ .Values.a.b }}``, ``{{ .Release.Name }}``, ``{{ X | quote }}``, ``{{ toYaml X | nindent N }}``,
``{{- if X }}`` ... ``{{- end }}`` (nesting allowed; ``X`` truthy as in Helm: empty, zero, false and
missing are false), and ``{{-`` trimming the whitespace before it. Values files merge as Helm merges
them (maps deep, everything else replaced). Helm itself cannot be installed here; the chart stays
within this subset so that ``helm template`` renders the same documents.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml

_ACTION = re.compile(r"(\s*)\{\{(-?)\s*(.*?)\s*(-?)\}\}")


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def render_chart(chart: Path, values: dict[str, Any], release: str = "pdserve") -> list[dict[str, Any]]:
    """Every document of every template, in file-name order, as parsed YAML (empty ones dropped)."""
    context = {"Values": values, "Release": {"Name": release}}
    docs: list[dict[str, Any]] = []
    for template in sorted((chart / "templates").glob("*.yaml")):
        text = render_text(template.read_text(), context)
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def render_text(text: str, context: dict[str, Any]) -> str:
    out: list[str] = []
    stack: list[bool] = []  # enclosing ifs: whether each is true
    pos = 0
    for match in _ACTION.finditer(text):
        leading, trim_left, body, _trim_right = match.groups()
        emitting = all(stack)
        if emitting:
            out.append(text[pos:match.start()])
            if not trim_left:
                out.append(leading)
        pos = match.end()
        if body.startswith("if "):
            stack.append(_truthy(_evaluate(body[3:], context)))
        elif body == "end":
            if not stack:
                raise ValueError("{{ end }} without {{ if }}")
            stack.pop()
        elif emitting:
            out.append(_expression(body, context))
    if stack:
        raise ValueError("an {{ if }} is not closed")
    out.append(text[pos:])
    return "".join(out)


def _expression(body: str, context: dict[str, Any]) -> str:
    parts = [p.strip() for p in body.split("|")]
    head = parts[0]
    if head.startswith("toYaml "):
        value: Any = _evaluate(head[len("toYaml "):], context)
        rendered = yaml.safe_dump(value, default_flow_style=False, sort_keys=True).rstrip("\n")
        if value in ({}, []):
            rendered = json.dumps(value)
        for pipe in parts[1:]:
            name, _, arg = pipe.partition(" ")
            if name != "nindent":
                raise ValueError(f"unsupported pipe {pipe!r} after toYaml")
            if value in ({}, []):
                continue  # an empty map or list stays inline: `key: {}`
            indent = " " * int(arg)
            rendered = "\n" + "\n".join(indent + line for line in rendered.splitlines())
        return rendered
    value = _evaluate(head, context)
    text = _scalar(value)
    for pipe in parts[1:]:
        if pipe != "quote":
            raise ValueError(f"unsupported pipe {pipe!r}")
        text = json.dumps(text)
    return text


def _evaluate(path: str, context: dict[str, Any]) -> Any:
    if not path.startswith("."):
        raise ValueError(f"unsupported template expression {path!r}")
    value: Any = context
    for key in path[1:].split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _scalar(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "", {}, [])


CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "pdserve"
RENDERED = CHART.parent / "rendered"
VALUE_SETS = {"default": None, "4p4d": CHART.parent / "values-4p4d.yaml", "70b-tp": CHART.parent / "values-70b-tp.yaml"}


def render_value_set(name: str) -> list[dict[str, Any]]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    extra = VALUE_SETS[name]
    if extra is not None:
        values = merge_values(values, yaml.safe_load(extra.read_text()))
    return render_chart(CHART, values)


def dump(docs: list[dict[str, Any]]) -> str:
    header = "# Rendered from deploy/helm/pdserve by tests/support/helm_lite.py (python -m tests.support.helm_lite)\n"
    return header + "---\n".join(yaml.safe_dump(d, sort_keys=True) for d in docs)


if __name__ == "__main__":
    RENDERED.mkdir(exist_ok=True)
    for value_set in VALUE_SETS:
        (RENDERED / f"{value_set}.yaml").write_text(dump(render_value_set(value_set)))
        print("wrote", RENDERED / f"{value_set}.yaml")
