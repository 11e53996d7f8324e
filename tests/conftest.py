"""Suite-wide settings.

Packaging exports ``network.onnx`` (5-10 s per package on this CPU) for the torch-free model server. Most tests
package a network and then serve or evaluate it with torch, so the export is switched off for the whole suite
(and the processes it starts) by ``MEDSEG_ONNX_EXPORT=0``; the tests of the ONNX backend turn it back on with
the ``onnx_export`` fixture, or add the file with ``medseg export-onnx`` as a user of an old package would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from medseg.inference.onnx_export import EXPORT_ENV

os.environ[EXPORT_ENV] = "0"


@pytest.fixture
def onnx_export() -> Iterator[None]:
    """Packaging inside this test exports ``network.onnx``, as it does outside the test suite."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(EXPORT_ENV, "1")
        yield
