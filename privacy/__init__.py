"""Differential privacy: mechanisms, randomness, accounting and ledgers (numpy and dp-accounting only)."""
