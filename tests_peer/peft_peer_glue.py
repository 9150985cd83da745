"""pytest plugin: run peft's own generic tuner tests (from peft's sdist) against ``BiasEditConfig``.

Loaded with ``-p peft_peer_glue`` (this folder on ``PYTHONPATH``) by ``scripts/run_peft_peer_tests.py``. It
copies no peft test code; it only changes which cases peft's parametrised tests run:

1. ``import biasedit_peft`` registers the ``BIASEDIT`` peft method.
2. Right after pytest imports one of peft's test modules, and before it turns the module's functions into test
   items, every ``@pytest.mark.parametrize`` mark whose values are one of the module's case lists
   (``TEST_CASES``, ``ALL_CONFIGS``, ...) is swapped for an equal mark over the BiasEdit cases of
   ``biasedit_cases.py``, and the module global is rebound to them too. peft's Hub model ids are swapped for tiny
   local models built from configs (``tiny_decoders.py``).
   The Hub LoRA adapter test_config.py loads is swapped for a local adapter_config.json the same way.
3. Two helpers that skip cases by a hard-coded list of peft methods are let through for BiasEdit
   (``METHOD_LIST_HELPERS``), so GPT-2 / Llama / Gemma3 merge tests run for it.
4. Items that no BiasEdit case parametrises (LoRA-only tests, tests with their own inline lists) are deselected,
   so the run is exactly "peft's generic tests, BiasEdit cases". Of those, the tests of features BiasEdit does not
   have by design are skipped with the reason, and those that hit a known tuner bug are strict xfails
   (``biasedit_cases.SKIPPED`` / ``KNOWN_FAILURES``).

If a peft release renames one of these lists, collection fails with an error naming it, instead of silently
running nothing.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest
from peft import LoraConfig

import biasedit_peft  # noqa: F401  (registers BIASEDIT with peft)
from biasedit_peft import BiasEditConfig

from biasedit_cases import (
    CONFIG_CLASSES,
    CUSTOM_MODEL_CASES,
    DECODER_CONFIGS,
    KNOWN_FAILURES,
    MULTIPLE_ACTIVE_ADAPTERS_CASES,
    SKIPPED,
)
from tiny_decoders import build_tiny_decoders

PEER_MODULES = ("test_custom_models.py", "test_config.py", "test_decoder_models.py")

# modules peft's test helpers import at module level but that no BiasEdit test uses
_OPTIONAL_IMPORTS = {"diffusers": ("StableDiffusionPipeline",), "datasets": ("load_dataset",)}


def _layer_indexing_cases(config_cases: Sequence[tuple[type, dict]]) -> list[tuple[type, dict]]:
    """peft's own rule for ``LAYER_INDEXING_CONFIG_CLASSES``, applied to our rows that leave both fields free."""
    return [
        (cls, kwargs)
        for cls, kwargs in config_cases
        if {"layers_to_transform", "layers_pattern"} <= set(inspect.signature(cls).parameters)
        and not {"layers_to_transform", "layers_pattern"} & set(kwargs)
    ]


def _save_lora_adapter_config(models_root: Path, hub_id: str) -> str:
    """A LoRA ``adapter_config.json`` saved under ``<models_root>/<hub_id>``: the local stand-in for the Hub LoRA
    adapter that test_config.py loads with every config class (``from_pretrained`` follows the saved peft_type)."""
    path = models_root / hub_id
    LoraConfig(target_modules=["q_proj", "v_proj"], base_model_name_or_path=None).save_pretrained(path)
    return str(path)


def _replacements(module_file: str, models_root: Path) -> dict[str, tuple[Callable[[Any], Sequence], bool]]:
    """Module global -> (function of its original value giving what to use instead, whether tests are
    parametrised by it; if not, test bodies read it)."""
    if module_file == "test_custom_models.py":
        return {
            "TEST_CASES": (lambda _: CUSTOM_MODEL_CASES, True),
            "ALL_PEFT_CONFIG_CLASSES": (lambda _: [BiasEditConfig], True),
            "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES": (lambda _: MULTIPLE_ACTIVE_ADAPTERS_CASES, True),
        }
    if module_file == "test_config.py":
        return {
            "ALL_CONFIG_CLASSES": (lambda _: CONFIG_CLASSES, True),
            "LAYER_INDEXING_CONFIG_CLASSES": (lambda _: _layer_indexing_cases(CONFIG_CLASSES), True),
            "PEFT_MODELS_TO_TEST": (
                lambda rows: [(_save_lora_adapter_config(models_root, hub_id), rev) for hub_id, rev in rows],
                False,
            ),
        }
    if module_file == "test_decoder_models.py":
        return {
            "ALL_CONFIGS": (lambda _: DECODER_CONFIGS, True),
            "PEFT_DECODER_MODELS_TO_TEST": (lambda hub_ids: build_tiny_decoders(models_root, list(hub_ids)), True),
        }
    raise ValueError(f"{module_file} is not one of the peer test modules {PEER_MODULES}")


# module -> helper functions of peft's tests that skip or rewrite cases by a hard-coded list of peft methods; each
# is let through for BiasEdit (the case then runs as written):
# - testing_common._skip_if_conv1d_not_supported: skips the merge / half-precision / device-map tests on GPT-2
#   (transformers Conv1D) for every method but IA3 / LoHa / LoKr / LoRA; BiasEdit supports Conv1D.
# - test_decoder_models.check_beft_config: meant for BEFT only, but tests `isinstance(config_cls, BeftConfig)` on a
#   class, so it skips the merge tests on Llama / Gemma3 for every method (a peft 0.21.2 test bug).
METHOD_LIST_HELPERS = {
    "testing_common": ("_skip_if_conv1d_not_supported",),
    "test_decoder_models": ("check_beft_config",),
}


def _let_biasedit_through(helper: Callable) -> Callable:
    """``helper`` unchanged for other methods; a no-op when one of its positional arguments is BiasEditConfig."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if any(arg is BiasEditConfig for arg in args):
            return None
        return helper(*args, **kwargs)

    wrapper.__wrapped__ = helper
    return wrapper


def _patch_method_list_helpers(module: types.ModuleType) -> None:
    """Wrap the ``METHOD_LIST_HELPERS`` of the peer modules imported so far (``module``'s package siblings)."""
    for module_name, helpers in METHOD_LIST_HELPERS.items():
        target = sys.modules.get(f"{module.__package__}.{module_name}")
        if target is None:
            continue  # not imported (yet) by the peer modules collected so far
        for helper_name in helpers:
            helper = getattr(target, helper_name, None)
            if helper is None:
                raise RuntimeError(
                    f"peft's {module_name}.py has no `{helper_name}` any more; update tests_peer/peft_peer_glue.py."
                )
            if not hasattr(helper, "__wrapped__"):
                setattr(target, helper_name, _let_biasedit_through(helper))


def _test_functions(module: types.ModuleType) -> Iterator[Callable]:
    """Functions defined in ``module`` and the methods of its classes (where pytest keeps parametrize marks)."""
    for value in vars(module).values():
        if inspect.isfunction(value):
            yield value
        elif inspect.isclass(value) and value.__module__ == module.__name__:
            yield from (member for member in vars(value).values() if inspect.isfunction(member))


def _swap_parametrize_source(module: types.ModuleType, original: Sequence, replacement: Sequence) -> int:
    """Re-point every parametrize mark of ``module`` whose values are ``original`` to ``replacement``."""
    swapped = 0
    for function in _test_functions(module):
        marks = getattr(function, "pytestmark", [])
        for index, mark in enumerate(marks):
            if mark.name == "parametrize" and len(mark.args) >= 2 and mark.args[1] is original:
                argnames, _, *rest = mark.args
                marks[index] = pytest.mark.parametrize(argnames, replacement, *rest, **mark.kwargs).mark
                swapped += 1
    return swapped


def patch_peer_module(module: types.ModuleType, module_file: str, models_root: Path) -> None:
    """Make ``module``'s parametrised tests run the BiasEdit cases (see the module docstring)."""
    for name, (make_replacement, parametrises) in _replacements(module_file, models_root).items():
        if not hasattr(module, name):
            raise RuntimeError(
                f"peft's {module_file} has no `{name}` any more; tests_peer/peft_peer_glue.py must be updated for "
                "this peft version."
            )
        original = getattr(module, name)
        replacement = list(make_replacement(original))
        if _swap_parametrize_source(module, original, replacement) == 0 and parametrises:
            raise RuntimeError(f"No test of peft's {module_file} is parametrised by `{name}` any more.")
        setattr(module, name, replacement)  # for test bodies that read the list itself


def _stub_missing_optional_imports() -> None:
    """Empty stand-ins for diffusers / datasets when not installed: peft's helpers import them at module level."""
    for name, attributes in _OPTIONAL_IMPORTS.items():
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        stub = types.ModuleType(name, f"stub from tests_peer/peft_peer_glue.py: {name} is not installed")
        stub.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        for attribute in attributes:
            setattr(stub, attribute, _unavailable(name, attribute))
        sys.modules[name] = stub


def _unavailable(package: str, attribute: str) -> type:
    """A class no object is an instance of, and that raises when called."""

    def __new__(cls, *args: Any, **kwargs: Any) -> None:
        raise ImportError(f"{package}.{attribute} is needed by this peft test; install {package}.")

    return type(attribute, (), {"__new__": __new__, "from_pretrained": classmethod(__new__)})


def _has_biasedit_case(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    return any(_mentions_biasedit(value) for value in callspec.params.values())


def _mentions_biasedit(value: Any) -> bool:
    if value is BiasEditConfig or isinstance(value, BiasEditConfig):
        return True
    if isinstance(value, (tuple, list)):
        return any(_mentions_biasedit(element) for element in value)
    return False


def _mark_exclusions(item: pytest.Item) -> None:
    """Skip the peer tests that do not apply to BiasEdit; strictly xfail those that hit a known tuner bug."""
    function_name, params = item.originalname, item.callspec.params
    for name, applies, reason in SKIPPED:
        if name == function_name and applies(params):
            item.add_marker(pytest.mark.skip(reason=f"not applicable to BiasEdit: {reason}"))
            return
    for name, applies, reason in KNOWN_FAILURES:
        if name == function_name and applies(params):
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
            return


class PeerGlue:
    """The plugin object: holds the folder of tiny local models for the session."""

    def __init__(self) -> None:
        self.models_root = Path(tempfile.mkdtemp(prefix="peft-peer-models-"))

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector) -> Iterator[None]:
        if isinstance(collector, pytest.Module) and collector.path.name in PEER_MODULES:
            _stub_missing_optional_imports()
            patch_peer_module(collector.obj, collector.path.name, self.models_root)
            _patch_method_list_helpers(collector.obj)
        return (yield)

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        selected = [item for item in items if _has_biasedit_case(item)]
        deselected = [item for item in items if not _has_biasedit_case(item)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = selected
        for item in selected:
            _mark_exclusions(item)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        shutil.rmtree(self.models_root, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(PeerGlue(), "biasedit-peer-glue")
