"""Networks: the planar VGG-16 encoder and the planar 3D res-u-net."""

from planar3d.networks.encoder import PlanarVGGEncoder
from planar3d.networks.res_unet import PlanarResUNet, PlanarResUNetConfig

__all__ = ["PlanarVGGEncoder", "PlanarResUNet", "PlanarResUNetConfig"]
