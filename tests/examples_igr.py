"""Registry examples of the IGR family."""

__all__ = ["IGR_EXAMPLES"]

IGR_EXAMPLES = []
