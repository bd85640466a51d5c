"""Names of Hugging Face models and tokenizers: a local path that does not exist is one line, a hub id is loaded
online when the hub answers within ``HUB_TIMEOUT_S``, else from the local cache in HF's offline mode (no minute of
retries before the error when there is no network). Used by ``mlpmem.data`` (tokenizers) and ``mlpmem.lm`` (models).
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mlpmem.errors import UsageError


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or Path(name).exists()


def require_model(name_or_path: str | Path, what: str = "model") -> str:
    """The name as text; UsageError when it is a local path that does not exist."""
    name = str(name_or_path)
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise UsageError(f"{what} path not found: {name}")
    return name


HUB_TIMEOUT_S = 3.0  # seconds a TCP connection to the hub (or the HTTPS proxy) may take before we go offline


@functools.cache
def hub_reachable() -> bool:
    """Whether the hub ($HF_ENDPOINT, or the HTTPS proxy when one is set) accepts a connection (once per process)."""
    proxy = next(
        (os.environ[v] for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(v)), None
    )
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_TIMEOUT_S).close()
    except (OSError, ValueError):
        return False
    return True


def offline_unless_reachable(name: str) -> bool:
    """Before loading ``name``: for a hub id when the hub cannot be reached, switch HF to offline mode (the local
    cache only). True when loading is offline."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE and not _looks_local(name) and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # for child processes
        constants.HF_HUB_OFFLINE = True  # read by huggingface_hub and transformers at every call
    return bool(constants.HF_HUB_OFFLINE)


def load_error(what: str, name: str, err: Exception, offline: bool) -> UsageError:
    """One line for a model or tokenizer that could not be loaded."""
    if offline and not _looks_local(name):
        return UsageError(
            f"cannot load {what} {name!r}: the Hugging Face hub cannot be reached (offline) and it is not in the "
            "local cache; pass a local folder, or download it where there is network"
        )
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if what == "model":
        return UsageError(f"cannot load model {name!r} (not a local model folder or a reachable HF id): {first}")
    return UsageError(f"cannot load {what} {name!r}: {first}")


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """An HF tokenizer; UsageError naming it if it cannot be loaded."""
    name = require_model(name_or_path, "tokenizer")
    offline = offline_unless_reachable(name)
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise load_error("tokenizer", name, err, offline) from None
