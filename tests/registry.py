"""The one list of example distributions that drives the generic tests.

Each family keeps its examples in ``tests/examples_<family>.py``; the generic suites
(``test_conformance.py``, ``test_pyro_integration.py``, ``test_fuzz.py``, ``test_compile.py``,
``test_no_host_copies.py`` and, with a GPU, ``test_cuda.py``; some tests of
``test_hardening.py`` and ``test_gst.py`` too) run each test on every example that declares
what the test needs, and ``test_api.py`` fails for a public distribution class that no example
builds.
"""

from examples_gengs import GENGS_EXAMPLES
from examples_gst import GST_EXAMPLES
from examples_igr import IGR_EXAMPLES
from examples_recipe import RECIPE_EXAMPLES

__all__ = ["EXAMPLES"]

# The recipe's made-up estimator too: the recipe works only if it passes what the rest pass.
EXAMPLES = [*GENGS_EXAMPLES, *IGR_EXAMPLES, *GST_EXAMPLES, *RECIPE_EXAMPLES]
