"""Judges for SPO: the preference-model protocol, pair selection, and the models themselves."""

from spotune.preference.protocol import PreferenceModel
from spotune.preference.select import select_pair

__all__ = ["PreferenceModel", "select_pair"]
