"""Vision-language model adapters (one protocol: :class:`mgcl.models.protocol.VLM`)."""
from .protocol import VLM

__all__ = ["VLM"]
