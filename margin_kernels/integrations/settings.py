"""Assignable settings of the integrations' modules (pml's losses, insightface's margins and head).

An adapter builds a ``margin_kernels`` loss description from plain constructor values (``scale``, ``margin``,
...). Assigning one of those values later must change what the next call computes, as it does in the code the
adapter replaces, or fail loudly: never a stored value the loss silently ignores. ``SettingsModule`` gives
both: after ``settings_ready()``, assigning a name in ``fixed`` raises an AttributeError naming it (values
that shaped parameters or state at construction); assigning any other attribute that already exists calls
``apply_settings()`` (the subclass rebuilds or updates its description); if that raises, the assignment is
undone and the error names the attribute.
"""
from __future__ import annotations

from torch import nn


class SettingsModule(nn.Module):
    """See the module docstring. Subclasses list ``fixed`` and ``settings`` and override ``apply_settings``."""

    #: names fixed at construction: assigning one after it raises an AttributeError
    fixed: tuple = ()
    #: plain attributes whose assignment rebuilds the description (``apply_settings``)
    settings: tuple = ()

    def settings_ready(self) -> None:
        """Called at the end of the constructor: from now on assignments are checked."""
        self.__dict__["_settings_ready"] = True

    def apply_settings(self) -> None:
        """Make the description follow the current settings (raise a ValueError/TypeError if it cannot)."""
        raise NotImplementedError

    def __setattr__(self, name: str, value) -> None:
        if not self.__dict__.get("_settings_ready", False):
            return super().__setattr__(name, value)
        if name in self.fixed:
            raise AttributeError(f"{name} of {type(self).__name__} is fixed at construction (it shaped its "
                                 f"parameters or state); construct a new {type(self).__name__} instead")
        if name not in self.settings:
            return super().__setattr__(name, value)
        previous = self.__dict__[name]
        super().__setattr__(name, value)
        try:
            self.apply_settings()
        except (ValueError, TypeError) as error:
            super().__setattr__(name, previous)
            raise type(error)(f"{name}={value!r} rejected: {error}") from error
