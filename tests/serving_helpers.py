"""Shared by the serving tests: request bodies, images as data: URLs, and SSE parsing."""
import base64
import io
import json
import socket

import torch
from PIL import Image

from blip2_fast.demo import sample_image


def images():
    """The bundled sample, a seeded random 224x224 image and an odd-sized one (the processor resizes)."""
    g = torch.Generator().manual_seed(7)
    noise = (torch.rand(224, 224, 3, generator=g) * 255).to(torch.uint8).numpy()
    odd = (torch.rand(61, 97, 3, generator=g) * 255).to(torch.uint8).numpy()
    return [sample_image(), Image.fromarray(noise), Image.fromarray(odd)]


def data_url(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[fmt]
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def chat(url, text=None, **params) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        parts.append({"type": "text", "text": text})
    return {"model": "ckpt", "messages": [{"role": "user", "content": parts}], **params}


def sse_events(text: str) -> list:
    """The `data:` payloads of an event stream: dicts, and the final '[DONE]'."""
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def streamed_texts(events, n=1, key="content") -> list:
    """Per choice index, the concatenated deltas (chat: delta.content; completions: text)."""
    texts = [""] * n
    for e in events:
        if isinstance(e, dict) and e.get("choices"):
            for c in e["choices"]:
                texts[c["index"]] += c["delta"].get(key, "") if "delta" in c else c["text"]
    return texts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
