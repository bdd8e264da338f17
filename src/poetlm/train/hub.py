"""Hugging Face Hub access: honor HF_HUB_OFFLINE even when it is set after the hub libraries were imported."""

from __future__ import annotations

import os


def honor_offline_env() -> None:
    # huggingface_hub and datasets read HF_HUB_OFFLINE once, at import. Honor a value set later
    # (by a launcher or a test) so an offline run fails at once instead of retrying for ~30-45 s.
    if os.environ.get("HF_HUB_OFFLINE", "").upper() not in {"1", "ON", "YES", "TRUE"}:
        return
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config
    except ImportError:  # datasets is optional
        return
    datasets.config.HF_HUB_OFFLINE = True
