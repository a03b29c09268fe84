"""Every docstring example in the package runs and shows what it says (python -m doctest semantics).

One test per module, so a failure names the module; an example that cannot run here (it needs a
GPU, a download or a process group) is marked ``+SKIP`` in its docstring.
"""

import doctest
import importlib
import pkgutil

import pytest

import functional_memopt

# __main__ runs the command line when imported.
MODULES = sorted(m.name for m in pkgutil.walk_packages(functional_memopt.__path__, "functional_memopt.")
                 if not m.name.endswith("__main__"))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name, globs=dict(vars(module))):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
