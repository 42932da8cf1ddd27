"""planar3d: planar 3D transfer learning for MS lesion segmentation in raw FLAIR MRI.

A 2D ImageNet VGG-16 becomes the encoder of a 3D res-u-net by giving every 2D kernel a
singleton third axis ("planar" kernel), which computes exactly what the 2D network computes on
every slice. See ``planar3d.inflate`` for the weight mapping and
``planar3d.networks.PlanarResUNet`` for the network.
"""

__version__ = "0.1.0"
