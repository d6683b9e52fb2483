"""PNG files with their generation settings in a ``parameters`` text chunk, as webui writes them.

The text has webui's three parts, so webui's "PNG Info" tab and the tools that read it (ComfyUI,
image hosts) show it::

    a cat on a sofa <lora:spo:1.0>
    Negative prompt: blurry
    Steps: 20, Sampler: DDIM, CFG scale: 5.0, Seed: 1234, Size: 512x512, Model: sd15, Eta DDIM: 0.0, Version: spotune 0.1.0

LoRAs appear as webui prompt tags (``<lora:NAME:SCALE>``), the way webui users apply them; the
prompt the text encoder saw is the part before the tags (also kept in ``metadata.jsonl``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from spotune.utils.io import atomic_path

PARAMETERS_KEY = "parameters"
_PAIR_RE = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _fmt(value: Any) -> str:
    text = str(value)
    # webui JSON-quotes values holding a comma, a colon or a newline so that the line stays parseable.
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def format_parameters(
    prompt: str,
    negative_prompt: str,
    settings: dict[str, Any],
    loras: list[tuple[str, float]] = (),
) -> str:
    """The ``parameters`` text of one image.

    Args:
        prompt: the caption.
        negative_prompt: the negative caption ("" for none: the line is left out, as webui does).
        settings: ordered ``key -> value`` pairs for the last line (``Steps``, ``Sampler``, ...).
        loras: (name, scale) pairs, appended to the prompt as ``<lora:name:scale>`` tags.
    """
    first = prompt + "".join(f" <lora:{name}:{scale:g}>" for name, scale in loras)
    lines = [first]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_fmt(value)}" for key, value in settings.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, str]:
    """Read a webui ``parameters`` text back: ``prompt``, ``negative_prompt`` and the last line's pairs.

    LoRA tags stay in ``prompt_with_tags``; ``prompt`` has them removed.
    """
    lines = text.strip("\n").split("\n")
    settings_line = lines[-1] if len(lines) > 1 and _PAIR_RE.match(lines[-1]) and "Steps:" in lines[-1] else ""
    body = lines[:-1] if settings_line else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    prompt_with_tags = "\n".join(prompt_lines)
    out = {
        "prompt_with_tags": prompt_with_tags,
        "prompt": re.sub(r"\s*<lora:[^>]+>", "", prompt_with_tags).strip(),
        "negative_prompt": "\n".join(negative_lines),
    }
    for key, value in _PAIR_RE.findall(settings_line):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = value[1:-1]
        out[key.strip()] = value
    return out


def save_png(image: Image.Image, path: str | Path, parameters: str) -> None:
    """Write ``image`` as a PNG with a ``parameters`` text chunk, atomically."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_parameters(path: str | Path) -> str | None:
    """The ``parameters`` text chunk of a PNG, or ``None`` when it has none."""
    with Image.open(path) as image:
        return image.info.get(PARAMETERS_KEY)
