"""Registering BiasEdit with peft from outside peft.

peft (0.20 / 0.21) keeps its methods in a closed ``PeftType`` enum, and ``register_peft_method`` only accepts
names that are members of it. We add a ``BIASEDIT`` member to that enum (a guarded use of ``enum`` internals,
checked right after), then call peft's own ``register_peft_method``. Registration is idempotent.

A peft that already knows ``BIASEDIT`` natively, or whose registry no longer looks like the one we target,
gets a clear error instead of a silent half-registration.
"""

from __future__ import annotations

import enum

PEFT_METHOD_NAME = "biasedit"
PEFT_TYPE_NAME = "BIASEDIT"


class RegistrationError(RuntimeError):
    """peft's registry is not what biasedit_peft knows how to extend."""


def _add_enum_member(enum_cls: type[enum.Enum], name: str) -> enum.Enum:
    """Add member ``name`` (value ``name``) to the ``str``-mixin enum ``enum_cls`` and return it."""
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__init__(name)
    if hasattr(enum_cls, "_add_member_"):  # Python >= 3.13 keeps members in a private helper
        enum_cls._add_member_(name, member)
    else:
        member.__objclass__ = enum_cls
        member._sort_order_ = len(enum_cls._member_names_)
        enum_cls._member_map_[name] = member
        enum_cls._member_names_.append(name)
        type.__setattr__(enum_cls, name, member)
    enum_cls._value2member_map_[name] = member
    return member


def _check_registry_shape() -> None:
    from peft import mapping
    from peft.utils import peft_types

    missing = [
        attr
        for attr in (
            "PEFT_TYPE_TO_CONFIG_MAPPING",
            "PEFT_TYPE_TO_TUNER_MAPPING",
            "PEFT_TYPE_TO_PREFIX_MAPPING",
        )
        if not isinstance(getattr(mapping, attr, None), dict)
    ]
    if missing or not hasattr(peft_types, "register_peft_method") or not issubclass(peft_types.PeftType, str):
        import peft

        raise RegistrationError(
            f"biasedit_peft cannot register with peft {peft.__version__}: its method registry changed "
            f"(missing: {missing or 'register_peft_method / str PeftType'}). Install peft>=0.20,<0.23 or a "
            "biasedit_peft release that supports this peft."
        )


def register() -> None:
    """Make ``BIASEDIT`` a peft method (idempotent). Called on ``import biasedit_peft``."""
    _check_registry_shape()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.peft_types import PeftType, register_peft_method

    from .config import BiasEditConfig
    from .model import BiasEditModel

    existing_config = PEFT_TYPE_TO_CONFIG_MAPPING.get(PEFT_TYPE_NAME)
    if existing_config is BiasEditConfig and PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE_NAME) is BiasEditModel:
        return  # already registered by us
    if existing_config is not None:
        raise RegistrationError(
            f"peft already has a method named {PEFT_TYPE_NAME!r} ({existing_config.__module__}."
            f"{existing_config.__name__}); this peft may support BiasEdit natively. Use one or the other: "
            "uninstall biasedit_peft or pin an older peft."
        )
    if PEFT_TYPE_NAME not in PeftType.__members__:
        member = _add_enum_member(PeftType, PEFT_TYPE_NAME)
        took = PeftType(PEFT_TYPE_NAME) is member and PeftType[PEFT_TYPE_NAME] is member and member == PEFT_TYPE_NAME
        if not took:
            raise RegistrationError("Adding BIASEDIT to peft's PeftType enum did not take effect on this Python.")
    register_peft_method(name=PEFT_METHOD_NAME, config_cls=BiasEditConfig, model_cls=BiasEditModel)
