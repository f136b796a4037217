"""FSDP2 helpers under the name earlier versions of this repository used: see ``losparse.fsdp2``."""
from losparse.fsdp2 import __all__, apply_fsdp2, fsdp2_checkpointing, fsdp2_full_model  # noqa: F401
