"""Targets as data: see :mod:`edgecc.targets.base`."""

from edgecc.targets.base import Target, all_targets, get_target, register_target, target_from_dict

__all__ = ["Target", "all_targets", "get_target", "register_target", "target_from_dict"]
