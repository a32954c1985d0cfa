"""forge_ds: DeepSpeed harness for ModularForge's Phase 1 (shared components)."""

__version__ = "0.1.0"
