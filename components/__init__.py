"""Thin KFP v2 components: parse inputs, call :mod:`medseg`, write artefacts."""
