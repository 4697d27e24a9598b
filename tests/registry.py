"""The one list of example distributions that drives the generic tests.

Each family keeps its examples in ``tests/examples_<family>.py``; the generic tests
(``test_conformance.py``, ``test_pyro_integration.py``) run every one of them.
"""

from examples_gengs import GENGS_EXAMPLES
from examples_gst import GST_EXAMPLES
from examples_igr import IGR_EXAMPLES

__all__ = ["EXAMPLES"]

EXAMPLES = [*GENGS_EXAMPLES, *IGR_EXAMPLES, *GST_EXAMPLES]
