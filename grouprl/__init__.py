"""grouprl: GRPO (and PPO) for language models with verifiable rewards."""

from grouprl.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
