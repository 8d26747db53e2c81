"""Mask R-CNN instance segmentation (torchvision's detection parts, our backbone and heads) on COCO-format data."""
