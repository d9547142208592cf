"""The OpenAI-compatible gateway: policies, sessions, exact token capture.

``Gateway`` is the entry point; ``Session`` / ``Turn`` hold recorded tokens and
``turns_to_samples`` implements the tokenization contract.
"""

from .app import Gateway, Policy
from .errors import GatewayError
from .sessions import Session, Turn
from .tokenization import Split, TokenizationReport, turns_to_samples

__all__ = ["Gateway", "GatewayError", "Policy", "Session", "Split", "TokenizationReport",
           "Turn", "turns_to_samples"]
