"""Data generators: synthetic sidescan-sonar mosaics and the hieroglyph example dataset.

The generators are independent of the detector's scheduling: they need numpy, scipy,
tifffile and Pillow only.

- :class:`SonarScene` (:mod:`.sonar`) renders sidescan-sonar mosaics of any size window
  by window, with ground truth; :func:`write_tiff` (:mod:`.tiff_writer`) writes one as a
  tiled GeoTIFF. Survey-line geometry, seabed and targets live in :mod:`.sonar_geometry`,
  :mod:`.sonar_seabed` and :mod:`.sonar_targets`; the deterministic noise in :mod:`.noise`.
- :func:`build_example_dataset` (:mod:`.example`) renders the committed ``example_dataset/``.
"""

from .example import build_example_dataset
from .sonar import SonarScene, make_scene_array
from .sonar_targets import SonarTarget
from .tiff_writer import iter_tiles, write_tiff

__all__ = [
    "SonarScene",
    "SonarTarget",
    "build_example_dataset",
    "iter_tiles",
    "make_scene_array",
    "write_tiff",
]
