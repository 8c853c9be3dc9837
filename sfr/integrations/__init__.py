"""Integrations with other training libraries: :mod:`sfr.integrations.trl` (TRL's ``SFTTrainer``)."""
