"""Weights named by an open_clip tag (`openai`, `laion2b_...`) are downloaded on first use. Without
a network, huggingface_hub retries for about a minute and ends in a truncated message; this module
decides within seconds, before any download starts, whether a tag can be had: it is already in the
local cache, or its server can be reached. Otherwise one line names the tag and the way out (a
local weights file).
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

from promptkd.errors import PromptKDError, optional_import

PROBE_SECONDS = 3.0  # a reachable server answers a TCP connect far sooner
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set: the user asked huggingface_hub to use its cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _cached(cfg: dict) -> bool:
    """Whether open_clip would find these weights without downloading."""
    if cfg.get("file"):
        return Path(cfg["file"]).is_file()
    hub = cfg.get("hf_hub", "")
    if hub:
        hf = optional_import("huggingface_hub")
        if hf is None:
            return False
        repo, filename = os.path.split(hub)  # 'org/name/' (open_clip's default file) or 'org/name/file'
        filename = filename or "open_clip_pytorch_model.bin"
        names = [filename, "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin"
                 else filename.rsplit(".", 1)[0] + ".safetensors"]
        return any(isinstance(hf.try_to_load_from_cache(repo, n), str) for n in names)
    url = cfg.get("url", "")
    return bool(url) and (Path.home() / ".cache" / "clip" / os.path.basename(url)).is_file()


def _server(cfg: dict) -> str:
    return _hf_endpoint() if cfg.get("hf_hub") else cfg.get("url", _hf_endpoint())


def reachable(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """A TCP connection to the URL's host (or to the proxy the environment names for it) opens
    within `timeout` seconds. Name resolution is inside the limit too (it can hang offline)."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return False
    ok = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def check_downloadable(model: str, tag: str) -> None:
    """Refuse, in one line, a weights tag that would need a download that cannot happen."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag) or {}
    if not cfg or _cached(cfg):
        return
    server = _server(cfg)
    if hub_offline() and cfg.get("hf_hub"):
        why = "HF_HUB_OFFLINE is set"
    elif not reachable(server):
        why = f"{urllib.parse.urlsplit(server).hostname} cannot be reached (no network?)"
    else:
        return
    raise PromptKDError(f"weights tag {tag!r} of {model} must be downloaded, but {why}; download them where there "
                        "is a network, or pass a local weights file instead of the tag (e.g. --student-weights "
                        f"clip/{model}.pt; --teacher-weights and --clip-weights alike)")
