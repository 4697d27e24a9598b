"""Bijections onto the simplex used by the relaxations (filled by the IGR family)."""

__all__ = []
