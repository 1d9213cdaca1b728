"""Exceptions raised by the engine."""

from __future__ import annotations


class SelfieInputError(ValueError):
    """A request, template or configuration the engine cannot run; the message says what to change."""


class UnsupportedArchitectureError(TypeError):
    """The model's module layout is not one the engine knows how to hook into."""
